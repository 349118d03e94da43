"""Training samples and their targets in Florence-2's grammar: :class:`TrainingSample`,
:class:`TrainingSet`, and the problems a reader collects (:class:`AnnotationError`).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..language.prompts import build_prompt
from ..language.regions import box_to_loc_tokens
from ..language.tasks import Task, TaskSpec

Box = tuple[float, float, float, float]


OnError = Literal["raise", "skip"]


class AnnotationError(ValueError):
    """Raised for annotations that cannot become training samples. Lists every problem."""

    def __init__(self, problems: Sequence[AnnotationProblem]) -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:20])
        more = len(self.problems) - 20
        super().__init__(
            f"{len(self.problems)} bad annotation(s):\n{shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nFix them, or pass on_error='skip' to leave those samples out."
        )


@dataclass(frozen=True)
class AnnotationProblem:
    """One bad annotation: where it is and what is wrong."""

    sample_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.sample_id}: {self.reason}"


@dataclass(frozen=True)
class TrainingSample:
    """One image with a task prompt and the answer Florence-2 should learn to write.

    Attributes:
        sample_id: Where the sample came from, e.g. ``"annotations.json image 7"``.
        image: The image file.
        image_size: ``(width, height)`` of the upright image.
        task: The task (a :class:`Task`, or the :class:`TaskSpec` of a custom task).
        prompt: The task prompt, e.g. ``"<OD>"`` or ``"<OPEN_VOCABULARY_DETECTION>a cat"``.
        target: The answer, e.g. ``"cat<loc_10><loc_20><loc_500><loc_600>"``.
        labels: The ground-truth label of each box (for evaluation).
        boxes: The ground-truth boxes ``(x1, y1, x2, y2)`` in pixels (for evaluation).
        text: The text a grounding prompt or a question carries, if any.
        region: The region a ``REGION_TO_CATEGORY`` prompt carries, if any.
        answers: Every accepted answer of a question (the target is the first), for
            evaluation.
    """

    sample_id: str
    image: Path
    image_size: tuple[int, int]
    task: Task | TaskSpec
    prompt: str
    target: str
    labels: tuple[str, ...] = ()
    boxes: tuple[Box, ...] = ()
    text: str | None = None
    region: Box | None = None
    answers: tuple[str, ...] = ()


@dataclass
class TrainingSet:
    """Samples read from a dataset, and the problems found in it.

    Behaves like a list of :class:`TrainingSample` (``len``, indexing, iteration).
    """

    samples: list[TrainingSample]
    problems: list[AnnotationProblem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> TrainingSample:
        return self.samples[index]

    def __iter__(self) -> Iterator[TrainingSample]:
        return iter(self.samples)

    def split(self, validation: float = 0.2, *, seed: int = 0) -> tuple[TrainingSet, TrainingSet]:
        """Split into training and validation sets by image, so no image is in both.

        Args:
            validation: Share of the images that go to the validation set.
            seed: Seed for the shuffle; the same seed gives the same split.

        Example:
            >>> train, val = dataset.split(0.25)  # doctest: +SKIP
        """
        if not 0 <= validation < 1:
            raise ValueError(f"validation must be in [0, 1), got {validation}.")
        images = sorted({sample.image for sample in self.samples})
        random.Random(seed).shuffle(images)
        held_out = set(images[: round(len(images) * validation)])
        return (
            TrainingSet([s for s in self.samples if s.image not in held_out], self.problems),
            TrainingSet([s for s in self.samples if s.image in held_out], []),
        )


def detection_target(labels: Sequence[str], boxes: Sequence[Box], image_size: Sequence[int]) -> str:
    """Write labelled boxes as a Florence-2 detection answer: each label once, then its boxes.

    Boxes are taken in reading order (top to bottom, then left to right), so the same objects
    always give the same target; a label comes where its first box does, followed by all of its
    boxes. That is the grammar's grouped form, and the one Florence-2's own generation settings
    can write back: under ``no_repeat_ngram_size=3`` (Microsoft's checkpoints) a label of three
    or more tokens, such as "traffic light", could not be written a second time.

    Example:
        >>> detection_target(["dog", "cat"], [(50, 50, 90, 90), (0, 0, 40, 40)], (100, 100))
        'cat<loc_0><loc_0><loc_400><loc_400>dog<loc_500><loc_500><loc_900><loc_900>'
        >>> detection_target(["cat", "dog", "cat"], [(0, 0, 9, 9), (20, 0, 29, 9), (0, 50, 9, 59)],
        ...                  (100, 100))  # doctest: +NORMALIZE_WHITESPACE
        'cat<loc_0><loc_0><loc_90><loc_90><loc_0><loc_500><loc_90><loc_590>dog<loc_200><loc_0><loc_290><loc_90>'
    """
    pairs = sorted(zip(labels, boxes, strict=True), key=lambda pair: (pair[1][1], pair[1][0]))
    groups: dict[str, list[str]] = {}
    for label, box in pairs:
        groups.setdefault(label, []).append(box_to_loc_tokens(box, image_size))
    return "".join(label + "".join(locs) for label, locs in groups.items())


def grounding_target(phrase: str, boxes: Sequence[Box], image_size: Sequence[int]) -> str:
    """Write a phrase and its boxes as a grounding answer: the phrase, then every box.

    Example:
        >>> grounding_target("a cat", [(0, 0, 40, 40)], (100, 100))
        'a cat<loc_0><loc_0><loc_400><loc_400>'
    """
    ordered = sorted(boxes, key=lambda box: (box[1], box[0]))
    return phrase + "".join(box_to_loc_tokens(box, image_size) for box in ordered)


def _sample(
    sample_id: str,
    image: Path,
    size: tuple[int, int],
    task: Task,
    labels: Sequence[str],
    boxes: Sequence[Box],
    text: str | None = None,
    region: Box | None = None,
) -> TrainingSample:
    """A sample with its prompt and target written for ``task``."""
    if task is Task.OD:
        prompt, target = build_prompt(task, size), detection_target(labels, boxes, size)
    elif task is Task.REGION_TO_CATEGORY:
        prompt = build_prompt(task, size, region=region)
        target = labels[0] + box_to_loc_tokens(region, size)  # label, then the region echoed
    else:
        prompt, target = build_prompt(task, size, text=text), grounding_target(text, boxes, size)
    return TrainingSample(
        sample_id=sample_id,
        image=image,
        image_size=size,
        task=task,
        prompt=prompt,
        target=target,
        labels=tuple(labels),
        boxes=tuple(boxes),
        text=text,
        region=region,
    )


class _BadAnnotation(ValueError):
    """An annotation problem found while reading one sample."""


def _finish(
    samples: list[TrainingSample], problems: list[AnnotationProblem], on_error: OnError
) -> TrainingSet:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    if problems and on_error == "raise":
        raise AnnotationError(problems)
    if problems:
        listed = "; ".join(str(p) for p in problems[:5])
        warnings.warn(
            f"Skipped {len(problems)} bad annotation(s) (see .problems): {listed}"
            + (" ..." if len(problems) > 5 else ""),
            stacklevel=3,
        )
    return TrainingSet(samples, problems)
