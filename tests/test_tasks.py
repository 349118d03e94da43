import pytest

from florence_helpers import TASKS, InputKind, ResultKind, Task, UnknownTaskError, task_spec


@pytest.mark.parametrize("spelling", ["OD", "<OD>", "od", " <od> ", Task.OD])
def test_every_spelling_names_the_same_task(spelling):
    assert task_spec(spelling).task is Task.OD
    assert task_spec(spelling).token == "<OD>"


def test_spaces_and_dashes_in_names():
    assert task_spec("caption to phrase grounding").task is Task.CAPTION_TO_PHRASE_GROUNDING
    assert task_spec("region-to-ocr").task is Task.REGION_TO_OCR


def test_unknown_task_lists_the_closest_names():
    with pytest.raises(UnknownTaskError, match=r"Unknown Florence-2 task 'DETAILED_CAPTON'") as e:
        task_spec("DETAILED_CAPTON")
    assert "Did you mean DETAILED_CAPTION" in str(e.value)
    assert "MORE_DETAILED_CAPTION" in str(e.value)


def test_non_string_task_is_rejected():
    with pytest.raises(UnknownTaskError, match="must be a string or Task"):
        task_spec(3)


def test_registry_has_the_fifteen_tasks():
    assert len(TASKS) == 15
    assert set(TASKS) == set(Task)


def test_inputs_match_the_native_processor(processor):
    """The registry agrees with transformers' own prompt tables."""
    no_input = {spec.token for spec in TASKS.values() if spec.input is InputKind.NONE}
    with_input = {spec.token for spec in TASKS.values() if spec.input is not InputKind.NONE}
    assert no_input == set(processor.task_prompts_without_inputs)
    assert with_input == set(processor.task_prompts_with_input)
    for spec in TASKS.values():
        if spec.input is InputKind.REGION:
            assert "region" in processor.task_prompts_with_input[spec.token]


def test_result_kinds_match_the_native_parser(processor):
    native_kind = {
        "pure_text": ResultKind.TEXT,
        "ocr": ResultKind.OCR_REGIONS,
        "description_with_bboxes": ResultKind.BOXES,
        "bboxes": ResultKind.BOXES,
        "phrase_grounding": ResultKind.BOXES,
        "description_with_bboxes_or_polygons": ResultKind.BOXES,
        "polygons": ResultKind.POLYGONS,
    }
    for token, parse_type in processor.tasks_answer_post_processing_type.items():
        assert task_spec(token).result is native_kind[parse_type], token
