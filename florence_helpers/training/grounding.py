"""ms-swift's grounding JSON lines read into grounding and region samples.

Both of ms-swift's forms are read. Today's, from its guide
https://github.com/modelscope/ms-swift/blob/main/docs/source_en/Customization/Custom-dataset.md
(section "Grounding"): ``messages`` (or ``query``/``response``) with ``<ref-object>`` and
``<bbox>`` placeholders, and ``"objects": {"ref": [...], "bbox": [[x1, y1, x2, y2], ...],
"bbox_type": "real"}`` (``real``: pixels, the default; ``norm1``: 0..1; ``norm1000``: 0..1000 of
the image's sides). And its 2024 Florence-2 guide's: ``query``, ``response``, ``"objects":
[[label, [x1, y1, x2, y2]], ...]`` in pixels (or that list as a JSON string). A question with
``<ref-object>`` asks for the boxes of a phrase (open-vocabulary detection); a question with
``<bbox>`` asks for the label of a region (``<REGION_TO_CATEGORY>``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..boundary.inputs import expand_path
from ..language.prompts import TaskInputError
from ..language.regions import RegionError, check_box
from ..language.tasks import Task, task_spec
from .qa import _BOX, _REF
from .records import (
    _checked_image_size,
    _image_path,
    _json_lines,
    _label,
    _numbers,
    _read_bytes,
    _shown,
)
from .samples import (
    AnnotationProblem,
    Box,
    OnError,
    TrainingSample,
    TrainingSet,
    _BadAnnotation,
    _finish,
    _sample,
)

_GROUNDING_TASKS = (Task.OPEN_VOCABULARY_DETECTION, Task.CAPTION_TO_PHRASE_GROUNDING)


# What a whole image side is in each ms-swift bbox_type (None: pixels). The guide names "real"
# and "norm1"; "norm1000" is the scale ms-swift writes for Florence-2, read here as thousandths
# (ms-swift's own Template.normalize_bbox reads any value but "norm1" as pixels).
_BBOX_TYPES = {"real": None, "norm1": 1.0, "norm1000": 1000.0}


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
    path = expand_path(path)
    root = expand_path(images_dir) if images_dir is not None else path.parent
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
