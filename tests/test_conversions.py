import sys

import numpy as np
import pytest
from PIL import Image

from florence_helpers import (
    BoxesResult,
    OCRResult,
    PolygonsResult,
    Task,
    coco_categories,
    cutout,
    from_coco,
    polygons_to_mask,
    to_coco,
    to_mask,
    to_masks,
    to_supervision,
)

SIZE = (200, 120)


def boxes_result(scores=None):
    return BoxesResult(
        Task.OD,
        SIZE,
        raw="",
        boxes=np.array(
            [[10, 20, 50, 80], [0, 0, 199, 119], [30.5, 40.25, 31.5, 41.25]], np.float32
        ),
        labels=["car", "sky", "car"],
        scores=scores,
    )


def polygons_result():
    triangle = np.array([[0, 0], [100, 0], [0, 100]], np.float32)
    square = np.array([[150, 10], [190, 10], [190, 50], [150, 50]], np.float32)
    return PolygonsResult(
        Task.REFERRING_EXPRESSION_SEGMENTATION,
        SIZE,
        raw="",
        polygons=[[triangle], [square, square + [0, 60]]],
        labels=["", "window"],
    )


@pytest.mark.parametrize(
    ("polygon", "area"),
    [
        ([[20, 10], [120, 10], [120, 90], [20, 90]], 100 * 80),  # rectangle
        ([[10, 10], [110, 10], [10, 110]], 100 * 100 / 2),  # right triangle
        ([[60, 10], [110, 60], [60, 110], [10, 60]], 2 * 50 * 50),  # diamond
    ],
)
def test_mask_area_matches_the_polygon_within_two_percent(polygon, area):
    mask = polygons_to_mask([np.array(polygon)], (128, 128))
    assert mask.shape == (128, 128) and mask.dtype == bool
    assert abs(mask.sum() - area) <= 0.02 * area


def test_circle_mask_area():
    angles = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    circle = np.column_stack([100 + 40 * np.cos(angles), 60 + 40 * np.sin(angles)])
    assert abs(polygons_to_mask([circle], SIZE).sum() - np.pi * 40**2) <= 0.02 * np.pi * 40**2


def test_masks_per_instance_and_union():
    result = polygons_result()
    masks = to_masks(result)
    assert masks.shape == (2, 120, 200)
    assert masks[0, 10, 10] and not masks[0, 90, 90]
    assert masks[1, 30, 170] and masks[1, 90, 170] and not masks[1, 60, 170]
    assert abs(masks[1].sum() - 2 * 40 * 40) <= 0.02 * 3200
    assert (to_mask(result) == masks.any(axis=0)).all()
    empty = PolygonsResult(Task.REGION_TO_SEGMENTATION, SIZE, raw="")
    assert to_masks(empty).shape == (0, 120, 200)


def test_mask_ignores_degenerate_and_outside_polygons():
    line = np.array([[0, 0], [10, 10]])
    outside = np.array([[500, 500], [600, 500], [600, 600]])
    assert not polygons_to_mask([line, outside], SIZE).any()


def test_cutout_keeps_only_the_masked_pixels():
    image = Image.new("RGB", SIZE, (10, 200, 30))
    mask = np.zeros((120, 200), bool)
    mask[20:40, 50:90] = True
    piece = cutout(image, mask)
    assert piece.mode == "RGBA" and piece.size == (40, 20)
    assert piece.getpixel((0, 0)) == (10, 200, 30, 255)
    full = cutout(image, mask, crop=False)
    assert full.size == SIZE and full.getpixel((0, 0))[3] == 0
    assert cutout(image, np.zeros((120, 200), bool)).size == (1, 1)
    with pytest.raises(ValueError, match="mask is 10x10 but the image is 200x120"):
        cutout(image, np.zeros((10, 10), bool))


def test_coco_round_trip_of_boxes():
    result = boxes_result(scores=np.array([0.9, 0.5, 0.1], np.float32))
    categories = coco_categories(result.labels)
    assert categories == {"car": 1, "sky": 2}
    annotations = to_coco(result, image_id=7, categories=categories, first_id=100)
    assert [a["id"] for a in annotations] == [100, 101, 102]
    assert [a["category_id"] for a in annotations] == [1, 2, 1]
    assert annotations[0]["bbox"] == [10.0, 20.0, 40.0, 60.0]
    assert annotations[0]["area"] == 2400.0
    assert all(a["image_id"] == 7 for a in annotations)
    back = from_coco(annotations, {v: k for k, v in categories.items()}, SIZE)
    assert back.labels == result.labels
    np.testing.assert_allclose(back.boxes, result.boxes, atol=1e-4)
    np.testing.assert_allclose(back.scores, result.scores)
    coco_list = [{"id": 1, "name": "car"}, {"id": 2, "name": "sky"}]
    assert from_coco(annotations, coco_list, SIZE).labels == result.labels


def test_coco_without_scores_and_new_labels():
    annotations = to_coco(boxes_result(), categories={"sky": 5})
    assert [a["category_id"] for a in annotations] == [6, 5, 6]
    assert "score" not in annotations[0]
    assert from_coco(annotations, {5: "sky", 6: "car"}, SIZE).scores is None


def test_coco_polygons_and_ocr():
    annotations = to_coco(polygons_result())
    assert annotations[0]["bbox"] == [0.0, 0.0, 100.0, 100.0]
    assert annotations[0]["area"] == pytest.approx(5000)
    assert len(annotations[1]["segmentation"]) == 2
    assert annotations[1]["area"] == pytest.approx(3200)
    quads = np.array([[[10, 10], [90, 10], [90, 30], [10, 30]]], np.float32)
    ocr = OCRResult(Task.OCR_WITH_REGION, SIZE, raw="", quads=quads, texts=["EXIT"])
    (annotation,) = to_coco(ocr)
    assert annotation["text"] == "EXIT"
    assert annotation["bbox"] == [10.0, 10.0, 80.0, 20.0]
    assert annotation["segmentation"] == [[10, 10, 90, 10, 90, 30, 10, 30]]


def test_to_supervision_names_the_extra_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "supervision", None)
    with pytest.raises(ImportError, match=r'pip install "florence-helpers\[supervision\]"'):
        to_supervision(boxes_result())


def test_to_supervision_gives_real_detections_with_names_scores_and_masks():
    sv = pytest.importorskip("supervision")  # in the dev extra; pure NumPy, no OpenCV needed
    detections = to_supervision(boxes_result(scores=np.array([0.9, 0.5, 0.1])))
    assert isinstance(detections, sv.Detections) and len(detections) == 3
    np.testing.assert_allclose(detections.xyxy, boxes_result().boxes)
    assert detections.class_id.tolist() == [0, 1, 0]
    assert detections.data["class_name"].tolist() == ["car", "sky", "car"]
    assert detections.confidence.tolist() == pytest.approx([0.9, 0.5, 0.1])
    # supervision's own tools take them: filtering by confidence keeps names aligned.
    confident = detections[detections.confidence > 0.3]
    assert confident.data["class_name"].tolist() == ["car", "sky"]

    masks = to_supervision(polygons_result())
    assert masks.mask.shape == (2, 120, 200) and masks.confidence is None
    np.testing.assert_array_equal(masks.mask, to_masks(polygons_result()))
    np.testing.assert_allclose(masks.xyxy[1], [150, 10, 190, 110])
    canvas = np.zeros((120, 200, 3), np.uint8)
    drawn = sv.MaskAnnotator().annotate(canvas.copy(), masks)
    assert drawn.shape == canvas.shape and (drawn != canvas).any()


def test_to_coco_writes_a_reversed_box_with_a_positive_width():
    """A box given corner-last-first (x2 < x1, y2 < y1) is the same box; COCO's width and height
    are never negative."""
    reversed_box = BoxesResult(
        Task.OD, (100, 100), raw="", boxes=np.array([[30.0, 60.0, 10.0, 20.0]]), labels=["cat"]
    )
    (annotation,) = to_coco(reversed_box)
    assert annotation["bbox"] == [10.0, 20.0, 20.0, 40.0]
    assert annotation["area"] == 800.0


def test_a_mask_is_drawn_a_strip_at_a_time_with_the_same_pixels(monkeypatch):
    # One polygon over a 40-megapixel image took 1.8 GB (45 bytes a pixel of its box) in
    # one pass (twelfth hostile review).
    import tracemalloc

    import florence_helpers.drawing.conversions as conversions

    rng = np.random.default_rng(5)
    star = rng.uniform(0, 300, size=(12, 2))
    whole = polygons_to_mask([star], (300, 300))
    monkeypatch.setattr(conversions, "_CENTRES_AT_ONCE", 1000)  # strips of 3 rows
    assert np.array_equal(polygons_to_mask([star], (300, 300)), whole)
    monkeypatch.undo()
    cover = np.array([[0, 0], [4000, 0], [4000, 2500], [0, 2500]])
    tracemalloc.start()
    try:
        mask = polygons_to_mask([cover], (4000, 2500))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mask.all() and peak < 120e6  # one pass: about 450 MB


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (100_000, 100_000)])
def test_a_mask_of_no_pixels_or_more_than_any_image_is_refused(size):
    with pytest.raises(ValueError, match="at least 1x1 and at most"):
        polygons_to_mask([np.array([[0, 0], [5, 0], [5, 5]])], size)
