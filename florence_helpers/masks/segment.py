"""Masks from words: Florence-2 finds the boxes, SAM 2 segments each one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..boundary.images import ImageSource, load_image
from ..language.prompts import TaskInputError
from ..language.results import BoxesResult
from ..language.tasks import ResultKind, Task, TaskSpec, task_spec
from ..model.detection import detect
from ..model.inference import run
from ..model.loading import FlorenceModel
from .prompts import predict_masks
from .results import MasksResult
from .sam import SamModel


def segment(
    florence: FlorenceModel | None,
    sam: SamModel,
    image: ImageSource,
    phrase: str | None = None,
    *,
    classes: Sequence[str] | None = None,
    task: str | Task | TaskSpec | None = None,
    boxes: BoxesResult | None = None,
    **run_kwargs: Any,
) -> MasksResult:
    """One precise mask per instance that Florence-2 finds, drawn by SAM 2 from its box.

    Give exactly one of ``phrase``, ``classes``, ``task`` or ``boxes``.

    Args:
        florence: What :func:`~florence_helpers.load_model` returned (None with ``boxes``).
        sam: What :func:`~florence_helpers.masks.load_sam` returned.
        image: The image (path, URL, PIL image, ...).
        phrase: Words to find, through ``CAPTION_TO_PHRASE_GROUNDING`` ("the red car").
        classes: Class names, each found with open-vocabulary detection
            (:func:`~florence_helpers.detect`): ``["car", "person"]``.
        task: Any task whose answer is boxes: ``"OD"``, ``"DENSE_REGION_CAPTION"``,
            ``"REGION_PROPOSAL"``, or a grounding task with ``text=...``.
        boxes: A boxes result you already have, for this image.
        **run_kwargs: Passed to :func:`~florence_helpers.run` or
            :func:`~florence_helpers.detect` (``scores=True``, ``num_beams``, ``text``...).

    Returns:
        A :class:`MasksResult`, its instances in Florence-2's order; empty where nothing
        was found.

    Raises:
        TaskInputError: Not exactly one of the four, a task that gives no boxes, or boxes
            of another image's size.

    Example:
        >>> sam = load_sam()  # doctest: +SKIP
        >>> found = segment(florence, sam, "images/cat.jpg", "the cat")  # doctest: +SKIP
        >>> found.areas  # doctest: +SKIP
    """
    picture = load_image(image)
    chosen = _found_boxes(florence, picture, phrase, classes, task, boxes, run_kwargs)
    if chosen.image_size != picture.size:
        raise TaskInputError(
            f"The boxes are for an image of {chosen.image_size[0]}x{chosen.image_size[1]} "
            f"pixels, but this image is {picture.width}x{picture.height}."
        )
    prompts = _inside(chosen.boxes, picture.size)
    masks, quality = predict_masks(sam, picture, prompts)
    return MasksResult(
        image_size=picture.size,
        masks=masks,
        boxes=prompts,
        labels=list(chosen.labels),
        mask_scores=quality,
        scores=chosen.scores,
        query=chosen.query if chosen.query is not None else _query(task, chosen),
        truncated=chosen.truncated,
    )


def _found_boxes(
    florence: FlorenceModel | None,
    picture: Any,
    phrase: str | None,
    classes: Sequence[str] | None,
    task: str | Task | TaskSpec | None,
    boxes: BoxesResult | None,
    run_kwargs: dict[str, Any],
) -> BoxesResult:
    given = [name for name, value in _asked(phrase, classes, task, boxes) if value is not None]
    if len(given) != 1:
        raise TaskInputError(
            "segment needs exactly one of phrase, classes, task or boxes"
            + (f"; got {' and '.join(given)}." if given else ".")
        )
    if boxes is not None:
        if not isinstance(boxes, BoxesResult):
            raise TaskInputError(f"boxes must be a BoxesResult, got {type(boxes).__name__}.")
        return boxes
    if florence is None:
        raise TaskInputError("segment needs the Florence-2 model to find boxes from words.")
    if classes is not None:
        return detect(florence, picture, classes, **run_kwargs)
    if phrase is not None:
        if not isinstance(phrase, str) or not phrase.strip():
            raise TaskInputError("phrase must be words to find, e.g. 'the red car'.")
        run_kwargs = {**run_kwargs, "text": phrase}
        task = Task.CAPTION_TO_PHRASE_GROUNDING
    spec = task_spec(task)
    if spec.result is not ResultKind.BOXES:
        raise TaskInputError(
            f"{spec.name} answers with {spec.result.value}, not boxes: use OD, "
            "DENSE_REGION_CAPTION, REGION_PROPOSAL, CAPTION_TO_PHRASE_GROUNDING or "
            "OPEN_VOCABULARY_DETECTION."
        )
    return run(florence, picture, spec, **run_kwargs)


def _asked(*values: Any) -> list[tuple[str, Any]]:
    return list(zip(("phrase", "classes", "task", "boxes"), values, strict=True))


def _inside(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The boxes clipped to the image, as float32 ``(N, 4)``; non-finite corners refused."""
    array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(array).all():
        raise TaskInputError("The boxes hold NaN or infinite corners.")
    width, height = size
    return np.clip(array, 0, [width, height, width, height]).astype(np.float32)


def _query(task: Any, found: BoxesResult) -> str:
    return task_spec(task).name if task is not None else str(found.task)
