"""Fine-tuning data: read labelled images into (prompt, target) pairs in Florence-2's grammar.

Three formats are read:

* **COCO detection** (``images``, ``categories``, ``annotations`` with ``bbox`` as
  ``[x, y, width, height]``), what most labelling tools export. Each image becomes one ``<OD>``
  sample listing every object, or one open-vocabulary detection sample per category.
* **ms-swift grounding JSON lines**: ``{"query": "Find <ref-object>", "response": "<bbox>",
  "images": [path], "objects": [[label, [x1, y1, x2, y2]], ...]}`` (``objects`` may also be a
  JSON string). A query with ``<ref-object>`` asks for boxes (grounding); a query with
  ``<bbox>`` asks for the label of a region (``<REGION_TO_CATEGORY>``).
* **Questions and answers** (document VQA and any free-text task): rows of image, question
  and answer from a JSON-lines or CSV file, or a Hugging Face ``datasets`` dataset
  (:func:`read_qa`). The answer is the target as written; the prompt is the task's token
  followed by the question.

Targets are written the way Florence-2 writes its answers: a label followed by four
``<loc_N>`` tokens per box, quantized by :func:`~florence_helpers.regions.box_to_loc_tokens`
exactly as the processor does. Bad annotations (a box outside its image, an empty box, an image
that is missing or unreadable) are collected with the sample they belong to; the caller chooses
to raise on them or to skip those samples with a warning. Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from .images import too_large_message
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
    categories: dict[Any, str] = {}
    for number, category in enumerate(dataset["categories"]):
        if not isinstance(category, Mapping) or "id" not in category or "name" not in category:
            # Its objects then have an unknown category, and their images are reported.
            problems.append(
                AnnotationProblem(f"{source} category #{number}", "needs an 'id' and a 'name'")
            )
            continue
        categories[category["id"]] = str(category["name"])
    images = []
    for number, entry in enumerate(dataset["images"]):
        if not isinstance(entry, Mapping) or "id" not in entry:
            name = entry.get("file_name") if isinstance(entry, Mapping) else entry
            problems.append(AnnotationProblem(f"{source} image #{number} ({name})", "has no 'id'"))
            continue
        images.append(entry)
    by_image: dict[Any, list[Mapping[str, Any]]] = {entry["id"]: [] for entry in images}
    for number, annotation in enumerate(dataset["annotations"]):
        if not isinstance(annotation, Mapping):
            problems.append(AnnotationProblem(f"{source} annotation #{number}", "not an object"))
            continue
        if annotation.get("image_id") not in by_image:
            where = f"{source} annotation {annotation.get('id', f'#{number}')}"
            problems.append(
                AnnotationProblem(where, f"unknown image_id {annotation.get('image_id')!r}")
            )
        else:
            by_image[annotation["image_id"]].append(annotation)

    samples: list[TrainingSample] = []
    for entry in images:
        where = f"{source} image {entry['id']} ({entry.get('file_name')})"
        image_path = root / str(entry.get("file_name", ""))
        try:
            size = _checked_image_size(image_path, entry)
            labels, boxes = [], []
            for annotation in by_image[entry["id"]]:
                if annotation.get("category_id") not in categories:
                    raise _BadAnnotation(
                        f"annotation {annotation.get('id')}: unknown category_id "
                        f"{annotation.get('category_id')!r}"
                    )
                labels.append(categories[annotation["category_id"]])
                boxes.append(_coco_box(annotation, size))
        except (_BadAnnotation, RegionError) as error:
            problems.append(AnnotationProblem(where, str(error)))
            continue
        samples += [
            _sample(sample_id, image_path, size, task, own_labels, own_boxes, text, region)
            for sample_id, own_labels, own_boxes, text, region in _per_sample(
                task, where, labels, boxes
            )
        ]
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
    """Read grounding data in the JSON-lines format of the ms-swift Florence-2 guide.

    Each line holds ``query``, ``response``, ``images`` (one path) and ``objects``: a list
    (or a JSON string of a list) of ``[label, [x1, y1, x2, y2]]`` in pixels. A query containing
    ``<ref-object>`` becomes a grounding sample (prompt: the label, target: the label and its
    boxes); a query containing ``<bbox>`` becomes a ``REGION_TO_CATEGORY`` sample (prompt: the
    region, target: the label followed by the region, as Florence-2 answers).

    Args:
        path: The ``.jsonl`` file.
        images_dir: Folder that relative image paths are relative to; by default the file's
            folder.
        grounding_task: ``OPEN_VOCABULARY_DETECTION`` (as the ms-swift guide) or
            ``CAPTION_TO_PHRASE_GROUNDING``.
        on_error: ``"raise"`` or ``"skip"``, as in :func:`read_coco`.

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
    lines = _read_text(path).splitlines()
    samples: list[TrainingSample] = []
    problems: list[AnnotationProblem] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            record = json.loads(line)
            query, objects = str(record["query"]), record["objects"]
            images = record["images"]
            if isinstance(objects, str):
                objects = json.loads(objects)
            if isinstance(images, str):
                images = [images]
            if len(images) != 1:
                raise _BadAnnotation(f"expected one image, got {len(images)}")
            image_path = Path(images[0]).expanduser()
            image_path = image_path if image_path.is_absolute() else root / image_path
            if image_path not in sizes:
                sizes[image_path] = _checked_image_size(image_path, {})
            size = sizes[image_path]
            if not objects:
                raise _BadAnnotation("no objects")
            labels = [str(obj[0]).strip() for obj in objects]
            boxes = [check_box(obj[1], size) for obj in objects]
            if len(set(labels)) != 1:
                raise _BadAnnotation(f"one label per line expected, got {sorted(set(labels))}")
            if "<ref-object>" in query:
                task, text, region = grounding, labels[0], None
            elif "<bbox>" in query:
                if len(boxes) != 1:
                    raise _BadAnnotation(f"a region query needs one box, got {len(boxes)}")
                task, text, region = Task.REGION_TO_CATEGORY, None, boxes[0]
            else:
                raise _BadAnnotation(f"query {query!r} has neither <ref-object> nor <bbox>")
        except json.JSONDecodeError as error:
            problems.append(AnnotationProblem(where, f"not valid JSON ({error.msg})"))
            continue
        except (KeyError, IndexError, TypeError) as error:
            problems.append(AnnotationProblem(where, f"malformed record ({error!r})"))
            continue
        except (_BadAnnotation, RegionError) as error:
            problems.append(AnnotationProblem(where, str(error)))
            continue
        try:
            samples.append(_sample(where, image_path, size, task, labels, boxes, text, region))
        except TaskInputError as error:  # an empty label, or a task token inside it
            problems.append(AnnotationProblem(where, f"label {labels[0]!r}: {error}"))
    return _finish(samples, problems, on_error)


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
            file's folder). For rows holding decoded images (a ``datasets`` Image column):
            where to write them as PNG files, which training reads; required then.
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
        AnnotationError: Rows without an image, question or answer, with an empty answer,
            or whose image is missing or unreadable; each named by file and line or row.

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
                sizes[image] = _checked_image_size(image, {})
            answers = _qa_answers(row.get(answer_column))
            question = None
            if takes_text:
                question = str(row.get(question_column) or "").strip()
                if not question:
                    raise _BadAnnotation(f"no question (column {question_column!r})")
            elif question_column is not None and str(row.get(question_column) or "").strip():
                raise _BadAnnotation(f"{spec.token} takes no question, but the row has one")
            prompt = build_prompt(spec, sizes[image], text=question)
        except _BadAnnotation as error:
            problems.append(AnnotationProblem(where, str(error)))
            continue
        except TaskInputError as error:
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
    if not isinstance(source, (str, Path)):
        root = Path(images_dir).expanduser() if images_dir is not None else Path.cwd()
        return enumerate(source, start=1), "row", root
    path = Path(source).expanduser()
    root = Path(images_dir).expanduser() if images_dir is not None else path.parent
    text = _read_text(path)
    if path.suffix.lower() == ".csv":
        return enumerate(csv.DictReader(io.StringIO(text)), start=2), f"{path.name} line", root
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"{path.name}: read_qa reads .jsonl or .csv files.")

    def records() -> Iterator[tuple[int, Any]]:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, _BadAnnotation(f"not valid JSON ({error.msg})")
                continue
            if not isinstance(record, Mapping):
                yield number, _BadAnnotation("not a JSON object")
                continue
            yield number, record

    return records(), f"{path.name} line", root


def _qa_image(value: Any, root: Path, where: str, can_write: bool) -> Path:
    """The row's image as a file: a path as given, or a decoded image written under ``root``."""
    if isinstance(value, Mapping):  # a datasets Image column read without decoding
        value = value.get("path") or (
            Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else None
        )
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _BadAnnotation("no image")
    if isinstance(value, Image.Image):
        if not can_write:
            raise _BadAnnotation(
                "the image is in the data, not in a file: pass images_dir=... to write it there"
            )
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{''.join(c if c.isalnum() else '_' for c in where)}.png"
        value.convert("RGB").save(path)
        return path
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else root / path


def _qa_answers(value: Any) -> tuple[str, ...]:
    """The accepted answers, first one the target; an error if there is none."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if v is not None and not isinstance(v, str | int | float):
            raise _BadAnnotation(f"an answer must be text, got a {type(v).__name__}: {v!r}")
    answers = tuple(str(v).strip() for v in values if v is not None and str(v).strip())
    if not answers:
        raise _BadAnnotation("empty answer")
    return answers


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


def _read_text(path: Path) -> str:
    """A data file's text; clear errors for a missing file and for text that is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as error:
        raise FileNotFoundError(f"Cannot read {path}: {error.strerror or error}.") from None
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}): save it as UTF-8 and read it again."
        ) from None


def _read_json(path: Path) -> Mapping[str, Any]:
    try:
        dataset = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from None
    if not isinstance(dataset, Mapping):
        raise ValueError(f"{path} holds a JSON {type(dataset).__name__}, not a COCO dataset.")
    return dataset


def _checked_image_size(path: Path, entry: Mapping[str, Any]) -> tuple[int, int]:
    """The upright size of the image file, checked against the size the annotations give."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _ROTATED:
                width, height = height, width
    except FileNotFoundError:
        raise _BadAnnotation(f"image file not found: {path}") from None
    except Image.DecompressionBombError as error:
        raise _BadAnnotation(too_large_message(str(path), str(error))) from None
    except (UnidentifiedImageError, OSError) as error:
        raise _BadAnnotation(f"image file unreadable: {path} ({error})") from None
    given = (entry.get("width"), entry.get("height"))
    if given != (None, None) and given != (width, height):
        raise _BadAnnotation(
            f"the annotations say {given[0]}x{given[1]} but the image is {width}x{height}"
        )
    return width, height


def _coco_box(annotation: Mapping[str, Any], size: tuple[int, int]) -> Box:
    """A COCO ``[x, y, w, h]`` as a checked ``(x1, y1, x2, y2)``."""
    try:
        corners = xywh_to_xyxy(annotation["bbox"])
    except (KeyError, TypeError, ValueError):
        raise _BadAnnotation(
            f"annotation {annotation.get('id')}: bbox must be [x, y, width, height], "
            f"got {annotation.get('bbox')!r}"
        ) from None
    try:
        return check_box(corners, size)
    except RegionError as error:
        raise _BadAnnotation(f"annotation {annotation.get('id')}: {error}") from None
