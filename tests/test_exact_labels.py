"""Labels exactly as the model wrote them: non-ASCII kept, parser debris never in a label.

transformers' parser drops every non-ASCII character of box labels ("café" -> "caf",
"狗" -> ""), can start a label inside a location token, and leaves location tokens in OCR
texts. Answers are forced through the real generate() in Florence-2's grammar.
"""

import json

import numpy as np
import pytest
from PIL import Image

from florence_helpers import (
    BoxesResult,
    OCRResult,
    evaluate_detections,
    parse_answer,
    run,
    to_coco,
)
from florence_helpers.language.grammar import instance_labels
from florence_helpers.testing import force_answers
from florence_helpers.training.coco import read_coco

NAMES = ["café", "狗", "信号機", "Zürich"]
BOXES = [
    "<loc_0><loc_0><loc_200><loc_200>",
    "<loc_300><loc_300><loc_500><loc_500>",
    "<loc_600><loc_100><loc_700><loc_900>",
    "<loc_800><loc_800><loc_999><loc_999>",
]
QUAD = "<loc_{0}><loc_10><loc_{1}><loc_10><loc_{1}><loc_60><loc_{0}><loc_60>"
POLY = "<loc_{0}><loc_100><loc_{1}><loc_100><loc_{1}><loc_600><loc_{0}><loc_600>"
BOX_ANSWER = "".join(n + b for n, b in zip(NAMES, BOXES, strict=True))


@pytest.fixture
def picture() -> Image.Image:
    rng = np.random.default_rng(2)
    return Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))


def forced_run(florence, picture, task, answer, **kwargs):
    processor = florence.processor
    return run(
        florence,
        picture,
        task,
        scores=True,
        logits_processor=force_answers(processor, answer),
        **kwargs,
    )


def _check_scores(result):
    assert result.scores is not None and len(result.scores) == len(result)
    assert np.isfinite(result.scores).all() and ((result.scores > 0) & (result.scores <= 1)).all()


@pytest.mark.parametrize(
    ("task", "text"),
    [
        ("OD", None),
        ("DENSE_REGION_CAPTION", None),
        ("CAPTION_TO_PHRASE_GROUNDING", "café, 狗, 信号機 and Zürich"),
        ("OPEN_VOCABULARY_DETECTION", "狗"),
    ],
)
def test_box_labels_survive_with_scores(florence, picture, task, text):
    result = forced_run(florence, picture, task, BOX_ANSWER, text=text)
    assert isinstance(result, BoxesResult)
    assert result.labels == NAMES
    _check_scores(result)
    # Coordinates are the native parser's own.
    native = florence.processor.post_process_generation(
        result.raw, task=f"<{task}>", image_size=picture.size
    )[f"<{task}>"]
    boxes = native["bboxes"]
    np.testing.assert_array_equal(result.boxes, np.asarray(boxes, dtype=np.float32))


def test_ocr_texts_survive_without_location_tokens(florence, picture):
    answer = (
        "".join(name + QUAD.format(100 * i, 100 * i + 80) for i, name in enumerate(NAMES))
        + "<loc_5>stray"
        + QUAD.format(900, 990)
    )
    result = forced_run(florence, picture, "OCR_WITH_REGION", answer)
    assert isinstance(result, OCRResult)
    assert result.texts == [*NAMES, "stray"]
    assert not any("loc" in text for text in result.texts)
    _check_scores(result)


def test_polygon_labels_survive(florence, picture):
    answer = "".join(
        name + "<poly>" + POLY.format(200 * i, 200 * i + 150) + "</poly>"
        for i, name in enumerate(NAMES[:2])
    )
    result = forced_run(florence, picture, "OPEN_VOCABULARY_DETECTION", answer, text="café")
    assert result.labels == NAMES[:2]
    _check_scores(result)


def test_a_label_never_starts_inside_a_location_token(processor):
    raw = "</s><s>cat<loc_100><loc_200><loc_400>dog<loc_0><loc_0><loc_500><loc_500></s>"
    result = parse_answer(processor, raw, "OD", (1000, 1000))
    assert result.labels == ["dog"]
    assert instance_labels("OD", raw.replace("</s>", "").replace("<s>", "")) == ["dog"]


def test_exact_labels_through_coco_and_evaluation(florence, picture):
    result = forced_run(florence, picture, "OD", BOX_ANSWER)
    categories = {name: i + 1 for i, name in enumerate(NAMES)}
    annotations = to_coco(result, image_id=1, categories=categories)
    assert [a["category_id"] for a in annotations] == [1, 2, 3, 4]
    truth = {
        "images": [{"id": 1, "file_name": "p.png", "width": 400, "height": 300}],
        "categories": [{"id": i, "name": n} for n, i in categories.items()],
        "annotations": [
            {**a, "id": k + 1, "iscrowd": 0, "area": a["bbox"][2] * a["bbox"][3]}
            for k, a in enumerate(annotations)
        ],
    }
    for annotation in truth["annotations"]:
        annotation.pop("score", None)
    evaluation = evaluate_detections(truth, {"p.png": result})
    assert evaluation.map50 == pytest.approx(1.0)


def test_training_targets_keep_the_labels_and_parse_back(tmp_path, processor):
    Image.new("RGB", (200, 100), "white").save(tmp_path / "a.png")
    dataset = {
        "images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100}],
        "categories": [{"id": 7, "name": "信号機"}, {"id": 8, "name": "Zürich"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 50, 30]},
            {"id": 2, "image_id": 1, "category_id": 8, "bbox": [100, 40, 60, 50]},
        ],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(dataset, ensure_ascii=False))
    (sample,) = read_coco(tmp_path / "annotations.json")
    assert sample.target.startswith("信号機<loc_")
    parsed = parse_answer(processor, f"</s><s>{sample.target}</s>", "OD", (200, 100))
    assert parsed.labels == ["信号機", "Zürich"]
