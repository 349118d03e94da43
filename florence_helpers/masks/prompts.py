"""SAM 2's inputs and outputs, as ``Sam2Processor`` makes them, with or without torchvision.

``Sam2Processor`` (transformers 5) resizes every image to a square of the model's input side
(1024 pixels) with antialiased bilinear interpolation, keeping no aspect ratio and adding no
padding, rescales by 1/255 and normalises with ImageNet's mean and standard deviation; it
scales box corners by ``side / width`` and ``side / height`` into that square; and
``post_process_masks`` resizes the mask logits back to the image with bilinear interpolation
(``align_corners=False``) and keeps logits above 0. Its image processor imports torchvision,
which has no build for every CPU torch, so where it is missing the same steps run here in
torch alone (``torch.nn.functional.interpolate``, which torchvision itself calls).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..language.prompts import TaskInputError
from .sam import SamModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BOXES_PER_PASS = 32
"""Boxes decoded together: each adds its low-resolution mask logits and its attention."""
MAX_MASK_PIXELS = 2**30
"""The most mask pixels :func:`predict_masks` holds for one image (a byte each): 1 GB, 80
masks of a 12-megapixel photo."""


def image_tensor(image: Image.Image, side: int) -> torch.Tensor:
    """``pixel_values`` of shape ``(1, 3, side, side)`` for one RGB image, as
    ``Sam2ImageProcessor`` makes them (bilinear with antialiasing on uint8, rescale,
    normalise)."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))
    pixels = pixels.permute(2, 0, 1).unsqueeze(0).contiguous()
    resized = F.interpolate(
        pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False
    )
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (resized.float() / 255.0 - mean) / std


def box_tensor(boxes: np.ndarray, image_size: tuple[int, int], side: int) -> torch.Tensor:
    """``input_boxes`` of shape ``(1, N, 4)``: pixel boxes ``x1, y1, x2, y2`` of an image of
    ``image_size`` (width, height) scaled into SAM 2's ``side`` x ``side`` input."""
    width, height = image_size
    scale = torch.tensor([side / width, side / height, side / width, side / height])
    corners = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4)
    return (corners * scale)[None]


def sam_inputs(sam: SamModel, image: Image.Image, boxes: np.ndarray) -> dict[str, torch.Tensor]:
    """``pixel_values`` and ``input_boxes`` for one image: ``Sam2Processor``'s where it
    imports, else the same steps in torch (:func:`image_tensor`, :func:`box_tensor`)."""
    if sam.processor is not None:
        made = sam.processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
        return {"pixel_values": made["pixel_values"], "input_boxes": made["input_boxes"]}
    return {
        "pixel_values": image_tensor(image, sam.input_size),
        "input_boxes": box_tensor(boxes, image.size, sam.input_size),
    }


def masks_at_size(logits: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
    """Boolean masks ``(N, height, width)`` from low-resolution logits ``(N, h, w)``, as
    ``post_process_masks`` makes them, one at a time (all at once would hold N float images).
    """
    width, height = image_size
    masks = np.zeros((len(logits), height, width), dtype=bool)
    for index, logit in enumerate(logits):
        masks[index] = mask_at_size(logit, image_size)
    return masks


def mask_at_size(logit: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
    """One boolean ``(height, width)`` mask from its low-resolution logits ``(h, w)``."""
    width, height = image_size
    upsampled = F.interpolate(
        logit[None, None].float(), (height, width), mode="bilinear", align_corners=False
    )
    return (upsampled[0, 0] > 0).numpy()


@torch.inference_mode()
def mask_logits(
    sam: SamModel, image: Image.Image, boxes: np.ndarray
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Low-resolution mask logits ``(n, h, w)`` and SAM 2's predicted IoU ``(n,)``, for
    :data:`BOXES_PER_PASS` boxes at a time: the image is encoded once, each box decoded to one
    mask (``multimask_output=False``, as SAM 2's own predictor does for a box)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return
    inputs = sam_inputs(sam, image, boxes)
    pixel_values = inputs["pixel_values"].to(sam.device, sam.dtype)
    embeddings = sam.model.get_image_embeddings(pixel_values)
    for chunk in _chunks(inputs["input_boxes"].to(sam.device), BOXES_PER_PASS):
        output = sam.model(image_embeddings=embeddings, input_boxes=chunk, multimask_output=False)
        yield output.pred_masks[0, :, 0].cpu(), output.iou_scores[0, :, 0].float().cpu().numpy()


def predict_masks(
    sam: SamModel, image: Image.Image, boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One mask per box at the image's size, and SAM 2's predicted IoU for each.

    Raises:
        TaskInputError: The masks would hold more than :data:`MAX_MASK_PIXELS` pixels (a
            boolean each): ask for fewer boxes, or write them run-length encoded one at a time
            with ``label(..., sam=...)``.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    width, height = image.size
    if len(boxes) * width * height > MAX_MASK_PIXELS:
        raise TaskInputError(
            f"{len(boxes)} masks of {width}x{height} pixels would take "
            f"{len(boxes) * width * height / 2**30:.1f} GB, more than the "
            f"{MAX_MASK_PIXELS / 2**30:.0f} GB allowed: segment fewer boxes at a time "
            "(boxes=found[:20]), or label(..., sam=...), which writes each mask run-length "
            "encoded as it is made."
        )
    masks = np.zeros((len(boxes), height, width), dtype=bool)
    quality = np.zeros(len(boxes), dtype=np.float32)
    done = 0
    for logits, chunk_quality in mask_logits(sam, image, boxes):
        for logit in logits:
            masks[done] = mask_at_size(logit, image.size)
            done += 1
        quality[done - len(logits) : done] = chunk_quality
    return masks, quality


def _chunks(boxes: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, boxes.shape[1], size):
        yield boxes[:, start : start + size]
