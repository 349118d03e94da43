"""Masks from words: Florence-2's boxes as SAM 2 prompts, through the real model classes.

The tiny SAM 2 (random weights) draws noise; what is checked does not depend on it: boxes
reach SAM 2 in its input frame as transformers' own ``Sam2Processor`` puts them there, the
image is prepared as Pillow resizes it, masks come back at the image's size and in the
instances' order, and the COCO masks decode with pycocotools to the same pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.sam2.processing_sam2 import Sam2Processor

from florence_helpers import BoxesResult, ModelNotAvailableError, Task, TaskInputError, run
from florence_helpers.masks import MasksResult, load_sam, plot_masks, segment, torchvision_works
from florence_helpers.masks.prompts import box_tensor, image_tensor, masks_at_size, predict_masks
from florence_helpers.testing import build_tiny_sam, force_answers


@pytest.fixture(scope="module")
def sam(tmp_path_factory, device):
    return load_sam(build_tiny_sam(tmp_path_factory.mktemp("sam") / "tiny"), device=device)


@pytest.fixture
def street() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (180, 320, 3), dtype=np.uint8))


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    corners=st.lists(st.floats(0, 1), min_size=4, max_size=4),
    side=st.sampled_from([128, 1024]),
)
def test_boxes_reach_sam_in_the_frame_sam2_processor_puts_them(width, height, corners, side):
    x1, y1, x2, y2 = corners
    box = np.array([[x1 * width, y1 * height, x2 * width, y2 * height]], dtype=np.float32)
    theirs = Sam2Processor._normalize_coordinates(
        None, side, torch.tensor(box), (height, width), is_bounding_box=True
    )
    ours = box_tensor(box, (width, height), side)
    torch.testing.assert_close(ours[0], theirs, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("size", [(320, 180), (97, 211), (1024, 1024), (40, 30)])
def test_the_image_is_resized_as_pillow_does_then_normalised_with_imagenet_statistics(size):
    # torch's antialiased bilinear resize is built to match Pillow's (an independent reference).
    rng = np.random.default_rng(size[0])
    picture = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    ours = image_tensor(picture, 128)
    assert ours.shape == (1, 3, 128, 128) and ours.dtype == torch.float32
    resized = np.asarray(picture.resize((128, 128), Image.BILINEAR), dtype=np.float32) / 255
    expected = (resized - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    difference = np.abs(ours[0].permute(1, 2, 0).numpy() - expected)
    assert difference.max() <= 1.01 / 255 / 0.224  # one grey level apart at most
    assert difference.mean() < 0.5 / 255 / 0.224  # rounding apart; nearest or no antialias: >10


def test_masks_come_back_at_the_image_size_in_the_order_of_the_logits():
    logits = torch.full((3, 8, 8), -5.0)
    logits[0, :4, :4] = 5.0  # top left
    logits[1, 4:, 4:] = 5.0  # bottom right
    masks = masks_at_size(logits, (30, 20))
    assert masks.shape == (3, 20, 30) and masks.dtype == bool
    assert masks[0, 0, 0] and not masks[0, -1, -1]
    assert masks[1, -1, -1] and not masks[1, 0, 0]
    assert not masks[2].any()


def test_each_box_gets_its_own_mask_in_order_and_the_batching_changes_nothing(
    sam, street, monkeypatch
):
    import florence_helpers.masks.prompts as prompts

    boxes = np.array([[10, 10, 100, 90], [150, 20, 300, 170], [0, 0, 320, 180]], np.float32)
    masks, quality = predict_masks(sam, street, boxes)
    assert masks.shape == (3, 180, 320) and quality.shape == (3,)
    backwards, _ = predict_masks(sam, street, boxes[::-1])
    monkeypatch.setattr(prompts, "BOXES_PER_PASS", 1)
    one_by_one, _ = predict_masks(sam, street, boxes)
    for other in (backwards[::-1], one_by_one):
        assert (other != masks).mean() < 1e-3  # identical but for logits at 0 +- float noise


def test_segment_gives_one_mask_per_florence_box_with_its_label(florence, sam, street):
    answer = "car<loc_31><loc_55><loc_312><loc_500>person<loc_468><loc_111><loc_937><loc_944>"
    forced = {"num_beams": 1, "logits_processor": force_answers(florence.processor, answer)}
    found = segment(florence, sam, street, task="OD", **forced)
    boxes = run(florence, street, "OD", **forced)
    assert isinstance(found, MasksResult)
    assert found.labels == ["car", "person"] and len(found) == 2
    assert found.masks.shape == (2, 180, 320)
    np.testing.assert_array_equal(found.boxes, boxes.boxes)  # inside the image: unchanged
    assert found.query == "OD" and not found.truncated
    assert found[1:].labels == ["person"] and found[1:].masks.shape == (1, 180, 320)


def test_a_phrase_goes_through_phrase_grounding(florence, sam, street):
    answer = "the red car<loc_31><loc_55><loc_312><loc_500>"
    found = segment(
        florence,
        sam,
        street,
        "the red car",
        num_beams=1,
        logits_processor=force_answers(florence.processor, answer),
    )
    assert found.labels == ["the red car"] and found.query == "the red car"


def test_nothing_found_is_an_empty_result(florence, sam, street):
    found = segment(
        florence,
        sam,
        street,
        "a unicorn",
        num_beams=1,
        logits_processor=force_answers(florence.processor, ""),
    )
    assert len(found) == 0 and found.masks.shape == (0, 180, 320)
    assert found.to_coco() == [] and found.areas.tolist() == []


def test_coco_masks_decode_with_pycocotools_to_the_same_pixels(sam, street):
    from pycocotools import mask as coco_mask

    boxes = BoxesResult(
        Task.OD, street.size, raw="", boxes=np.array([[5, 5, 60, 50], [100, 40, 310, 170.0]]),
        labels=["cat", "dog"], scores=np.array([0.9, 0.4], dtype=np.float32),
    )  # fmt: skip
    found = segment(None, sam, street, boxes=boxes)
    annotations = json.loads(json.dumps(found.to_coco(image_id=7, categories={"dog": 3})))
    assert [a["category_id"] for a in annotations] == [4, 3]
    assert [a["score"] for a in annotations] == pytest.approx([0.9, 0.4])
    for annotation, mask in zip(annotations, found.masks, strict=True):
        rle = {**annotation["segmentation"]}
        rle["counts"] = rle["counts"].encode("ascii")
        np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), mask)
        assert annotation["area"] == int(mask.sum()) and annotation["image_id"] == 7
    assert found.areas.tolist() == [int(m.sum()) for m in found.masks]
    cut = found.cutouts(street, crop=False)
    assert [c.mode for c in cut] == ["RGBA", "RGBA"] and cut[0].size == street.size
    detections = found.to_supervision()
    assert detections.mask.shape == (2, 180, 320) and list(detections.data["class_name"]) == [
        "cat",
        "dog",
    ]


def test_the_plot_draws_masks_and_boxes(sam, street):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    boxes = BoxesResult(
        Task.OD, street.size, raw="", boxes=np.array([[5, 5, 60, 50.0]]), labels=["cat"]
    )
    found = segment(None, sam, street, boxes=boxes)
    ax = plot_masks(street, found)
    assert len(ax.images) == 2 and len(ax.patches) == 1 and ax.texts[0].get_text() == "cat"
    plt.close("all")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of phrase, classes, task or boxes"),
        ({"phrase": "a cat", "classes": ["cat"]}, "got phrase and classes"),
        ({"task": "CAPTION"}, "not boxes"),
        ({"phrase": "  "}, "words to find"),
        ({"boxes": [[1, 2, 3, 4]]}, "must be a BoxesResult"),
        (
            {"boxes": BoxesResult(Task.OD, (10, 10), raw="", boxes=np.ones((1, 4)), labels=["a"])},
            "for an image of 10x10 pixels",
        ),
        (
            {
                "boxes": BoxesResult(
                    Task.OD, (320, 180), raw="", boxes=np.full((1, 4), np.nan), labels=["a"]
                )
            },
            "NaN or infinite",
        ),
    ],
)
def test_wrong_requests_get_clear_errors(florence, sam, street, kwargs, message):
    with pytest.raises(TaskInputError, match=message):
        segment(florence, sam, street, **kwargs)


def test_loading_names_what_is_wrong(tmp_path, tiny_model_dir):
    with pytest.raises(ModelNotAvailableError, match="No SAM 2 checkpoint directory"):
        load_sam(tmp_path / "missing")
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        load_sam(tmp_path)
    with pytest.raises(ModelNotAvailableError, match="holds a florence2, not SAM 2"):
        load_sam(tiny_model_dir)  # a Florence-2 folder
    with pytest.raises(ValueError, match="device must be"):
        load_sam(tmp_path, device="banana")


@pytest.mark.skipif(not torchvision_works(), reason="torchvision does not import with this torch")
def test_sam2_processor_and_the_torch_path_give_the_same_tensors(sam, street):
    from florence_helpers.masks.prompts import sam_inputs
    from florence_helpers.masks.sam import SamModel

    assert sam.processor is not None
    boxes = np.array([[10, 10, 100, 90], [150, 20, 300, 170]], np.float32)
    theirs = sam_inputs(sam, street, boxes)
    ours = sam_inputs(SamModel(sam.model, None, sam.model_id), street, boxes)
    torch.testing.assert_close(ours["input_boxes"], theirs["input_boxes"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0)


@settings(max_examples=100, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    density=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_run_lengths_read_back_as_pycocotools_decodes_them(height, width, density, seed):
    from pycocotools import mask as coco_mask

    from florence_helpers.masks.results import rle_runs, to_rle

    mask = np.random.default_rng(seed).random((height, width)) < density
    rle = to_rle(mask)
    runs = rle_runs(rle["counts"])
    assert sum(runs) == height * width
    decoded = coco_mask.decode({**rle, "counts": rle["counts"].encode()})
    rebuilt = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)
    assert np.array_equal(rebuilt, decoded.ravel(order="F").astype(bool))


def test_more_mask_pixels_than_allowed_are_refused_before_any_are_made(sam, street, monkeypatch):
    # 100 boxes on a 3000x3000 image held 858 MiB of masks, twice at the peak (thirteenth
    # hostile review).
    import florence_helpers.masks.prompts as prompts

    monkeypatch.setattr(prompts, "MAX_MASK_PIXELS", 2 * 320 * 180)
    boxes = np.array([[10, 10, 100, 90]] * 3, np.float32)
    with pytest.raises(TaskInputError, match="3 masks of 320x180 pixels would take"):
        predict_masks(sam, street, boxes)
    assert predict_masks(sam, street, boxes[:2])[0].shape == (2, 180, 320)
