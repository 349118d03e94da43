"""Several tasks on one image: encoded once, answers identical to running each task alone."""

import numpy as np
import pytest
from PIL import Image

import florence_helpers.model.decoding as decoding
from florence_helpers import BoxesResult, RegionError, TaskInputError, TextResult, run
from florence_helpers.model.inference import run_tasks
from florence_helpers.testing import force_answers

REQUESTS = [
    "CAPTION",
    "OD",
    "DENSE_REGION_CAPTION",
    ("OPEN_VOCABULARY_DETECTION", "a red square"),
    ("CAPTION_TO_PHRASE_GROUNDING", "a much longer caption with many more words in it"),
    ("REFERRING_EXPRESSION_SEGMENTATION", "the square"),
    ("REGION_TO_CATEGORY", (10, 20, 200, 150)),
    ("REGION_TO_SEGMENTATION", (10, 20, 200, 150)),
    "OCR_WITH_REGION",
]


@pytest.fixture
def picture() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))


def alone(florence, picture, request, **kwargs):
    task, extra = request if isinstance(request, tuple) else (request, None)
    text = extra if isinstance(extra, str) else None
    region = extra if isinstance(extra, tuple) else None
    return run(florence, picture, task, text=text, region=region, **kwargs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_answers_are_token_identical_to_running_each_task_alone(florence, picture, num_beams):
    together = run_tasks(florence, picture, REQUESTS, num_beams=num_beams, max_new_tokens=60)
    assert len(together) == len(REQUESTS)
    for request, result in zip(REQUESTS, together, strict=True):
        single = alone(florence, picture, request, num_beams=num_beams, max_new_tokens=60)
        assert result.raw == single.raw, request
        assert result.task is single.task and result.truncated == single.truncated


def test_the_image_is_encoded_once(florence, picture, monkeypatch):
    calls = []
    original = florence.model.get_image_features

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0] if args else kwargs["pixel_values"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(florence.model, "get_image_features", counting)
    run_tasks(florence, picture, REQUESTS, num_beams=1, max_new_tokens=5)
    assert calls == [1]


def test_forced_answers_parse_per_task(florence, picture):
    answers = ["A red square.", "square<loc_0><loc_0><loc_500><loc_500>"]
    caption, boxes = run_tasks(
        florence,
        picture,
        ["CAPTION", "OD"],
        scores=True,
        logits_processor=force_answers(florence.processor, answers),
    )
    assert isinstance(caption, TextResult) and caption.text == "A red square."
    assert 0 < caption.score <= 1
    assert isinstance(boxes, BoxesResult) and boxes.boxes.tolist() == [[0, 0, 160, 120]]
    assert len(boxes.scores) == 1


def test_bad_requests_fail_before_the_model_runs(florence, picture, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(florence.model, "get_image_features", fail)
    with pytest.raises(TaskInputError, match="needs text"):
        run_tasks(florence, picture, ["CAPTION", "OPEN_VOCABULARY_DETECTION"])
    with pytest.raises(RegionError, match="outside the 320x240 image"):
        run_tasks(florence, picture, [("REGION_TO_OCR", (0, 0, 400, 10))])
    assert run_tasks(florence, picture, []) == []


def test_skipping_the_cross_attention_reorder_changes_no_beam(florence, monkeypatch):
    images = [Image.new("RGB", (320, 240), c) for c in ("red", "navy", "olive")]
    fast = [r.raw for r in run(florence, images, "OD", num_beams=3, max_new_tokens=40)]
    fast += [
        r.raw for r in run_tasks(florence, images[0], REQUESTS, num_beams=4, max_new_tokens=40)
    ]
    monkeypatch.setattr(decoding, "beam_cache", lambda: None)  # transformers' own cache
    plain = [r.raw for r in run(florence, images, "OD", num_beams=3, max_new_tokens=40)]
    plain += [
        r.raw for r in run_tasks(florence, images[0], REQUESTS, num_beams=4, max_new_tokens=40)
    ]
    assert fast == plain
