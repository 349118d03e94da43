"""Fine-tuning data: read labelled images into (prompt, target) pairs in Florence-2's grammar.

Three formats are read:

* **COCO detection** (``images``, ``categories``, ``annotations`` with ``bbox`` as
  ``[x, y, width, height]``), what most labelling tools export. Each image becomes one ``<OD>``
  sample listing every object, or one open-vocabulary detection sample per category.
* **ms-swift grounding JSON lines**, in both of ms-swift's forms. Today's, from its guide
  https://github.com/modelscope/ms-swift/blob/main/docs/source_en/Customization/Custom-dataset.md
  (section "Grounding"): ``messages`` (or ``query``/``response``) with ``<ref-object>`` and
  ``<bbox>`` placeholders, and ``"objects": {"ref": [...], "bbox": [[x1, y1, x2, y2], ...],
  "bbox_type": "real"}`` (``real``: pixels, the default; ``norm1``: 0..1; ``norm1000``:
  0..1000 of the image's sides). And its 2024 Florence-2 guide's: ``query``, ``response``,
  ``"objects": [[label, [x1, y1, x2, y2]], ...]`` in pixels (or that list as a JSON string).
  A question with ``<ref-object>`` asks for the boxes of a phrase (grounding); a question with
  ``<bbox>`` asks for the label of a region (``<REGION_TO_CATEGORY>``).
* **Questions and answers** (document VQA and any free-text task): rows of image, question
  and answer from a JSON-lines or CSV file, or a Hugging Face ``datasets`` dataset
  (:func:`read_qa`). The answer is the target as written; the prompt is the task's token
  followed by the question.

Targets are written the way Florence-2 writes its answers: a label followed by four
``<loc_N>`` tokens per box, quantized by :func:`~florence_helpers.regions.box_to_loc_tokens`
exactly as the processor does.

The files come from outside, so every record is checked before it becomes a sample: types
exactly (a width is a whole number, not ``"64"``; a box is four finite numbers), ids unique,
counts consistent, images readable and not too large. Each bad record (a box outside its image,
a duplicate id, a line that is not JSON or not UTF-8...) is collected with its file and line or
record; the caller chooses to raise them all in one :class:`AnnotationError` or to skip those
samples with a warning. Nothing is dropped silently. A problem with the file as a whole (missing,
not JSON, the wrong kind of JSON) raises a ``FileNotFoundError`` or ``ValueError`` naming it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import numbers
import os
import random
import re
import stat
import struct
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps

from .images import ImageLoadError, decode_image, to_rgb, too_large_message
from .inputs import DEFAULT_MAX_PIXELS
from .outputs import OutputError, write_atomically
from .prompts import TaskInputError, build_prompt
from .regions import RegionError, box_to_loc_tokens, check_box, xywh_to_xyxy
from .tasks import InputKind, Task, TaskSpec, custom_task, task_spec

Box = tuple[float, float, float, float]
OnError = Literal["raise", "skip"]

_GROUNDING_TASKS = (Task.OPEN_VOCABULARY_DETECTION, Task.CAPTION_TO_PHRASE_GROUNDING)

DOCVQA = custom_task(
    "<DocVQA>", takes="text", description="answer a question about a document image"
)
"""The document-question prompt of the best-known Florence-2 fine-tuning tutorial: the token
``<DocVQA>`` followed by the question. Base checkpoints do not know it; fine-tuning teaches it."""
_EXIF_ORIENTATION = 0x0112
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_REF, _BOX = "<ref-object>", "<bbox>"  # ms-swift's placeholders
# What a whole image side is in each ms-swift bbox_type (None: pixels). The guide names "real"
# and "norm1"; "norm1000" is the scale ms-swift writes for Florence-2, read here as thousandths
# (ms-swift's own Template.normalize_bbox reads any value but "norm1" as pixels).
_BBOX_TYPES = {"real": None, "norm1": 1.0, "norm1000": 1000.0}
_SPECIAL_TOKEN = re.compile(r"</?[A-Za-z][\w-]*>")  # <loc_5>, </s>, <OD>, <ref-object>...
_BOM = b"\xef\xbb\xbf"
# What Pillow raises on a damaged or hostile file (its UnidentifiedImageError is an OSError).
_UNREADABLE = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
    MemoryError,
    RecursionError,
)


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


def read_coco(
    annotations: str | Path | Mapping[str, Any],
    images_dir: str | Path | None = None,
    *,
    task: str | Task = Task.OD,
    on_error: OnError = "raise",
) -> TrainingSet:
    """Read a COCO detection dataset as training samples.

    Args:
        annotations: Path to the COCO JSON file, or the loaded dict.
        images_dir: Folder the ``file_name`` entries are relative to; by default the JSON
            file's folder.
        task: ``OD`` gives one sample per image listing every object (images without objects
            teach the model to answer with nothing). ``OPEN_VOCABULARY_DETECTION`` or
            ``CAPTION_TO_PHRASE_GROUNDING`` give one sample per image and category present,
            prompted with the category name. ``REGION_TO_CATEGORY`` gives one sample per
            object, prompted with its box; the target is its category followed by the box, as
            Florence-2 answers.
        on_error: ``"raise"`` an :class:`AnnotationError` listing every bad annotation, or
            ``"skip"`` the images that have one, with a warning; they are in ``.problems``.

    Returns:
        A :class:`TrainingSet`.

    Raises:
        AnnotationError: Bad entries, with ``on_error="raise"``: an id that is not a whole
            number or a string, or that two images (or categories, or annotations) share; a
            width or height that is not the image's; a box that is not four finite numbers or
            not inside its image; an unknown image or category; an unusable image file.
        FileNotFoundError: The file cannot be read.
        ValueError: The file is not UTF-8 JSON with ``images``, ``categories`` and
            ``annotations`` lists.

    Example:
        >>> dataset = read_coco("shapes/annotations.json")  # doctest: +SKIP
        >>> dataset[0].target  # doctest: +SKIP
        'circle<loc_102><loc_215><loc_287><loc_479>square<loc_...>'
    """
    task = task_spec(task).task
    if task not in (Task.OD, Task.REGION_TO_CATEGORY, *_GROUNDING_TASKS):
        raise ValueError(
            f"COCO data can train OD, REGION_TO_CATEGORY or grounding "
            f"({', '.join(t.name for t in _GROUNDING_TASKS)}), not {task.name}."
        )
    dataset, source, root = _coco_file(annotations, images_dir)
    problems: list[AnnotationProblem] = []
    categories, unusable = _coco_categories(dataset["categories"], source, problems)
    images, shared = _coco_images(dataset["images"], source, problems)
    by_image: dict[Any, list[Mapping[str, Any]]] = {key: [] for key, _ in images}
    annotation_ids: Counter[Any] = Counter()
    for number, annotation in enumerate(dataset["annotations"]):
        if not isinstance(annotation, Mapping):
            problems.append(AnnotationProblem(f"{source} annotation #{number}", "not an object"))
            continue
        where = f"{source} annotation {_shown(annotation.get('id', f'#{number}'), plain=True)}"
        if _is_id(annotation.get("id")):
            annotation_ids[annotation["id"]] += 1
        image_id = annotation.get("image_id")
        if not _is_id(image_id):
            problems.append(AnnotationProblem(where, _id_error("image_id", image_id)))
        elif image_id in by_image:
            by_image[image_id].append(annotation)
        elif image_id not in shared:  # reported with its images
            problems.append(AnnotationProblem(where, f"unknown image_id {image_id!r}"))

    samples: list[TrainingSample] = []
    for key, entry in images:
        where = f"{source} image {key} ({_shown(entry.get('file_name'), plain=True)})"
        try:
            image_path = root / _coco_file_name(entry.get("file_name"))
            size = _checked_image_size(image_path, (entry.get("width"), entry.get("height")))
            objects = [_coco_object(a, categories, unusable, annotation_ids) for a in by_image[key]]
            labels = [label for label, _, _ in objects]
            boxes = [_coco_box(bbox, size, ann) for _, bbox, ann in objects]
            found = [
                _sample(sample_id, image_path, size, task, own_labels, own_boxes, text, region)
                for sample_id, own_labels, own_boxes, text, region in _per_sample(
                    task, where, labels, boxes
                )
            ]
        except (_BadAnnotation, RegionError, TaskInputError) as error:
            problems.append(AnnotationProblem(where, str(error)))
            continue
        samples += found
    return _finish(samples, problems, on_error)


def _coco_file(
    annotations: str | Path | Mapping[str, Any], images_dir: str | Path | None
) -> tuple[Mapping[str, Any], str, Path]:
    """The COCO dataset, a name for it in messages, and the folder its file names start from."""
    if isinstance(annotations, Mapping):
        dataset, source = annotations, "COCO data"
        root = Path(images_dir) if images_dir is not None else Path.cwd()
    else:
        path = Path(annotations).expanduser()
        dataset = _read_json(path)
        source = path.name
        root = Path(images_dir).expanduser() if images_dir is not None else path.parent
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"{source} is not a COCO detection file: it has no {key!r} list.")
    return dataset, source, root


def _coco_categories(
    entries: list[Any], source: str, problems: list[AnnotationProblem]
) -> tuple[dict[Any, str], dict[Any, str]]:
    """The category names by id, and why each unusable id is unusable (for its objects)."""
    categories: dict[Any, str] = {}
    unusable: dict[Any, str] = {}
    for number, category in enumerate(entries):
        where = f"{source} category #{number}"
        if not isinstance(category, Mapping) or "id" not in category or "name" not in category:
            # Its objects then have an unknown category, and their images are reported.
            problems.append(AnnotationProblem(where, "needs an 'id' and a 'name'"))
            continue
        key = category["id"]
        if not _is_id(key):
            problems.append(AnnotationProblem(where, _id_error("id", key)))
            continue
        if key in categories or key in unusable:
            problems.append(
                AnnotationProblem(where, f"id {key!r} is also another category's: ids must differ")
            )
            categories.pop(key, None)
            unusable[key] = "belongs to more than one category"
            continue
        try:
            categories[key] = _label(category["name"])
        except _BadAnnotation as error:
            problems.append(AnnotationProblem(where, f"name: {error}"))
            unusable[key] = "has an unusable name"
    return categories, unusable


def _coco_images(
    entries: list[Any], source: str, problems: list[AnnotationProblem]
) -> tuple[list[tuple[Any, Mapping[str, Any]]], set[Any]]:
    """The ``(id, entry)`` of the images with a usable id, and the ids two images share
    (which make both unusable)."""
    numbers_by_id: dict[Any, list[int]] = {}
    for number, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "id" not in entry:
            name = entry.get("file_name") if isinstance(entry, Mapping) else entry
            where = f"{source} image #{number} ({_shown(name, plain=True)})"
            problems.append(AnnotationProblem(where, "has no 'id'"))
        elif not _is_id(entry["id"]):
            where = f"{source} image #{number} ({_shown(entry.get('file_name'), plain=True)})"
            problems.append(AnnotationProblem(where, _id_error("id", entry["id"])))
        else:
            numbers_by_id.setdefault(entry["id"], []).append(number)
    images, shared = [], set()
    for key, found in numbers_by_id.items():
        if len(found) == 1:
            images.append((key, entries[found[0]]))
            continue
        shared.add(key)
        names = ", ".join(
            f"#{n} ({_shown(entries[n].get('file_name'), plain=True)})" for n in found
        )
        problems.append(
            AnnotationProblem(
                f"{source} image {key}",
                f"id {key!r} is given to {len(found)} images ({names}): their annotations "
                "cannot be told apart. Give each image its own id.",
            )
        )
    return images, shared


def _coco_object(
    annotation: Mapping[str, Any],
    categories: dict[Any, str],
    unusable: dict[Any, str],
    annotation_ids: Counter[Any],
) -> tuple[str, Any, str]:
    """An annotation's label, its bbox as given, and its name for messages."""
    ann = f"annotation {_shown(annotation.get('id'), plain=True)}"
    if not (annotation.get("id") is None or _is_id(annotation["id"])):
        raise _BadAnnotation(f"{ann}: {_id_error('id', annotation['id'])}")
    if annotation_ids[annotation.get("id")] > 1:
        raise _BadAnnotation(
            f"{ann}: {annotation_ids[annotation['id']]} annotations have this id; give each "
            "its own (were two exports merged?)"
        )
    category = annotation.get("category_id")
    if not _is_id(category):
        raise _BadAnnotation(f"{ann}: {_id_error('category_id', category)}")
    if category in unusable:
        raise _BadAnnotation(f"{ann}: category_id {category!r} {unusable[category]}")
    if category not in categories:
        raise _BadAnnotation(f"{ann}: unknown category_id {category!r}")
    return categories[category], annotation.get("bbox"), ann


def _coco_file_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _BadAnnotation(f"file_name must be the image's path, got {_shown(value)}")
    return value


def _coco_box(bbox: Any, size: tuple[int, int], ann: str) -> Box:
    """A COCO ``[x, y, w, h]`` as a checked ``(x1, y1, x2, y2)``."""
    corners = xywh_to_xyxy(_numbers(bbox, f"{ann}: bbox", "[x, y, width, height]"))
    try:
        return check_box(corners, size)
    except RegionError as error:
        raise _BadAnnotation(f"{ann}: {error}") from None


def _per_sample(
    task: Task, where: str, labels: list[str], boxes: list[Box]
) -> list[tuple[str, list[str], list[Box], str | None, Box | None]]:
    """How one image's objects split into samples for ``task``.

    Returns ``(sample_id, labels, boxes, text, region)`` per sample: ``OD`` one sample with
    every object, ``REGION_TO_CATEGORY`` one per object, grounding one per category present
    (in first-seen order).
    """
    if task is Task.OD:
        return [(where, labels, boxes, None, None)]
    if task is Task.REGION_TO_CATEGORY:
        return [
            (f"{where} object {n}", [label], [box], None, box)
            for n, (label, box) in enumerate(zip(labels, boxes, strict=True), start=1)
        ]
    return [
        (
            f"{where} {name!r}",
            [name] * labels.count(name),
            [b for label, b in zip(labels, boxes, strict=True) if label == name],
            name,
            None,
        )
        for name in dict.fromkeys(labels)
    ]


def read_grounding_jsonl(
    path: str | Path,
    images_dir: str | Path | None = None,
    *,
    grounding_task: str | Task = Task.OPEN_VOCABULARY_DETECTION,
    on_error: OnError = "raise",
) -> TrainingSet:
    """Read grounding data in ms-swift's JSON-lines formats (see the module's docstring).

    Each line holds one question about one image (``images``: one path). In today's form the
    question and answer are ``messages`` (a user message and the assistant's answer, after an
    optional system message) or ``query`` and ``response``, and ``objects`` is
    ``{"ref": [...], "bbox": [...], "bbox_type": ...}``: there must be exactly as many
    ``ref`` as ``<ref-object>`` placeholders and as many ``bbox`` as ``<bbox>``, as ms-swift
    fills them in order. In the 2024 form ``objects`` is ``[[label, [x1, y1, x2, y2]], ...]``
    in pixels, one label per line.

    A question with one ``<ref-object>`` becomes a grounding sample (prompt: the phrase,
    target: the phrase and every box of the answer); a question with one ``<bbox>`` becomes a
    ``REGION_TO_CATEGORY`` sample (prompt: the region, target: the answer's label followed by
    the region, as Florence-2 answers). Other questions (a caption with boxes in it, a click
    at a point) have no Florence-2 task and are reported.

    Args:
        path: The ``.jsonl`` file.
        images_dir: Folder that relative image paths are relative to; by default the file's
            folder.
        grounding_task: ``OPEN_VOCABULARY_DETECTION`` (as the ms-swift guide) or
            ``CAPTION_TO_PHRASE_GROUNDING``.
        on_error: ``"raise"`` or ``"skip"``, as in :func:`read_coco`. A line that is not
            UTF-8 or not JSON is one bad line; the others are read.

    Raises:
        AnnotationError: Bad lines, each named by its number (with ``on_error="raise"``).
        FileNotFoundError: The file cannot be read.

    Example:
        >>> data = read_grounding_jsonl("refcoco.jsonl")  # doctest: +SKIP
        >>> data[0].prompt  # doctest: +SKIP
        '<OPEN_VOCABULARY_DETECTION>bottom right sandwich'
    """
    grounding = task_spec(grounding_task).task
    if grounding not in _GROUNDING_TASKS:
        raise ValueError(
            f"grounding_task must be one of {', '.join(t.name for t in _GROUNDING_TASKS)}."
        )
    path = Path(path).expanduser()
    root = Path(images_dir).expanduser() if images_dir is not None else path.parent
    samples: list[TrainingSample] = []
    problems: list[AnnotationProblem] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for number, record in _json_lines(_read_bytes(path)):
        where = f"{path.name} line {number}"
        try:
            if isinstance(record, _BadAnnotation):
                raise record
            samples.append(_grounding_sample(record, where, root, sizes, grounding))
        except (_BadAnnotation, RegionError, TaskInputError) as error:
            problems.append(AnnotationProblem(where, str(error)))
    return _finish(samples, problems, on_error)


def _grounding_sample(
    record: Any, where: str, root: Path, sizes: dict[Path, tuple[int, int]], grounding: Task
) -> TrainingSample:
    """One line of grounding data as a sample."""
    if not isinstance(record, Mapping):
        raise _BadAnnotation(f"not a JSON object (got {type(record).__name__})")
    question, answer = _question_and_answer(record)
    images = record.get("images")
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or len(images) != 1:
        raise _BadAnnotation(f"images must hold one image path, got {_shown(images)}")
    image = _image_path(images[0], root)
    if image not in sizes:
        sizes[image] = _checked_image_size(image)
    size = sizes[image]
    objects = record.get("objects")
    if isinstance(objects, str):
        try:
            objects = json.loads(objects)
        except (ValueError, RecursionError) as error:
            raise _BadAnnotation(f"objects is not valid JSON ({error})") from None
    if isinstance(objects, Mapping):
        task, labels, boxes = _swift_objects(objects, question, answer, size, grounding)
    elif isinstance(objects, list):
        task, labels, boxes = _labelled_boxes(objects, question, size, grounding)
    else:
        raise _BadAnnotation(
            'objects must be {"ref": [...], "bbox": [[x1, y1, x2, y2], ...]} or '
            f"[[label, [x1, y1, x2, y2]], ...], got {_shown(objects)}"
        )
    if task is Task.REGION_TO_CATEGORY:
        return _sample(where, image, size, task, labels, boxes, region=boxes[0])
    return _sample(where, image, size, task, labels, boxes, text=labels[0])


def _question_and_answer(record: Mapping[str, Any]) -> tuple[str, str]:
    """The user's question and the assistant's answer of a one-question conversation."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise _BadAnnotation('messages must be a list of {"role": ..., "content": ...}')
        turns = [m for m in messages if m.get("role") != "system"]
        if [m.get("role") for m in turns] != ["user", "assistant"]:
            raise _BadAnnotation(
                "messages must be one user message and the assistant's answer (after an "
                "optional system message): Florence-2 answers one question per image; got roles "
                + _shown([m.get("role") for m in messages])
            )
        question, answer = turns[0].get("content"), turns[1].get("content")
    else:
        if record.get("history"):
            raise _BadAnnotation("has a history: Florence-2 answers one question per image")
        question, answer = record.get("query"), record.get("response", "")
    if not isinstance(question, str):
        raise _BadAnnotation(f"the question must be text, got {_shown(question)}")
    if answer is not None and not isinstance(answer, str):
        raise _BadAnnotation(f"the answer must be text, got {_shown(answer)}")
    return question, answer or ""


def _swift_objects(
    objects: Mapping[str, Any], question: str, answer: str, size: tuple[int, int], grounding: Task
) -> tuple[Task, list[str], list[Box]]:
    """The task, labels and boxes of ms-swift's ``{"ref", "bbox", "bbox_type"}`` objects.

    ms-swift (``Template._pre_tokenize``) fills each ``<ref-object>`` with the next ``ref``
    and each ``<bbox>`` with the next ``bbox``, question first; refs and boxes are not paired.
    """
    refs, boxes = objects.get("ref"), objects.get("bbox")
    refs, boxes = [] if refs is None else refs, [] if boxes is None else boxes
    if not isinstance(refs, list) or not isinstance(boxes, list):
        raise _BadAnnotation(f"objects' ref and bbox must be lists, got {_shown(dict(objects))}")
    bbox_type = objects.get("bbox_type") or "real"
    if not isinstance(bbox_type, str) or bbox_type not in _BBOX_TYPES:
        raise _BadAnnotation(
            "bbox_type must be 'real' (pixels), 'norm1' (0..1) or 'norm1000' (0..1000), "
            f"got {_shown(bbox_type)}"
        )
    image_ids = objects.get("image_id")
    if image_ids is not None and not (
        isinstance(image_ids, list) and all(type(i) is int and i == 0 for i in image_ids)
    ):
        raise _BadAnnotation(
            f"image_id must be all 0 (the line's one image), got {_shown(image_ids)}"
        )
    wanted = (question.count(_REF) + answer.count(_REF), question.count(_BOX) + answer.count(_BOX))
    if (len(refs), len(boxes)) != wanted:
        raise _BadAnnotation(
            f"objects has {len(refs)} ref and {len(boxes)} bbox, but the messages have "
            f"{wanted[0]} {_REF} and {wanted[1]} {_BOX}: each placeholder takes the next ref or "
            "bbox, so the counts must be equal"
        )
    labels = [_label(ref) for ref in refs]
    scale = _BBOX_TYPES[bbox_type]
    pixels = [_box(box, f"bbox {n}", size, scale) for n, box in enumerate(boxes, start=1)]
    asked = (question.count(_REF), question.count(_BOX))
    if asked == (1, 0):  # find a phrase: its boxes are the answer's
        others = sorted(set(labels[1:]) - {labels[0]})
        if others:
            raise _BadAnnotation(f"the answer names {others}, not only {labels[0]!r} asked for")
        if not pixels:
            raise _BadAnnotation(f"the answer has no {_BOX}")
        return grounding, [labels[0]] * len(pixels), pixels
    if asked == (0, 1):  # name a region: the answer is one label
        if len(labels) != 1 or len(pixels) != 1:
            raise _BadAnnotation(f"a {_BOX} question is answered by one {_REF} and no other box")
        return Task.REGION_TO_CATEGORY, labels, pixels
    raise _no_task(question)


def _labelled_boxes(
    objects: list[Any], question: str, size: tuple[int, int], grounding: Task
) -> tuple[Task, list[str], list[Box]]:
    """The task, labels and boxes of the 2024 guide's ``[[label, [x1, y1, x2, y2]], ...]``."""
    if not objects:
        raise _BadAnnotation("no objects")
    labels, boxes = [], []
    for number, pair in enumerate(objects, start=1):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise _BadAnnotation(
                f"object {number} must be [label, [x1, y1, x2, y2]], got {_shown(pair)}"
            )
        labels.append(_label(pair[0]))
        boxes.append(_box(pair[1], f"object {number}'s box", size))
    if len(set(labels)) != 1:
        raise _BadAnnotation(f"one label per line expected, got {sorted(set(labels))}")
    if _REF in question:
        return grounding, labels, boxes
    if _BOX in question:
        if len(boxes) != 1:
            raise _BadAnnotation(f"a region query needs one box, got {len(boxes)}")
        return Task.REGION_TO_CATEGORY, labels, boxes
    raise _no_task(question)


def _no_task(question: str) -> _BadAnnotation:
    return _BadAnnotation(
        f"the question {_shown(question)} has neither <ref-object> nor <bbox> alone: Florence-2 "
        f"learns to find a phrase (one {_REF} in the question, its boxes in the answer) or to "
        f"name a region (one {_BOX} in the question)"
    )


def _box(value: Any, what: str, size: tuple[int, int], scale: float | None = None) -> Box:
    """A box ``[x1, y1, x2, y2]`` (in pixels, or in ``scale`` per image side) in pixels,
    checked to be non-empty and inside the image."""
    if isinstance(value, list | tuple) and len(value) == 2:
        raise _BadAnnotation(
            f"{what} {_shown(value)} is a point (x, y): Florence-2 learns boxes x1, y1, x2, y2"
        )
    x1, y1, x2, y2 = _numbers(value, what, "[x1, y1, x2, y2]")
    if scale is not None:
        width, height = size
        x1, x2 = x1 / scale * width, x2 / scale * width
        y1, y2 = y1 / scale * height, y2 / scale * height
    try:
        return check_box((x1, y1, x2, y2), size)
    except RegionError as error:
        raise _BadAnnotation(f"{what} {_shown(value)}: {error}") from None


def read_qa(
    source: str | Path | Iterable[Mapping[str, Any]],
    images_dir: str | Path | None = None,
    *,
    task: str | Task | TaskSpec = DOCVQA,
    image_column: str = "image",
    question_column: str | None = "question",
    answer_column: str = "answer",
    on_error: OnError = "raise",
) -> TrainingSet:
    """Read (image, question, answer) rows as training samples for a free-text task.

    Args:
        source: A ``.jsonl`` or ``.csv`` file with one row per question, or the rows
            themselves: a Hugging Face ``datasets.Dataset`` (DocVQA-style, with image,
            question and answer columns) or any list of dicts.
        images_dir: For files: the folder relative image paths start from (default: the
            file's folder). For rows holding images in the data (a ``datasets`` Image column,
            decoded or as ``{"bytes": ...}``): where to write them as PNG files, which
            training reads; required then. Each file is named by its content, so reading
            several datasets into one folder never mixes their images up, and a different
            file already there under that name is never overwritten.
        task: What the samples teach: :data:`DOCVQA` (``"<DocVQA>"`` + the question), any
            :func:`~florence_helpers.custom_task`, or a built-in task whose answer is text
            (e.g. ``"CAPTION"``, with ``question_column=None``).
        image_column, question_column, answer_column: Column names. The answer may be one
            string or a list of accepted answers (DocVQA's ``answers``): the first is the
            target, all of them count in evaluation. ``question_column=None`` for tasks
            that take no text.
        on_error: ``"raise"`` an :class:`AnnotationError` listing every bad row, or
            ``"skip"`` those rows with a warning, as :func:`read_coco` does.

    Raises:
        AnnotationError: Rows without an image, question or answer, with an empty answer or
            one that is not text, or whose image is missing, unreadable or too large; lines
            that are not UTF-8 or not JSON; each named by file and line or row.
        FileNotFoundError: The file cannot be read.

    Example:
        >>> data = read_qa("receipts/qa.jsonl")  # doctest: +SKIP
        >>> data[0].prompt, data[0].target  # doctest: +SKIP
        ('<DocVQA>What is the total?', '23.40')
    """
    spec = task_spec(task)
    takes_text = spec.input is InputKind.TEXT
    if spec.input is InputKind.REGION:
        raise TaskInputError(f"read_qa reads questions, not regions: {spec.name} takes a region.")
    if takes_text and question_column is None:
        raise TaskInputError(f"{spec.token} takes text: name the question_column.")
    rows, name, root = _qa_rows(source, images_dir)
    samples: list[TrainingSample] = []
    problems: list[AnnotationProblem] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for number, row in rows:
        where = f"{name} {number}"
        try:
            if isinstance(row, _BadAnnotation):
                raise row
            if not isinstance(row, Mapping):
                raise _BadAnnotation(f"not a row of named columns (got {type(row).__name__})")
            image = _qa_image(row.get(image_column), root, where, images_dir is not None)
            if image not in sizes:
                sizes[image] = _checked_image_size(image)
            answers = _qa_answers(row.get(answer_column))
            question = row.get(question_column) if question_column is not None else None
            if question is not None and not isinstance(question, str):
                raise _BadAnnotation(f"a question must be text, got {_shown(question)}")
            question = _text(question.strip(), "the question") if question else None
            if takes_text and not question:
                raise _BadAnnotation(f"no question (column {question_column!r})")
            if not takes_text and question:
                raise _BadAnnotation(f"{spec.token} takes no question, but the row has one")
            prompt = build_prompt(spec, sizes[image], text=question)
        except (_BadAnnotation, TaskInputError, RegionError) as error:
            problems.append(AnnotationProblem(where, str(error)))
            continue
        samples.append(
            TrainingSample(
                sample_id=where,
                image=image,
                image_size=sizes[image],
                task=spec.task if not spec.is_custom else spec,
                prompt=prompt,
                target=answers[0],
                text=question,
                answers=answers,
            )
        )
    return _finish(samples, problems, on_error)


def _qa_rows(
    source: str | Path | Iterable[Mapping[str, Any]], images_dir: str | Path | None
) -> tuple[Iterable[tuple[int, Any]], str, Path]:
    """Numbered rows (or the error that spoilt one), a name for messages, the image folder."""
    if not isinstance(source, str | Path):
        root = Path(images_dir).expanduser() if images_dir is not None else Path.cwd()
        return enumerate(source, start=1), "row", root
    path = Path(source).expanduser()
    root = Path(images_dir).expanduser() if images_dir is not None else path.parent
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"{path.name}: read_qa reads .jsonl or .csv files.")
    data = _read_bytes(path)
    if path.suffix.lower() == ".csv":
        return _csv_rows(data, path), f"{path.name} line", root
    return _json_lines(data), f"{path.name} line", root


def _csv_rows(data: bytes, path: Path) -> Iterator[tuple[int, Any]]:
    """Each CSV row as a dict by the header's names, numbered by its first line, or the
    problem that spoilt it (a row of another length, bytes that are not UTF-8...)."""
    text = data.removeprefix(_BOM).decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
    except csv.Error as error:
        raise ValueError(f"{path}: the header line is not CSV ({error}).") from None
    if not all(_is_unicode(name) for name in header):
        raise ValueError(f"{path}: the header line is not UTF-8 text: save the file as UTF-8.")
    while True:
        first = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield first, _BadAnnotation(f"not a CSV row ({error})")
            if reader.line_num < first:  # nothing was read: stop rather than loop
                return
            continue
        if not values:  # a blank line
            continue
        if len(values) != len(header):
            yield (
                first,
                _BadAnnotation(
                    f"{len(values)} fields, but the header names {len(header)}: quote a field "
                    'that holds a comma ("1,5")'
                ),
            )
        elif not all(_is_unicode(value) for value in values):
            yield first, _BadAnnotation("is not UTF-8 text: save the file as UTF-8")
        else:
            yield first, dict(zip(header, values, strict=True))


def _qa_image(value: Any, root: Path, where: str, can_write: bool) -> Path:
    """The row's image as a file: a path as given, or an image in the data written under
    ``root``."""
    in_data = isinstance(value, Image.Image) or (
        isinstance(value, Mapping) and value.get("bytes") is not None
    )
    if in_data and not can_write:
        raise _BadAnnotation(
            "the image is in the data, not in a file: pass images_dir=... to write it there"
        )
    if isinstance(value, Mapping):  # a datasets Image column read without decoding
        data = value.get("bytes")
        if data is None:
            value = value.get("path")
        elif not isinstance(data, bytes | bytearray | memoryview):
            raise _BadAnnotation(f"the image's bytes must be bytes, got {_shown(data)}")
        else:
            try:
                with warnings.catch_warnings():  # too many pixels is refused, not warned about
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    value = decode_image(
                        bytes(data), f"the image of {where}", max_pixels=DEFAULT_MAX_PIXELS
                    )
            except ImageLoadError as error:
                raise _BadAnnotation(str(error)) from None
            except _UNREADABLE as error:
                raise _BadAnnotation(f"the image cannot be read ({error!r})") from None
    if isinstance(value, Image.Image):
        return _write_image(value, root)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _BadAnnotation("no image")
    return _image_path(value, root)


def _write_image(image: Image.Image, root: Path) -> Path:
    """Write an image as a PNG file named by its content: two images never share a name, and
    a file already there is reused only if it holds the same bytes."""
    try:
        upright = to_rgb(ImageOps.exif_transpose(image))
        buffer = io.BytesIO()
        upright.save(buffer, format="PNG")
    except _UNREADABLE as error:
        raise _BadAnnotation(f"the image cannot be written as PNG ({error!r})") from None
    data = buffer.getvalue()
    path = root / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    try:
        existing: bytes | None = path.read_bytes()
    except FileNotFoundError:
        existing = None
    except OSError as error:
        raise _BadAnnotation(f"cannot check {path}: {error.strerror or error}") from None
    if existing is None:
        try:
            write_atomically(path, data)
        except OutputError as error:
            raise _BadAnnotation(str(error)) from None
    elif existing != data:
        raise _BadAnnotation(
            f"{path} already holds another image and was not overwritten: remove it, or give "
            "images_dir a folder of its own"
        )
    return path


def _qa_answers(value: Any) -> tuple[str, ...]:
    """The accepted answers, first one the target; an error if there is none."""
    values = value if isinstance(value, list | tuple) else [value]
    answers = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or not (isinstance(v, str) or _finite(v) is not None):
            raise _BadAnnotation(f"an answer must be text, got a {type(v).__name__}: {_shown(v)}")
        answer = _text(str(v).strip(), "an answer")
        if answer:
            answers.append(answer)
    if not answers:
        raise _BadAnnotation("empty answer")
    return tuple(answers)


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


# --- checking values from outside --------------------------------------------------------------


def _shown(value: Any, *, plain: bool = False) -> str:
    """``value`` for a message: its repr (a string as itself if ``plain``), cut to 60 chars."""
    try:
        text = value if plain and isinstance(value, str) else repr(value)
    except (ValueError, RecursionError):  # an int of over 4300 digits, a list nested too deep
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _is_id(value: Any) -> bool:
    """Whether ``value`` can be a COCO id: a whole number (not a bool) or a string."""
    return isinstance(value, str) or (
        isinstance(value, numbers.Integral) and not isinstance(value, bool)
    )


def _id_error(name: str, value: Any) -> str:
    return f"{name} must be a whole number or a string, got {_shown(value)}"


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (not a bool, not text), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return number if math.isfinite(number) else None


def _numbers(value: Any, what: str, form: str) -> list[float]:
    """The four finite numbers of a box, or an error naming ``what`` and its ``form``."""
    found = [_finite(v) for v in value] if isinstance(value, list | tuple) else []
    if len(found) != 4 or None in found:
        raise _BadAnnotation(f"{what} must be {form}, four finite numbers; got {_shown(value)}")
    return found


def _is_unicode(text: str) -> bool:
    """False for text holding lone surrogates (undecodable bytes, or a JSON ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(text: str, what: str) -> str:
    if not _is_unicode(text):
        raise _BadAnnotation(f"{what}: not valid Unicode text (a lone surrogate)")
    return text


def _label(value: Any) -> str:
    """A label or phrase as written into a target: text, not empty, no special tokens."""
    if not isinstance(value, str):
        raise _BadAnnotation(f"label {_shown(value)}: a label must be text")
    label = value.strip()
    if not label:
        raise _BadAnnotation(f"label {_shown(value)}: empty")
    token = _SPECIAL_TOKEN.search(label)
    if token:
        raise _BadAnnotation(
            f"label {_shown(value)}: {token.group()} in it would be read as one of Florence-2's "
            "special tokens, not as words; remove it"
        )
    return _text(label, f"label {_shown(value)}")


def _image_path(value: Any, root: Path) -> Path:
    """A path from the data, relative ones under ``root``."""
    if not isinstance(value, str | os.PathLike) or not os.fspath(value).strip():
        raise _BadAnnotation(f"the image must be a file path, got {_shown(value)}")
    path = Path(value)
    try:
        path = path.expanduser()
    except RuntimeError:  # "~name" of a user this machine does not know: a plain name then
        pass
    return path if path.is_absolute() else root / path


# --- files -----------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or error
        raise FileNotFoundError(f"Cannot read {path}: {reason}.") from None


def _read_text(path: Path) -> str:
    """A data file's text; clear errors for a missing file and for text that is not UTF-8."""
    data = _read_bytes(path)
    body = data.removeprefix(_BOM)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (at byte offset {error.start + len(data) - len(body)}): "
            "save it as UTF-8 and read it again."
        ) from None


def _read_json(path: Path) -> Mapping[str, Any]:
    text = _read_text(path)
    try:
        dataset = json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise ValueError(f"{path} is not valid JSON: {error}.") from None
    if not isinstance(dataset, Mapping):
        raise ValueError(f"{path} holds a JSON {type(dataset).__name__}, not a COCO dataset.")
    return dataset


def _json_lines(data: bytes) -> Iterator[tuple[int, Any]]:
    """Each non-blank line's number and JSON value, or the problem that spoilt the line.

    Lines are split at ``\\n`` bytes and decoded one by one: a byte that is not UTF-8 spoils
    its own line only."""
    for number, raw in enumerate(data.removeprefix(_BOM).split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield (
                number,
                _BadAnnotation(
                    f"is not UTF-8 text (at byte offset {error.start} of the line: "
                    f"0x{raw[error.start]:02x}): save the file as UTF-8"
                ),
            )
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            value = _BadAnnotation(f"not valid JSON ({error.msg})")
        except (ValueError, RecursionError) as error:  # too many digits; nested too deep
            value = _BadAnnotation(f"not valid JSON ({error})")
        yield number, value


def _checked_image_size(path: Path, given: tuple[Any, Any] = (None, None)) -> tuple[int, int]:
    """The upright size of the image file, checked against the ``(width, height)`` the
    annotations give (if any). Only the header is read."""
    width_given, height_given = given
    if not (width_given is None and height_given is None) and not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in given
    ):
        raise _BadAnnotation(
            'width and height must be whole numbers of pixels (64, not 64.0 or "64"), got '
            f"{_shown(width_given)} and {_shown(height_given)}"
        )
    try:
        info = path.stat()
    except FileNotFoundError:
        raise _BadAnnotation(f"image file not found: {path}") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL in the name
        raise _BadAnnotation(f"image file unreadable: {_shown(str(path))} ({error})") from None
    if not stat.S_ISREG(info.st_mode):
        raise _BadAnnotation(f"image file unreadable: {path} is not a file")
    try:
        with warnings.catch_warnings():  # a size past Pillow's warning limit is refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                too_large = width * height > DEFAULT_MAX_PIXELS
                if not too_large and image.getexif().get(_EXIF_ORIENTATION) in _ROTATED:
                    width, height = height, width
    except Image.DecompressionBombError as error:
        raise _BadAnnotation(too_large_message(str(path), str(error))) from None
    except _UNREADABLE as error:
        raise _BadAnnotation(f"image file unreadable: {path} ({error})") from None
    if too_large:
        raise _BadAnnotation(
            f"image file too large: {path} has {width}x{height} pixels, more than the "
            f"{DEFAULT_MAX_PIXELS / 1e6:.1f} megapixels training decodes. Florence-2 sees "
            "768x768 pixels: shrink the file first."
        )
    if given != (None, None) and given != (width, height):
        raise _BadAnnotation(
            f"the annotations say {width_given}x{height_given} but the image is {width}x{height}"
        )
    return width, height
