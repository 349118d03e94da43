"""detect(): many classes at once, one image encoding, the same boxes as separate runs."""

import numpy as np
import pytest
from PIL import Image

from florence_helpers import BoxesResult, TaskInputError, detect, run
from florence_helpers.language.results import BoxesResult as Boxes
from florence_helpers.language.tasks import Task
from florence_helpers.model.detection import non_max_suppression
from florence_helpers.testing import force_answers

# Florence-2's open-vocabulary detection answer: the phrase, then a box's four location tokens.
ANSWERS = {
    "car": "car<loc_100><loc_200><loc_300><loc_400>car<loc_600><loc_200><loc_900><loc_500>",
    "traffic light": "traffic light<loc_50><loc_10><loc_80><loc_120>",
    "café": "café<loc_0><loc_0><loc_999><loc_999>",
}


@pytest.fixture
def picture() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))


def test_detect_matches_separate_runs_and_keeps_the_given_names(florence, picture):
    classes = ["car", "traffic light"]
    forced = force_answers(florence.processor, [ANSWERS[c] for c in classes])
    result = detect(florence, picture, classes, num_beams=1, logits_processor=forced)
    assert isinstance(result, BoxesResult)
    assert result.task is Task.OPEN_VOCABULARY_DETECTION
    assert result.labels == ["car", "car", "traffic light"]
    separate = [
        run(
            florence,
            picture,
            "OPEN_VOCABULARY_DETECTION",
            text=name,
            num_beams=1,
            logits_processor=force_answers(florence.processor, ANSWERS[name]),
        )
        for name in classes
    ]
    np.testing.assert_array_equal(result.boxes, np.concatenate([r.boxes for r in separate]))
    # Pixel coordinates of the 400x300 image: bin centres of <loc_100>... on each axis.
    np.testing.assert_array_equal(result.boxes[0], [40, 60, 120, 120])


def test_the_image_is_encoded_once_for_all_classes(florence, picture, monkeypatch):
    calls = []
    encode = florence.model.get_image_features

    def counting(pixel_values, *args, **kwargs):
        calls.append(len(pixel_values))
        return encode(pixel_values, *args, **kwargs)

    monkeypatch.setattr(florence.model, "get_image_features", counting)
    classes = ["car", "traffic light", "café"]
    forced = force_answers(florence.processor, [ANSWERS[c] for c in classes])
    result = detect(florence, picture, classes, num_beams=1, logits_processor=forced)
    assert calls == [1]
    assert result.labels[-1] == "café"


def test_scores_a_list_of_images_and_the_class_names_as_given(florence, picture):
    classes = [" car ", "car", "traffic light"]  # repeats dropped, spaces ignored
    answers = [ANSWERS["car"], ANSWERS["traffic light"]]
    results = detect(
        florence,
        [picture, picture],
        classes,
        scores=True,
        num_beams=3,
        logits_processor=force_answers(florence.processor, answers),
    )
    assert len(results) == 2
    for result in results:
        assert result.labels == ["car", "car", "traffic light"]
        assert result.scores is not None and result.scores.shape == (3,)
        assert ((result.scores > 0) & (result.scores <= 1)).all()


def test_per_class_non_maximum_suppression():
    boxes = np.array(
        [[0, 0, 100, 100], [5, 5, 100, 100], [0, 0, 100, 100], [300, 300, 400, 400]],
        dtype=np.float32,
    )
    result = Boxes(
        Task.OPEN_VOCABULARY_DETECTION,
        (500, 500),
        raw="",
        boxes=boxes,
        labels=["car", "car", "person", "car"],
        scores=np.array([0.6, 0.9, 0.5, 0.4], dtype=np.float32),
    )
    kept = non_max_suppression(result, 0.5)
    # The weaker of the two overlapping cars goes; the person overlapping them is another class.
    assert kept.labels == ["car", "person", "car"]
    np.testing.assert_array_equal(kept.boxes[0], [5, 5, 100, 100])
    assert len(non_max_suppression(result, 1.0)) == 4
    with pytest.raises(ValueError, match="scores=True"):
        non_max_suppression(Boxes(Task.OD, (10, 10), raw=""), 0.5)


def test_nms_through_detect_drops_scores_not_asked_for(florence, picture):
    twice = "car<loc_100><loc_200><loc_300><loc_400>car<loc_101><loc_201><loc_300><loc_400>"
    forced = force_answers(florence.processor, [twice])
    result = detect(florence, picture, ["car"], nms_iou=0.5, num_beams=1, logits_processor=forced)
    assert result.labels == ["car"] and result.scores is None


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ([], "empty"),
        ("car,person", "list of names"),
        (["car", "  "], "Class 1 is empty"),
        (["car<OD>"], "token <OD>"),
        (["a <loc_5> car"], "token <loc_5>"),
    ],
)
def test_bad_class_lists_get_clear_errors(florence, picture, classes, message):
    with pytest.raises(TaskInputError, match=message):
        detect(florence, picture, classes)


def test_bad_nms_threshold(florence, picture):
    with pytest.raises(TaskInputError, match="nms_iou"):
        detect(florence, picture, ["car"], nms_iou=1.5)
