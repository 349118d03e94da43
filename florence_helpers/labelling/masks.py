"""SAM 2 masks in label files: each record's boxes get a run-length encoded mask.

``label(..., sam=load_sam())`` (``label --masks sam2`` on the command line) hands every
record's Florence-2 boxes to SAM 2 and writes ``"masks"`` (one COCO run-length encoding per
box, ``{"size": [height, width], "counts": "..."}``) and ``"mask_scores"`` (SAM 2's estimate
of each mask's IoU) beside ``"result"``. The job line names the SAM 2 checkpoint, so a label
file never mixes records with and without masks, or from two SAM 2 checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..language.prompts import TaskInputError
from ..language.results import BoxesResult
from ..language.tasks import ResultKind, TaskSpec
from ..masks.prompts import mask_at_size, mask_logits
from ..masks.results import rle_runs, to_rle
from ..masks.sam import SamModel
from .files import model_key, weights_key

MASK_KINDS = ("sam2",)
"""What ``label --masks`` accepts."""


def masks_job(sam: SamModel | None) -> dict[str, Any] | None:
    """How a job's masks are made, as its job line records it (None: no masks)."""
    return None if sam is None else planned_masks_job(sam.model_id, sam.dtype)


def planned_masks_job(model_id: str, dtype: Any) -> dict[str, Any]:
    """:func:`masks_job` for a SAM 2 model not loaded yet: its id and the dtype it will have."""
    return {
        "kind": "sam2",
        "model": model_key(model_id),
        "weights": weights_key(model_id),
        "dtype": str(dtype).removeprefix("torch."),
    }


def check_masks_task(spec: TaskSpec, classes: Sequence[str] | None) -> None:
    """Refuse masks for a task that answers with no boxes, before anything runs.

    Raises:
        TaskInputError: The task's answers are text, polygons or OCR regions.
    """
    if classes is None and spec.result is not ResultKind.BOXES:
        raise TaskInputError(
            f"Masks are drawn from boxes, and {spec.name} answers with {spec.result.value}: "
            "use OD, DENSE_REGION_CAPTION, REGION_PROPOSAL, CAPTION_TO_PHRASE_GROUNDING, "
            "OPEN_VOCABULARY_DETECTION or --classes."
        )


def mask_fields(sam: SamModel, image: Any, result: BoxesResult) -> dict[str, Any]:
    """``masks`` and ``mask_scores`` for one record: one per box, in the boxes' order, each
    encoded as soon as it is made (one mask at the image's size held at a time)."""
    masks, scores = [], []
    for logits, quality in mask_logits(sam, image, np.asarray(result.boxes, dtype=np.float32)):
        masks += [to_rle(mask_at_size(logit, image.size)) for logit in logits]
        scores += [round(float(q), 6) for q in quality]
    return {"masks": masks, "mask_scores": scores}


def masks_problem(entry: dict[str, Any]) -> str | None:
    """What is wrong with a record's ``masks`` and ``mask_scores`` (None if nothing or none):
    read back from a file, they are outside input."""
    masks, scores = entry.get("masks"), entry.get("mask_scores")
    if masks is None and scores is None:
        return None
    if not isinstance(masks, list) or not isinstance(scores, list) or len(masks) != len(scores):
        return "its masks and mask_scores are not two lists of one length"
    result = entry.get("result")
    boxes = result.get("boxes") if isinstance(result, dict) else None
    if isinstance(boxes, list) and len(boxes) != len(masks):
        return f"it holds {len(masks)} masks for {len(boxes)} boxes"
    size = [entry.get("height"), entry.get("width")]
    for mask in masks:
        if not isinstance(mask, dict) or mask.get("size") != size:
            return "a mask is not a run-length encoding of the image's size"
        if (
            rle_runs(mask.get("counts")) is None
            or sum(rle_runs(mask["counts"])) != size[0] * size[1]
        ):
            return "a mask's counts are not a run-length encoding of the image's pixels"
    if not all(_is_number(score) for score in scores):
        return "its mask_scores are not numbers"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
