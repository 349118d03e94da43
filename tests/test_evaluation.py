import json
from pathlib import Path

import numpy as np
import pytest

from florence_helpers import BoxesResult, Task, evaluate_detections, from_coco

GT_PATH = Path(__file__).resolve().parents[1] / "images" / "annotations.json"
GT = json.loads(GT_PATH.read_text())
NAMES = {c["id"]: c["name"] for c in GT["categories"]}


def truth(file_name, score=None):
    image = next(i for i in GT["images"] if i["file_name"] == file_name)
    annotations = [a for a in GT["annotations"] if a["image_id"] == image["id"]]
    result = from_coco(annotations, NAMES, (image["width"], image["height"]))
    if score is not None:
        result.scores = np.full(len(result), score, np.float32)
    return result


def boxes(file_name, items):
    return BoxesResult(
        Task.OD,
        (512, 512),
        raw="",
        boxes=np.array([b for b, _, _ in items], np.float32).reshape(-1, 4),
        labels=[label for _, label, _ in items],
        scores=np.array([s for _, _, s in items], np.float32),
    )


def test_labelled_set_is_consistent():
    files = {i["file_name"] for i in GT["images"]}
    assert files == {"astronaut.jpg", "rocket.jpg", "coffee.jpg", "cat.jpg"}
    for name in files:
        assert (GT_PATH.parent / name).exists()
    for annotation in GT["annotations"]:
        image = next(i for i in GT["images"] if i["id"] == annotation["image_id"])
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= image["width"] and y + h <= image["height"]


def test_perfect_detections_score_one():
    predictions = {i["file_name"]: truth(i["file_name"], 0.9) for i in GT["images"]}
    evaluation = evaluate_detections(GT_PATH, predictions)
    assert evaluation.map == pytest.approx(1.0)
    assert evaluation.map50 == pytest.approx(1.0)
    assert evaluation.num_ground_truth == len(GT["annotations"])
    assert evaluation.matched.all()
    assert not evaluation.constant_scores


def test_real_scores_rank_false_positives_last_and_constant_scores_do_not():
    # A false positive written first, with a low score, before the true box.
    wrong_then_right = [
        ([300, 300, 340, 340], "cat", 0.1),
        ([0, 0, 451, 300], "cat", 0.9),
    ]
    scored = {"cat.jpg": boxes("cat.jpg", wrong_then_right)}
    evaluation = evaluate_detections(GT, scored)
    assert evaluation.map50 == pytest.approx(1.0)
    unscored = {"cat.jpg": boxes("cat.jpg", wrong_then_right)}
    unscored["cat.jpg"].scores = None
    with pytest.warns(UserWarning, match="every score set to 1.0"):
        constant = evaluate_detections(GT, unscored)
    assert constant.constant_scores
    assert constant.map50 < evaluation.map50


def test_precision_and_recall_against_the_threshold():
    items = [([0, 0, 451, 300], "cat", 0.8), ([10, 10, 40, 40], "cat", 0.4)]
    evaluation = evaluate_detections(GT, {"cat.jpg": boxes("cat.jpg", items)})
    precision, recall = evaluation.precision_recall([0.3, 0.5, 0.9])
    assert precision[:2].tolist() == [0.5, 1.0]
    assert np.isnan(precision[2])  # no box kept: 0 of 0 is undefined, not perfect
    assert recall.tolist() == [1.0, 1.0, 0.0]  # only the evaluated image's boxes count


def test_labels_must_match_unless_class_agnostic():
    items = [([0, 0, 451, 300], "a tabby cat", 0.9)]
    strict = evaluate_detections(GT, {"cat.jpg": boxes("cat.jpg", items)})
    assert strict.matched.size == 0
    agnostic = evaluate_detections(GT, {"cat.jpg": boxes("cat.jpg", items)}, class_agnostic=True)
    assert agnostic.matched.tolist() == [True]


def test_images_with_no_detections_count_as_misses():
    empty = boxes("coffee.jpg", [])
    evaluation = evaluate_detections(GT, {"coffee.jpg": empty})
    assert evaluation.map == 0.0 and evaluation.num_ground_truth == 3
    both = {"coffee.jpg": empty, "cat.jpg": truth("cat.jpg", 0.9)}
    assert evaluate_detections(GT, both).num_ground_truth == 4


def test_unknown_images_are_named():
    with pytest.raises(KeyError, match="dog.jpg"):
        evaluate_detections(GT, {"dog.jpg": boxes("dog.jpg", [])})


@pytest.mark.parametrize(
    "ground_truth, message",
    [
        ({"images": 5, "annotations": [], "categories": []}, "has no 'images' list"),
        ({}, "has no 'images' list"),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.jpg"}],
             "annotations": [], "categories": []},
            "two images share the id 2 or the file name 'a.jpg'",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}],
             "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5]}]},
            "annotation #0: its bbox must be [x, y, width, height], four finite numbers",
        ),
        (
            {"images": [{"id": [1], "file_name": "a.jpg"}], "annotations": [],
             "categories": []},
            "image #0 is not an object with an id",
        ),
    ],
)  # fmt: skip
def test_a_ground_truth_that_is_not_coco_is_refused_with_what_is_wrong(ground_truth, message):
    with pytest.raises(ValueError) as raised:
        evaluate_detections(ground_truth, {})
    assert message in str(raised.value)


def test_a_ground_truth_file_is_read_as_read_coco_reads_it(tmp_path):
    (tmp_path / "gt.json").write_bytes(b"[" * 100_000)
    with pytest.raises(ValueError, match=r"gt\.json is not valid JSON"):
        evaluate_detections(tmp_path / "gt.json", {})


def test_an_image_of_more_boxes_than_any_dataset_holds_is_refused_before_scoring():
    # 20,000 ground-truth boxes on one image took pycocotools 34 s (twelfth hostile review).
    from florence_helpers.training.evaluation import MAX_BOXES_PER_IMAGE

    crowded = json.loads(json.dumps(GT))
    image = crowded["images"][0]
    extra = {"image_id": image["id"], "category_id": GT["categories"][0]["id"], "iscrowd": 0}
    crowded["annotations"] += [
        {**extra, "id": 10_000 + k, "bbox": [1, 1, 5, 5], "area": 25.0}
        for k in range(MAX_BOXES_PER_IMAGE + 1)
    ]
    with pytest.raises(ValueError, match=r"has more than 5,000 boxes"):
        evaluate_detections(crowded, {})
