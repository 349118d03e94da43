"""Label a whole image collection: one JSON line per image, resumable, errors recorded.

``label`` walks a folder (or takes a list of paths or URLs), runs one task in batches and
appends one JSON line per image as it goes. Killed at any moment and started again with the
same output file, it resumes: images already written are skipped, a half-written last line is
cut off, and no image is written twice. An image that cannot be read (missing, corrupt, too
large to open) or that fails in the model becomes an error record naming it, and the run goes
on; only a mistake in the job's settings (a task that needs text and got none) stops it.
``label_batch`` is the per-batch step, shared with the Ray Data path
(:mod:`florence_helpers.ray_labelling`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .detection import check_classes, detect
from .images import ImageLoadError, load_image
from .inference import run
from .model import FlorenceModel
from .prefetch import prefetched
from .prompts import Region, TaskInputError
from .results import AnyResult, BoxesResult, PolygonsResult, Result
from .tasks import Task, TaskSpec, UnknownTaskError, task_spec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class LabelSummary:
    """What a :func:`label` run did."""

    written: int
    errors: int
    skipped: int
    output: Path


def find_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursively, by extension), sorted for a stable order."""
    root = Path(folder)
    if not root.is_dir():
        raise ImageLoadError(f"Not a folder: {root}")
    return sorted(str(path) for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)


def label_batch(
    florence: FlorenceModel,
    sources: Sequence[str],
    task: str | Task | TaskSpec,
    *,
    text: str | None = None,
    region: Region | None = None,
    classes: Sequence[str] | None = None,
    loaded: Sequence[Any] | None = None,
    **run_kwargs: Any,
) -> list[dict[str, Any]]:
    """Label one batch: one record per source, in order; unreadable images become errors.

    A record is ``{"image", "width", "height", "task", "result", "error"}``: ``result`` is the
    parsed result (:meth:`Result.to_dict` without the size and task it repeats), ``error``
    None; or ``result`` None and ``error`` the reason. ``loaded`` may hold the images already
    read by :func:`read_images`. ``classes`` runs :func:`~florence_helpers.detect` instead
    (the task must then be ``OPEN_VOCABULARY_DETECTION``).
    """
    spec = task_spec(task)
    infer = _inference(florence, spec, text, region, classes)
    loaded = read_images(sources) if loaded is None else loaded
    records: list[dict[str, Any] | None] = [None] * len(sources)
    good, images = [], []
    for index, (source, image) in enumerate(zip(sources, loaded, strict=True)):
        if isinstance(image, ImageLoadError):
            records[index] = _record(source, spec, error=str(image))
        else:
            images.append(image)
            good.append(index)
    if images:
        run_kwargs = {"batch_size": len(images), "progress": False, **run_kwargs}

        def one(image: Any) -> Any:
            try:
                return infer(image, **run_kwargs)
            except _SETTINGS_ERRORS:
                raise
            except Exception as error:  # noqa: BLE001 - recorded for this image, the job goes on
                return error

        try:
            results = infer(images, **run_kwargs)
        except _SETTINGS_ERRORS:
            raise
        except Exception:  # noqa: BLE001
            # One image spoils the batch (a region outside it, a failure in the model or the
            # parser): label one by one, so that only the images that fail become errors.
            results = [one(image) for image in images]
        for index, image, result in zip(good, images, results, strict=True):
            if isinstance(result, Exception):
                records[index] = _record(
                    sources[index], spec, size=image.size, error=_describe(result)
                )
            else:
                records[index] = _record(sources[index], spec, size=image.size, result=result)
    return records  # type: ignore[return-value]


def _inference(
    florence: FlorenceModel,
    spec: TaskSpec,
    text: str | None,
    region: Region | None,
    classes: Sequence[str] | None,
) -> Any:
    """``run`` with the job's task and inputs, or ``detect`` with its classes."""
    if classes is None:
        return functools.partial(run, florence, task=spec, text=text, region=region)
    if spec.task is not Task.OPEN_VOCABULARY_DETECTION or text is not None or region is not None:
        raise TaskInputError(
            "classes= detects each class by open-vocabulary detection: use the task "
            "OPEN_VOCABULARY_DETECTION, with no text or region."
        )
    names = check_classes(classes)

    def detect_classes(images: Any, batch_size: int = 1, **kwargs: Any) -> Any:
        return detect(florence, images, names, **kwargs)

    return detect_classes


# Errors in the job's own settings (a task that needs text and got none): every image would
# fail the same way, so they stop the job instead of becoming one error record per image.
_SETTINGS_ERRORS = (TaskInputError, UnknownTaskError)


def read_images(sources: Sequence[str]) -> list[Any]:
    """Each source as an RGB image, or an :class:`ImageLoadError` saying why it could not be."""
    loaded: list[Any] = []
    for source in sources:
        try:
            loaded.append(load_image(source))
        except ImageLoadError as error:
            loaded.append(error)
        except Exception as error:  # noqa: BLE001 - a decoder bug must not stop the job
            loaded.append(ImageLoadError(f"Could not read {source}: {_describe(error)}"))
    return loaded


def _describe(error: Exception) -> str:
    """The message of one of this package's errors; type and message of anything else."""
    if isinstance(error, ValueError) and type(error).__module__.startswith("florence_helpers"):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _record(
    source: str,
    spec: TaskSpec,
    *,
    size: tuple[int, int] | None = None,
    result: Any = None,
    error: str | None = None,
) -> dict[str, Any]:
    payload = None
    if result is not None:
        payload = result.to_dict()
        for repeated in ("task", "image_size"):
            payload.pop(repeated)
    return {
        "image": str(source),
        "width": size[0] if size else None,
        "height": size[1] if size else None,
        "task": spec.token,
        "result": payload,
        "error": error,
    }


def read_labels(path: str | os.PathLike, *, as_results: bool = False) -> list[dict[str, Any]]:
    """Read the records of a JSONL file (or a folder of them, as Ray Data writes).

    A half-written last line is ignored. ``result`` given as a JSON string (the Ray output
    keeps it as text) is parsed, so both paths read back the same.

    Args:
        path: The JSONL file or folder.
        as_results: Turn each ``result`` into the typed result it was written from
            (:meth:`Result.from_dict`), ready for plotting or filtering by score.
    """
    target = Path(path)
    files = sorted(target.glob("*.json*")) if target.is_dir() else [target]
    records = []
    for file in files:
        for line in file.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # an interrupted write
            if isinstance(record.get("result"), str):
                record["result"] = json.loads(record["result"])
            if as_results:
                record["result"] = record_result(record)
            records.append(record)
    return records


def record_result(record: dict[str, Any]) -> AnyResult | None:
    """The typed result of a labelling record (None for an error record)."""
    result = record.get("result")
    if result is None or isinstance(result, Result):
        return result
    size = (record["width"], record["height"])
    return Result.from_dict(result, task=record["task"], image_size=size)


def _resume(output: Path) -> set[str]:
    """Cut a half-written last line off ``output`` and return the images it already holds."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with output.open("r+b") as handle:
            handle.truncate(len(keep))
    done = set()
    for line in keep.decode("utf-8").splitlines():
        try:
            done.add(json.loads(line)["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def label(
    florence: FlorenceModel,
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    task: str | Task | TaskSpec,
    output: str | os.PathLike,
    *,
    text: str | None = None,
    region: Region | None = None,
    classes: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    **run_kwargs: Any,
) -> LabelSummary:
    """Label every image of a folder (or list) into a JSONL file, resuming where it stopped.

    Args:
        florence: What :func:`load_model` returned.
        sources: A folder (searched recursively) or an iterable of paths and URLs.
        task: The task to run on every image.
        output: The JSONL file; appended to, and read first to skip images already done.
        text, region: The task's extra input, the same for every image.
        classes: Class names to detect in every image with :func:`~florence_helpers.detect`
            (task ``OPEN_VOCABULARY_DETECTION``); boxes are labelled with these names.
        batch_size: Images per ``generate`` call.
        progress: Show a progress bar with images/s and the time left.
        **run_kwargs: Passed to :func:`run` (``num_beams``, ``max_new_tokens``, ``scores``).

    Returns:
        How many records were written, how many of them are errors, how many were skipped.

    Example:
        >>> label(florence, "images", "DETAILED_CAPTION", "captions.jsonl")  # doctest: +SKIP
    """
    spec = task_spec(task)
    _inference(florence, spec, text, region, classes)  # a settings mistake stops it here
    if isinstance(sources, (str, os.PathLike)) and Path(sources).is_dir():
        paths = find_images(sources)
    elif isinstance(sources, (str, os.PathLike)):
        paths = [str(sources)]
    else:
        paths = [str(source) for source in sources]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _resume(out)
    todo = list(dict.fromkeys(p for p in paths if p not in done))
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), max(batch_size, 1))]
    written = errors = 0
    bar = tqdm(total=len(todo), desc=spec.name, unit="img", disable=not progress)
    with out.open("a", encoding="utf-8") as handle, bar:
        inputs = {"text": text, "region": region, "classes": classes}
        for records in _labelled_batches(florence, batches, spec, inputs, run_kwargs):
            # One write per batch, then flush to disk: a kill loses at most this batch.
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            handle.flush()
            os.fsync(handle.fileno())
            written += len(records)
            errors += sum(r["error"] is not None for r in records)
            bar.update(len(records))
    return LabelSummary(written=written, errors=errors, skipped=len(paths) - len(todo), output=out)


def _labelled_batches(
    florence: FlorenceModel,
    batches: list[list[str]],
    spec: TaskSpec,
    inputs: dict[str, Any],
    run_kwargs: dict[str, Any],
) -> Iterator[list[dict[str, Any]]]:
    """Label batches in order, reading the next batch's files on a thread meanwhile."""
    for paths, loaded in zip(batches, prefetched(read_images, batches), strict=True):
        yield label_batch(florence, paths, spec, loaded=loaded, **inputs, **run_kwargs)


def export_coco(
    labels: str | os.PathLike | list[dict[str, Any]], output: str | os.PathLike
) -> dict:
    """Write the boxes (and polygons) of labelling records as one COCO dataset JSON.

    Images keep their path as ``file_name``; categories are the distinct labels in first-seen
    order; scores, when the run had them, become ``score``. Error records are left out.

    Example:
        >>> export_coco("detections.jsonl", "detections.coco.json")  # doctest: +SKIP
    """
    from .conversions import to_coco

    records = read_labels(labels) if not isinstance(labels, list) else labels
    categories: dict[str, int] = {}
    images, annotations = [], []
    for record in records:
        result = record.get("result")
        if record.get("error") or not result:
            continue
        image_id = len(images) + 1
        images.append(
            {
                "id": image_id,
                "file_name": record["image"],
                "width": record["width"],
                "height": record["height"],
            }
        )
        parsed = record_result(record)
        if not isinstance(parsed, BoxesResult | PolygonsResult):
            continue
        for label in parsed.labels:
            categories.setdefault(label, len(categories) + 1)
        annotations += to_coco(
            parsed, image_id=image_id, categories=categories, first_id=len(annotations) + 1
        )
    dataset = {
        "images": images,
        "categories": [{"id": i, "name": name} for name, i in categories.items()],
        "annotations": annotations,
    }
    Path(output).write_text(json.dumps(dataset))
    return dataset
