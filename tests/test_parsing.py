"""Canned answers written in Florence-2's real output grammar, parsed into typed results."""

import json

import numpy as np
import pytest

from florence_helpers import (
    BoxesResult,
    OCRResult,
    PolygonsResult,
    Result,
    Task,
    TextResult,
    parse_answer,
)

SIZE = (1600, 1066)  # the seed sample's image size


def pixel(bin_: int, axis: int) -> int:
    """The processor's bin centre, computed independently of the code under test."""
    return int((bin_ + 0.5) * axis / 1000)


def px(bins: list[int]) -> list[int]:
    return [pixel(b, SIZE[i % 2]) for i, b in enumerate(bins)]


def loc(*bins: int) -> str:
    return "".join(f"<loc_{b}>" for b in bins)


def test_caption_strips_special_tokens_and_padding(processor):
    result = parse_answer(processor, "</s><s>A green car parked.</s><pad><pad>", "CAPTION", SIZE)
    assert isinstance(result, TextResult)
    assert result.text == "A green car parked."
    assert str(result) == "A green car parked."
    assert result.raw == "</s><s>A green car parked.</s>"
    assert result.task is Task.CAPTION


def test_region_text_answers_lose_their_location_tokens(processor):
    raw = f"</s><s>car{loc(52, 333, 932, 774)}</s>"
    result = parse_answer(processor, raw, "REGION_TO_CATEGORY", SIZE)
    assert result.text == "car"
    assert loc(52) in result.raw


def test_detection_with_several_boxes_after_one_label(processor):
    raw = f"</s><s>car{loc(52, 333, 932, 774)}door{loc(1, 2, 3, 4)}{loc(5, 6, 7, 8)}</s>"
    result = parse_answer(processor, raw, "OD", SIZE)
    assert isinstance(result, BoxesResult)
    assert result.labels == ["car", "door", "door"]
    assert result.boxes.shape == (3, 4)
    assert result.boxes.tolist() == [px([52, 333, 932, 774]), px([1, 2, 3, 4]), px([5, 6, 7, 8])]
    assert len(result) == 3
    assert not result.truncated


def test_boxes_at_the_first_and_last_bins(processor):
    result = parse_answer(processor, f"</s><s>sky{loc(0, 0, 999, 999)}</s>", "OD", SIZE)
    assert result.boxes.tolist() == [[0, 0, 1599, 1065]]


def test_region_proposals_have_empty_labels(processor):
    raw = f"</s><s>{loc(10, 20, 30, 40)}{loc(50, 60, 70, 80)}</s>"
    result = parse_answer(processor, raw, "REGION_PROPOSAL", SIZE)
    assert result.labels == ["", ""]
    assert result.boxes.tolist() == [px([10, 20, 30, 40]), px([50, 60, 70, 80])]


def test_dense_region_captions(processor):
    raw = f"</s><s>a red car{loc(1, 2, 300, 400)}a wheel{loc(10, 300, 50, 390)}</s>"
    result = parse_answer(processor, raw, "DENSE_REGION_CAPTION", SIZE)
    assert result.labels == ["a red car", "a wheel"]


def test_phrase_grounding_repeats_the_phrase_per_box(processor):
    raw = f"</s><s>A dog{loc(1, 2, 3, 4)}{loc(5, 6, 7, 8)}a ball{loc(9, 10, 11, 12)}</s>"
    result = parse_answer(processor, raw, "CAPTION_TO_PHRASE_GROUNDING", SIZE)
    assert result.labels == ["A dog", "A dog", "a ball"]
    assert result.boxes.tolist()[2] == px([9, 10, 11, 12])


def test_open_vocabulary_boxes(processor):
    raw = f"</s><s>a green car{loc(100, 200, 300, 400)}</s>"
    result = parse_answer(processor, raw, "OPEN_VOCABULARY_DETECTION", SIZE)
    assert isinstance(result, BoxesResult)
    assert result.labels == ["a green car"]
    assert result.boxes.tolist() == [px([100, 200, 300, 400])]


def test_open_vocabulary_polygons_become_their_enclosing_box(processor):
    raw = f"</s><s>a green car<poly>{loc(100, 200, 300, 250, 200, 400)}</poly></s>"
    result = parse_answer(processor, raw, "OPEN_VOCABULARY_DETECTION", SIZE)
    assert result.labels == ["a green car"]
    assert result.boxes.tolist() == [px([100, 200, 300, 400])]


def test_polygon_segmentation(processor):
    raw = f"</s><s>{loc(100, 100, 200, 100, 200, 200, 100, 200)}</s>"
    result = parse_answer(processor, raw, "REFERRING_EXPRESSION_SEGMENTATION", SIZE)
    assert isinstance(result, PolygonsResult)
    assert len(result) == 1
    (shape,) = result.polygons[0]
    assert shape.shape == (4, 2)
    assert shape.flatten().tolist() == px([100, 100, 200, 100, 200, 200, 100, 200])


def test_several_polygons_split_by_sep_inside_poly(processor):
    first, second = loc(1, 1, 9, 1, 9, 9), loc(20, 20, 30, 20, 30, 30, 20, 30)
    raw = f"</s><s><poly>{first}<sep>{second}</poly></s>"
    result = parse_answer(processor, raw, "REGION_TO_SEGMENTATION", SIZE)
    assert len(result) == 1
    assert [len(s) for s in result.polygons[0]] == [3, 4]


def test_an_odd_trailing_coordinate_is_dropped(processor):
    raw = f"</s><s>{loc(100, 100, 200, 100, 200, 200, 777)}</s>"
    result = parse_answer(processor, raw, "REFERRING_EXPRESSION_SEGMENTATION", SIZE)
    assert result.polygons[0][0].shape == (3, 2)


def test_ocr_with_regions(processor):
    raw = (
        f"</s><s>HELLO{loc(10, 10, 90, 10, 90, 30, 10, 30)}"
        f"World 2{loc(10, 40, 90, 40, 90, 60, 10, 60)}</s>"
    )
    result = parse_answer(processor, raw, "OCR_WITH_REGION", SIZE)
    assert isinstance(result, OCRResult)
    assert result.texts == ["HELLO", "World 2"]
    assert result.quads.shape == (2, 4, 2)
    assert result.quads[0].flatten().tolist() == px([10, 10, 90, 10, 90, 30, 10, 30])


@pytest.mark.parametrize(
    ("task", "raw", "expected"),
    [
        ("OD", f"</s><s>car{loc(1, 2, 3, 4)}dog{loc(5, 6)}", 1),
        ("OD", f"</s><s>car{loc(1, 2, 3, 4)}{loc(5, 6, 7)}", 1),
        ("OD", "</s><s>ca", 0),
        ("OCR_WITH_REGION", f"</s><s>A{loc(1, 1, 2, 1, 2, 2, 1, 2)}B{loc(3, 3, 4)}", 1),
        ("CAPTION_TO_PHRASE_GROUNDING", f"</s><s>a dog{loc(1, 2, 3, 4)}a ball{loc(9)}", 1),
    ],
)
def test_truncated_answers_keep_what_parsed_cleanly(processor, task, raw, expected):
    result = parse_answer(processor, raw, task, SIZE, truncated=True)
    assert len(result) == expected
    assert result.truncated


def test_truncated_polygon_keeps_whole_points(processor):
    raw = f"</s><s><poly>{loc(100, 100, 200, 100, 200, 200, 150)}"
    result = parse_answer(processor, raw, "REFERRING_EXPRESSION_SEGMENTATION", SIZE, truncated=True)
    assert result.polygons[0][0].shape == (3, 2)


def test_results_serialise_to_json(processor):
    raws = {
        "OD": f"</s><s>car{loc(1, 2, 3, 4)}</s>",
        "CAPTION": "</s><s>A car.</s>",
        "REFERRING_EXPRESSION_SEGMENTATION": f"</s><s>{loc(1, 1, 9, 1, 9, 9)}</s>",
        "OCR_WITH_REGION": f"</s><s>A{loc(1, 1, 2, 1, 2, 2, 1, 2)}</s>",
    }
    for task, raw in raws.items():
        payload = json.loads(json.dumps(parse_answer(processor, raw, task, SIZE).to_dict()))
        assert payload["task"] == f"<{task}>"
        assert payload["image_size"] == list(SIZE)
        assert payload["raw"] == raw


def test_from_dict_reads_back_what_to_dict_wrote(processor):
    raws = {
        "OD": f"</s><s>car{loc(1, 2, 3, 4)}door{loc(5, 6, 7, 8)}</s>",
        "CAPTION": "</s><s>A car.</s>",
        "REFERRING_EXPRESSION_SEGMENTATION": (
            f"</s><s>{loc(1, 1, 9, 1, 9, 9)}<sep>{loc(2, 2, 8, 2, 8, 8)}</s>"
        ),
        "OCR_WITH_REGION": f"</s><s>A{loc(1, 1, 2, 1, 2, 2, 1, 2)}</s>",
        "REGION_PROPOSAL": "</s><s></s>",
    }
    for task, raw in raws.items():
        result = parse_answer(processor, raw, task, SIZE, truncated=task == "OD")
        if hasattr(result, "scores"):
            result.scores = np.linspace(0.1, 0.9, len(result), dtype=np.float32)
        else:
            result.score, result.logprob, result.word_scores = (
                0.5,
                -0.69,
                [("A", 0.4), ("car.", 0.6)],
            )
        back = Result.from_dict(json.loads(json.dumps(result.to_dict())))
        assert type(back) is type(result) and back.to_dict() == result.to_dict()
    record = {"boxes": [[1, 2, 3, 4]], "labels": ["cat"]}  # a labelling record's result
    boxes = BoxesResult.from_dict(record, task="OD", image_size=(10, 10))
    assert boxes.task is Task.OD and boxes.image_size == (10, 10) and boxes.scores is None
    with pytest.raises(ValueError, match="Not a TextResult dict"):
        TextResult.from_dict(record, task="OD", image_size=(10, 10))
    with pytest.raises(ValueError, match="expected one of the keys"):
        Result.from_dict({"task": "<OD>", "image_size": [1, 1]})


def test_empty_answers_give_empty_results(processor):
    assert len(parse_answer(processor, "</s><s></s>", "OD", SIZE)) == 0
    assert parse_answer(processor, "</s><s></s>", "OD", SIZE).boxes.shape == (0, 4)
    assert parse_answer(processor, "</s><s></s>", "OCR_WITH_REGION", SIZE).quads.shape == (0, 4, 2)
    assert parse_answer(processor, "</s><s></s>", "CAPTION", SIZE).text == ""
    assert np.asarray(parse_answer(processor, "</s></s>", "REGION_PROPOSAL", SIZE).boxes).size == 0
