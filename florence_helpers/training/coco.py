"""COCO detection datasets (``images``, ``categories``, ``annotations`` with ``bbox`` as
``[x, y, width, height]``) read into ``<OD>`` or open-vocabulary detection samples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..boundary.inputs import expand_path
from ..language.prompts import TaskInputError
from ..language.regions import RegionError, check_box, xywh_to_xyxy
from ..language.tasks import Task, task_spec
from .grounding import _GROUNDING_TASKS
from .records import _checked_image_size, _id_error, _is_id, _label, _numbers, _read_json, _shown
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
        root = expand_path(images_dir) if images_dir is not None else Path.cwd()
    else:
        path = expand_path(annotations)
        dataset = _read_json(path)
        source = path.name
        root = expand_path(images_dir) if images_dir is not None else path.parent
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
    by_name: dict[str, list[Box]] = {}  # one pass: an image may hold thousands of objects
    for label, box in zip(labels, boxes, strict=True):
        by_name.setdefault(label, []).append(box)
    return [
        (f"{where} {name!r}", [name] * len(found), found, name, None)
        for name, found in by_name.items()
    ]
