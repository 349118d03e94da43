"""Prompts of your own (fine-tuned and community checkpoints), through the real generate().

The tiny model's answers are forced to what such a checkpoint writes, in Florence-2's grammar.
"""

import numpy as np
import pytest
from PIL import Image

from florence_helpers import (
    BoxesResult,
    OCRResult,
    PolygonsResult,
    Result,
    TaskInputError,
    TextResult,
    UnknownTaskError,
    custom_task,
    run,
    run_tasks,
)
from florence_helpers.labelling import read_labels
from florence_helpers.labelling.jobs import label
from florence_helpers.testing import force_answers

BOX = "<loc_100><loc_200><loc_300><loc_400>"
QUAD = "<loc_100><loc_100><loc_500><loc_100><loc_500><loc_200><loc_100><loc_200>"


@pytest.fixture
def picture() -> Image.Image:
    rng = np.random.default_rng(11)
    return Image.fromarray(rng.integers(0, 255, (200, 500, 3), dtype=np.uint8))


def forced(florence, answer):
    return force_answers(florence.processor, answer)


def test_a_free_prompt_gives_its_text_answer(florence, picture):
    prompt = "<DocVQA>What is the total?"
    result = run(
        florence, picture, prompt=prompt, num_beams=3, logits_processor=forced(florence, "12.50")
    )
    assert isinstance(result, TextResult)
    assert result.text == "12.50" and result.task == prompt
    assert result.to_dict()["task"] == prompt


def test_a_custom_task_takes_text_like_a_built_in_one(florence, picture, monkeypatch):
    docvqa = custom_task("<DocVQA>", takes="text")
    sent = []
    processor = florence.processor
    call = type(processor).__call__
    monkeypatch.setattr(
        type(processor),
        "__call__",
        lambda self, *a, **k: sent.append(k.get("text")) or call(self, *a, **k),
    )
    result = run(
        florence,
        picture,
        docvqa,
        text="What is the total?",
        scores=True,
        logits_processor=forced(florence, "12.50 EUR"),
    )
    assert sent[0] == ["<DocVQA>What is the total?"]
    assert result.text == "12.50 EUR" and result.task == "<DocVQA>"
    assert 0 < result.score <= 1


@pytest.mark.parametrize(
    ("parse", "answer", "kind"),
    [
        ("boxes", f"car{BOX}bus{BOX}", BoxesResult),
        ("polygons", "<loc_100><loc_100><loc_600><loc_100><loc_600><loc_700>", PolygonsResult),
        ("ocr", f"TOTAL{QUAD}12.50{QUAD}", OCRResult),
    ],
)
def test_each_parse_kind_gives_its_typed_result_in_pixels(florence, picture, parse, answer, kind):
    result = run(
        florence,
        picture,
        prompt="<MY_TASK>",
        parse=parse,
        scores=True,
        logits_processor=forced(florence, answer),
    )
    assert isinstance(result, kind)
    assert result.scores is not None and len(result.scores) == len(result)
    if kind is BoxesResult:
        assert result.labels == ["car", "bus"]
        # Same quantization as the built-in tasks: the bin centres of a 500x200 image.
        np.testing.assert_array_equal(result.boxes[0], [50, 40, 150, 80])
        od = run(florence, picture, "OD", logits_processor=forced(florence, answer))
        np.testing.assert_array_equal(result.boxes, od.boxes)
    elif kind is OCRResult:
        assert result.texts == ["TOTAL", "12.50"]
        np.testing.assert_array_equal(result.quads[0][0], [50, 20])
    else:
        np.testing.assert_array_equal(result.polygons[0][0][:, 0], [50, 300, 300])


def test_labelled_custom_polygons_keep_their_labels(florence, picture):
    answer = "Zürich<loc_100><loc_100><loc_600><loc_100><loc_600><loc_700>"
    result = run(
        florence,
        picture,
        prompt="<MASKS>",
        parse="polygons",
        logits_processor=forced(florence, answer),
    )
    assert result.labels == ["Zürich"] and len(result.polygons[0][0]) == 3


def test_custom_tasks_in_run_tasks_and_label(florence, picture, tmp_path):
    tags = custom_task("<GENERATE_TAGS>")
    boxes = custom_task("<FIND>", takes="text", result="boxes")
    answers = ["cat, grass, sunny", f"cat{BOX}"]
    caption, found = run_tasks(
        florence, picture, [tags, (boxes, "a cat")], logits_processor=forced(florence, answers)
    )
    assert caption.text == "cat, grass, sunny" and found.labels == ["cat"]

    path = tmp_path / "picture.png"
    picture.save(path)
    out = tmp_path / "tags.jsonl"
    label(
        florence, [path], tags, out, progress=False, logits_processor=forced(florence, answers[0])
    )
    (record,) = read_labels(out, as_results=True)
    assert record["task"] == "<GENERATE_TAGS>"
    assert record["result"].text == "cat, grass, sunny"
    assert Result.from_dict({**record["result"].to_dict()}).task == "<GENERATE_TAGS>"


def test_region_answers_keep_their_box(florence, picture):
    answer = f"a red car{BOX}"
    result = run(
        florence,
        picture,
        "REGION_TO_DESCRIPTION",
        region=(50, 40, 150, 80),
        logits_processor=forced(florence, answer),
    )
    assert result.text == "a red car"
    np.testing.assert_array_equal(result.box, [50, 40, 150, 80])
    assert Result.from_dict(result.to_dict()).box.tolist() == [50, 40, 150, 80]
    caption = run(florence, picture, "CAPTION", logits_processor=forced(florence, "a car"))
    assert caption.box is None and "box" not in caption.to_dict()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        ({"task": "<DocVQA>What is the total?"}, UnknownTaskError, "custom_task"),
        ({"task": "CAPTION", "prompt": "<X>"}, TaskInputError, "not both"),
        ({}, TaskInputError, "neither"),
        ({"prompt": "<OD>cars"}, UnknownTaskError, "built-in task token <OD>"),
        ({"prompt": "   "}, UnknownTaskError, "needs a prompt"),
        ({"prompt": "<X>", "parse": "masks"}, UnknownTaskError, "result is text, boxes"),
        ({"task": custom_task("<DocVQA>", takes="text")}, TaskInputError, "needs text"),
    ],
)
def test_bad_prompts_get_clear_errors(florence, picture, call, error, message):
    with pytest.raises(error, match=message):
        run(florence, picture, **call)
