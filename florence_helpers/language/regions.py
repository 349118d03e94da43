"""Pixel coordinates to Florence-2 ``<loc_N>`` tokens and back.

Florence-2 writes every coordinate as one of 1000 location tokens per axis. The native
processor maps a pixel value ``v`` on an axis of ``size`` pixels to bin
``floor(v / (size / 1000))`` clamped to 0..999, and a bin back to the bin's centre,
``(bin + 0.5) * size / 1000``, truncated to a whole pixel. The functions here repeat that
arithmetic (in float32, as the processor's torch code does) so that they agree with it exactly.

:func:`box_iou` compares boxes (overlap over union), for detection and evaluation alike.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Sequence
from typing import Any

import numpy as np

NUM_BINS = 1000
LOC_TOKEN = re.compile(r"<loc_(\d+)>")
"""One location token, ``<loc_N>``; group 1 is its bin. The package's only pattern for it."""


class RegionError(ValueError):
    """Raised for a region that is malformed or lies outside the image."""


def _values_and_bin_size(values: object, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Values as float32 (the processor's precision) and the pixel width of a bin per column."""
    array = np.asarray(values, dtype=np.float32)
    if array.shape[-1] not in (2, 4):
        raise RegionError(f"Expected x, y pairs or x1, y1, x2, y2 boxes, got shape {array.shape}.")
    width, height = size
    per_bin = np.array([width / NUM_BINS, height / NUM_BINS], dtype=np.float32)
    return array, np.tile(per_bin, array.shape[-1] // 2)


def quantize(points: np.ndarray | Sequence[float], image_size: Sequence[int]) -> np.ndarray:
    """Map pixel coordinates to location bins, exactly as the Florence-2 processor does.

    Args:
        points: Coordinates as ``x, y`` pairs: shape ``(..., 2)``, or ``(..., 4)`` for boxes.
        image_size: ``(width, height)`` of the image in pixels.

    Returns:
        Integer bins in 0..999 with the input's shape.

    Example:
        >>> quantize([10, 20, 300, 400], (640, 480)).tolist()
        [15, 41, 468, 833]
    """
    values, per_bin = _values_and_bin_size(points, image_size)
    bins = np.floor(values / per_bin)
    return np.clip(bins, 0, NUM_BINS - 1).astype(np.int64)


def dequantize(bins: np.ndarray | Sequence[int], image_size: Sequence[int]) -> np.ndarray:
    """Map location bins back to pixels (the bin centre, truncated like the processor does).

    Args:
        bins: Bins as ``x, y`` pairs: shape ``(..., 2)``, or ``(..., 4)`` for boxes.
        image_size: ``(width, height)`` of the image in pixels.

    Returns:
        Integer pixel coordinates with the input's shape.

    Example:
        >>> dequantize([15, 41, 468, 833], (640, 480)).tolist()
        [9, 19, 299, 400]
    """
    values, per_bin = _values_and_bin_size(bins, image_size)
    return ((values + np.float32(0.5)) * per_bin).astype(np.int64)


def check_box(box: Sequence[float], image_size: Sequence[int]) -> tuple[float, float, float, float]:
    """Check that ``box`` is ``(x1, y1, x2, y2)`` in pixels, non-empty and inside the image.

    Raises:
        RegionError: With what is wrong and the image size.
    """
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError, OverflowError):
        raise RegionError(
            f"A region must be four numbers (x1, y1, x2, y2) in pixels, got {_shown(box)}."
        ) from None
    width, height = image_size
    shown = "(" + ", ".join(f"{v:g}" for v in (x1, y1, x2, y2)) + ")"
    if not all(np.isfinite([x1, y1, x2, y2])):
        raise RegionError(f"Region {shown} contains a value that is not a finite number.")
    if x2 <= x1 or y2 <= y1:
        raise RegionError(
            f"Region {shown} is empty: it must be (x1, y1, x2, y2) with x1 < x2 and y1 < y2."
        )
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise RegionError(
            f"Region {shown} lies outside the {width}x{height} image: "
            f"x must be within 0..{width} and y within 0..{height}."
        )
    return x1, y1, x2, y2


def _shown(value: object) -> str:
    """``repr(value)`` cut to 80 characters; Python refuses to write integers of over 4300
    digits, so those are named instead of shown."""
    try:
        return reprlib.repr(value)[:80]
    except ValueError:
        return "(a value holding a number too large to write out)"


def box_to_loc_tokens(box: Sequence[float], image_size: Sequence[int]) -> str:
    """Write a pixel box as the four ``<loc_N>`` tokens a region task expects.

    Args:
        box: ``(x1, y1, x2, y2)`` in pixels of the original image.
        image_size: ``(width, height)`` of that image.

    Returns:
        A string such as ``"<loc_15><loc_41><loc_468><loc_833>"``.

    Raises:
        RegionError: The box is malformed, empty or outside the image.

    Example:
        >>> box_to_loc_tokens((10, 20, 300, 400), (640, 480))
        '<loc_15><loc_41><loc_468><loc_833>'
    """
    bins = quantize(check_box(box, image_size), image_size)
    return "".join(f"<loc_{b}>" for b in bins.tolist())


def loc_tokens_to_box(tokens: str, image_size: Sequence[int]) -> tuple[int, int, int, int]:
    """Read four ``<loc_N>`` tokens back as a pixel box (bin centres, like the processor).

    Example:
        >>> loc_tokens_to_box("<loc_15><loc_41><loc_468><loc_833>", (640, 480))
        (9, 19, 299, 400)
    """
    bins = [int(b) for b in LOC_TOKEN.findall(tokens)]
    if len(bins) != 4 or any(b >= NUM_BINS for b in bins):
        raise RegionError(
            f"Expected exactly four tokens <loc_0>..<loc_{NUM_BINS - 1}>, got {tokens!r}."
        )
    x1, y1, x2, y2 = dequantize(bins, image_size).tolist()
    return x1, y1, x2, y2


def xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    """Corners ``(x1, y1, x2, y2)`` to COCO's ``[x, y, width, height]``.

    Example:
        >>> xyxy_to_xywh((10, 20, 30, 60))
        [10.0, 20.0, 20.0, 40.0]
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """COCO's ``[x, y, width, height]`` to corners ``(x1, y1, x2, y2)``.

    Example:
        >>> xywh_to_xyxy([10, 20, 20, 40])
        [10.0, 20.0, 30.0, 60.0]
    """
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def box_iou(a: Any, b: Any) -> np.ndarray:
    """IoU of every box in ``a`` (N x 4, x1 y1 x2 y2) with every box in ``b`` (M x 4).

    Example:
        >>> box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [20, 20, 30, 30]]).round(3).tolist()
        [[0.333, 0.0]]
    """
    a = np.asarray(a, dtype=float).reshape(-1, 4)
    b = np.asarray(b, dtype=float).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
