"""Masks from words: the typed result of :func:`~florence_helpers.masks.segment.segment`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..boundary.images import ImageSource, load_image
from ..boundary.inputs import DEFAULT_MAX_PIXELS
from ..drawing.conversions import coco_categories, cutout, supervision_module
from ..drawing.plotting import label_color
from ..language.regions import xyxy_to_xywh
from ..language.results import _Instances


@dataclass
class MasksResult(_Instances):
    """One mask per instance, with the Florence-2 box and label it came from.

    Select instances like a numpy array: ``result[result.mask_scores > 0.8]``, ``result[:3]``.

    Attributes:
        image_size: ``(width, height)`` of the image.
        masks: Boolean array ``(N, height, width)``.
        boxes: Florence-2's boxes ``(N, 4)``, ``x1, y1, x2, y2`` in pixels: SAM 2's prompts.
        labels: ``N`` labels from Florence-2 (the phrase or class found).
        scores: Florence-2's confidences ``(N,)`` where asked for (``scores=True``), else None.
        mask_scores: SAM 2's own estimate of each mask's IoU with the object ``(N,)``.
        query: What was looked for: the phrase, the class names, or the task.
        truncated: Florence-2's answer hit ``max_new_tokens``: instances may be missing.
    """

    image_size: tuple[int, int]
    masks: np.ndarray
    boxes: np.ndarray
    labels: list[str]
    mask_scores: np.ndarray
    scores: np.ndarray | None = None
    query: str | None = field(default=None, kw_only=True)
    truncated: bool = field(default=False, kw_only=True)
    _fields = ("masks", "boxes", "labels", "mask_scores", "scores")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def areas(self) -> np.ndarray:
        """Each mask's area in pixels ``(N,)``."""
        return self.masks.sum(axis=(1, 2)).astype(np.int64)

    def cutouts(self, image: ImageSource, *, crop: bool = True) -> list[Image.Image]:
        """Each instance cut out of ``image``: RGBA, transparent outside its mask."""
        picture = load_image(image)
        return [cutout(picture, mask, crop=crop) for mask in self.masks]

    def to_coco(
        self,
        *,
        image_id: int = 1,
        categories: Mapping[str, int] | None = None,
        first_id: int = 1,
    ) -> list[dict[str, Any]]:
        """COCO annotations with run-length encoded masks (``segmentation`` as pycocotools
        writes it: ``{"size": [height, width], "counts": "..."}``), the box as ``bbox``
        ``[x, y, width, height]`` and the mask's pixel count as ``area``.

        Args:
            image_id: The COCO image id to write.
            categories: Label to category id; labels not in it get new ids after the
                largest one (the dict itself is not changed).
            first_id: Annotation id of the first instance.

        Example:
            >>> json.dump(result.to_coco(image_id=7), file)  # doctest: +SKIP
        """
        ids = dict(categories or {})
        annotations = []
        for index, label in enumerate(self.labels):
            if label not in ids:
                ids[label] = max(ids.values(), default=0) + 1
            rle = to_rle(self.masks[index])
            annotation: dict[str, Any] = {
                "id": first_id + index,
                "image_id": image_id,
                "category_id": ids[label],
                "bbox": xyxy_to_xywh(self.boxes[index].tolist()),
                "area": rle_area(rle),
                "segmentation": rle,
                "iscrowd": 0,
                "mask_score": float(self.mask_scores[index]),
            }
            if self.scores is not None:
                annotation["score"] = float(self.scores[index])
            annotations.append(annotation)
        return annotations

    def to_supervision(self) -> Any:
        """The result as ``supervision.Detections`` with ``mask``, boxes and class names.

        Requires the optional ``supervision`` package.
        """
        sv = supervision_module()
        ids = coco_categories(self.labels)
        width, height = self.image_size
        return sv.Detections(
            xyxy=np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4),
            mask=self.masks.reshape(-1, height, width),
            class_id=np.asarray([ids[label] - 1 for label in self.labels], dtype=int),
            confidence=None if self.scores is None else np.asarray(self.scores, np.float32),
            data={"class_name": np.asarray(self.labels, dtype=str)},
        )


def to_rle(mask: np.ndarray) -> dict[str, Any]:
    """A boolean ``(height, width)`` mask run-length encoded as COCO writes it in JSON:
    ``{"size": [height, width], "counts": "..."}`` (pycocotools' compressed counts as text).

    Example:
        >>> to_rle(np.ones((2, 3), dtype=bool))
        {'size': [2, 3], 'counts': '06'}
    """
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def from_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """The boolean ``(height, width)`` mask of a COCO run-length encoding (from
    :func:`to_rle`, or a COCO file).

    Raises:
        ValueError: Not a run-length encoding of its size, or a size past
            :data:`~florence_helpers.boundary.inputs.DEFAULT_MAX_PIXELS`.
    """
    from pycocotools import mask as coco_mask

    encoded = _encoded(rle)
    height, width = encoded["size"]
    if height * width > DEFAULT_MAX_PIXELS:
        raise ValueError(f"A mask of {width}x{height} pixels is larger than any image decoded.")
    return coco_mask.decode(encoded).astype(bool)


def rle_runs(counts: Any) -> list[int] | None:
    """The runs of a compressed COCO run-length encoding (pycocotools' ``counts`` text), or
    None unless it is one: every run a whole number of at least 0.

    The runs alternate background and mask, starting with background; a mask of ``height x
    width`` pixels has runs that add up to exactly ``height * width``. Read as pycocotools'
    ``rleFrString`` reads them: six bits a character from ``'0'``, five of them value, the
    sixth "more", a sign bit in the last, each run after the second relative to the run
    two before.

    Example:
        >>> rle_runs(to_rle(np.array([[0, 1], [1, 1]], dtype=bool))["counts"])
        [1, 3]
    """
    if not isinstance(counts, str) or not counts.isascii():
        return None
    runs: list[int] = []
    at = 0
    while at < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if at >= len(counts):
                return None  # cut short in the middle of a run
            code = ord(counts[at]) - 48
            if not 0 <= code < 64:
                return None
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            at, shift = at + 1, shift + 5
            if not more and code & 0x10:
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
    return runs


def rle_area(rle: Mapping[str, Any]) -> int:
    """The pixels inside a COCO run-length encoded mask, without decoding it."""
    from pycocotools import mask as coco_mask

    return int(coco_mask.area(_encoded(rle)))


def _encoded(rle: Mapping[str, Any]) -> dict[str, Any]:
    """``rle`` as pycocotools takes it, its fields checked for type."""
    size, counts = rle.get("size"), rle.get("counts")
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)
        or not isinstance(counts, str | bytes)
    ):
        raise ValueError('A mask must be {"size": [height, width], "counts": "..."}.')
    return {
        "size": list(size),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def plot_masks(image: ImageSource, result: MasksResult, ax: Any = None, alpha: float = 0.5) -> Any:
    """Draw each mask over ``image`` in its label's colour, with its box and label.

    Args:
        image: The image the result belongs to.
        result: What :func:`~florence_helpers.masks.segment.segment` returned.
        ax: A matplotlib axes to draw on; a new figure's when None.
        alpha: Opacity of the masks.

    Returns:
        The axes.
    """
    import matplotlib.pyplot as plt

    picture = load_image(image)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 8 * picture.height / max(picture.width, 1)))
    overlay = np.zeros((picture.height, picture.width, 4), dtype=np.float32)
    for mask, label in zip(result.masks, result.labels, strict=True):
        overlay[mask] = (*(c / 255 for c in label_color(label)), alpha)
    ax.imshow(picture)
    ax.imshow(overlay)
    for box, label in zip(result.boxes, result.labels, strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        colour = tuple(c / 255 for c in label_color(label))
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=1.5))
        ax.text(x1, y1, label, color="white", fontsize=9, va="bottom", backgroundcolor=colour)
    ax.set_axis_off()
    return ax
