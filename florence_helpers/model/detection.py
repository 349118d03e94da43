"""Detect a list of classes at once: one open-vocabulary detection per class, merged."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, overload

import numpy as np
from tqdm.auto import tqdm

from ..boundary.images import ImageSource, load_image
from ..language.prompts import TaskInputError
from ..language.regions import box_iou
from ..language.results import BoxesResult
from ..language.tasks import Task
from .inference import run_tasks
from .loading import FlorenceModel

_TOKEN = re.compile(r"<[^<>\s]+>")  # <OD>, <loc_12>, </s>, <pad>: never part of a class name


@overload
def detect(
    florence: FlorenceModel, images: ImageSource, classes: Sequence[str], **kwargs: Any
) -> BoxesResult: ...


@overload
def detect(
    florence: FlorenceModel, images: list[ImageSource], classes: Sequence[str], **kwargs: Any
) -> list[BoxesResult]: ...


def detect(
    florence: FlorenceModel,
    images: ImageSource | list[ImageSource],
    classes: Sequence[str],
    *,
    scores: bool = False,
    nms_iou: float | None = None,
    num_beams: int = 3,
    max_new_tokens: int = 1024,
    progress: bool | None = None,
    **generate_kwargs: Any,
) -> BoxesResult | list[BoxesResult]:
    """Find every class of a list in an image: boxes labelled with the names you gave.

    Florence-2's ``OPEN_VOCABULARY_DETECTION`` looks for one phrase per call. This runs it
    once per class through :func:`~florence_helpers.model.inference.run_tasks`, so the image is
    encoded once however many classes there are, and merges the answers into one result.
    A box says nothing of how sure the model is that the class is there: ask for
    ``scores=True`` and filter on them (``result[result.scores > 0.5]``).

    Args:
        florence: What :func:`load_model` returned.
        images: One image, or a list of them (each gets its own result).
        classes: Class names or short phrases, e.g. ``["car", "person", "traffic light"]``.
            Repeats are dropped; surrounding spaces are ignored.
        scores: Attach a confidence to each box (see :mod:`florence_helpers.model.scores`).
        nms_iou: Per-class non-maximum suppression: of two boxes of the same class
            overlapping by more than this IoU, keep the one with the higher score. ``None``
            keeps every box. Scores are computed for it even when ``scores`` is False.
        num_beams, max_new_tokens: As for :func:`run`.
        progress: Show a progress bar over images; by default only for several images.
        **generate_kwargs: Passed on to ``model.generate``.

    Returns:
        A :class:`BoxesResult` (task ``OPEN_VOCABULARY_DETECTION``), boxes grouped by class
        in the order of ``classes``; a list of them for a list of images.

    Raises:
        TaskInputError: ``classes`` is empty, a string instead of a list, or holds an empty
            name or one with Florence-2's special tokens in it.

    Example:
        >>> result = detect(florence, "street.jpg", ["car", "person"], scores=True)
        ... # doctest: +SKIP
        >>> result.labels  # doctest: +SKIP
        ['car', 'car', 'person']
    """
    names = check_classes(classes)
    if nms_iou is not None and not 0 <= nms_iou <= 1:
        raise TaskInputError(f"nms_iou must be between 0 and 1, got {nms_iou}.")
    single = not isinstance(images, (list, tuple))
    loaded = [load_image(source) for source in ([images] if single else images)]
    requests = [(Task.OPEN_VOCABULARY_DETECTION, name) for name in names]
    show = progress if progress is not None else len(loaded) > 1
    results = []
    for image in tqdm(loaded, desc="detect", unit="img", disable=not show):
        answers = run_tasks(
            florence,
            image,
            requests,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            scores=scores or nms_iou is not None,
            **generate_kwargs,
        )
        merged = merge_detections(answers, names)  # type: ignore[arg-type]
        if nms_iou is not None:
            merged = non_max_suppression(merged, nms_iou)
            if not scores:
                merged = replace(merged, scores=None)
        results.append(merged)
    return results[0] if single else results


MAX_CLASSES = 256
"""The most class names one detection takes: each runs its own open-vocabulary query."""


def check_classes(classes: Sequence[str], max_classes: int = MAX_CLASSES) -> list[str]:
    """The class names, stripped and without repeats; a clear error for unusable ones (not
    text, empty, holding a Florence-2 token, more than ``max_classes``)."""
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise TaskInputError(
            f"classes must be a list of names such as ['car', 'person'], not {classes!r:.60}."
        )
    if not classes:
        raise TaskInputError("classes is empty: give at least one class name.")
    if len(classes) > max_classes:
        raise TaskInputError(
            f"{len(classes)} classes is more than the {max_classes} one detection takes: each "
            "class runs its own query. Split them into groups."
        )
    names = []
    for index, name in enumerate(classes):
        if not isinstance(name, str):
            raise TaskInputError(f"Class {index} must be text, got {name!r:.60}.")
        if not name.strip():
            raise TaskInputError(f"Class {index} is empty: every class needs a name.")
        token = _TOKEN.search(name)
        if token:
            raise TaskInputError(
                f"Class {name!r} contains the token {token.group(0)} (Florence-2 reads tokens "
                "like it as instructions): give only the words to look for."
            )
        names.append(name.strip())
    return list(dict.fromkeys(names))


def merge_detections(results: Sequence[BoxesResult], classes: Sequence[str]) -> BoxesResult:
    """One result from per-class detections: each box labelled with its class's name."""
    if not results:
        raise ValueError("No detections to merge.")
    boxes = np.concatenate([r.boxes for r in results]).reshape(-1, 4)
    labels = [name for r, name in zip(results, classes, strict=True) for _ in range(len(r))]
    scores = None
    if all(r.scores is not None for r in results):
        scores = np.concatenate([np.asarray(r.scores, dtype=np.float32) for r in results])
    return BoxesResult(
        Task.OPEN_VOCABULARY_DETECTION,
        results[0].image_size,
        raw="\n".join(r.raw for r in results),
        truncated=any(r.truncated for r in results),
        query=", ".join(classes),
        boxes=boxes.astype(np.float32),
        labels=labels,
        scores=scores,
    )


def non_max_suppression(result: BoxesResult, iou_threshold: float) -> BoxesResult:
    """Per label, drop each box that overlaps a higher-scored one by more than ``iou``.

    Boxes keep their order. Needs scores (``scores=True``).
    """
    if result.scores is None:
        raise ValueError("Non-maximum suppression needs scores: run with scores=True.")
    scores = np.asarray(result.scores)
    keep = np.zeros(len(result), dtype=bool)
    labels = np.asarray(result.labels, dtype=object)
    for label in dict.fromkeys(result.labels):
        members = np.flatnonzero(labels == label)
        kept: list[int] = []
        for index in members[np.argsort(-scores[members], kind="stable")]:
            if not kept or box_iou(result.boxes[index], result.boxes[kept]).max() <= iou_threshold:
                kept.append(int(index))
        keep[kept] = True
    return result[np.flatnonzero(keep)]
