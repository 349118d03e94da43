"""Label files read back: records (typed results if asked), every bad line named or skipped,
and the boxes exported as one COCO dataset."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..boundary.inputs import InputError, expand_path, read_file
from ..boundary.outputs import check_outputs, write_atomically
from ..language.results import AnyResult, BoxesResult, PolygonsResult, Result
from .files import LabelFileError, _is_header, check_record
from .masks import masks_problem


def read_labels(
    path: str | os.PathLike, *, as_results: bool = False, on_error: str = "raise"
) -> list[dict[str, Any]]:
    """Read the records of a label file (or a folder of them, as Ray Data writes).

    The job lines (what each job ran) are left out; a half-written last line (an interrupted
    run) is ignored. ``result`` given as a JSON string (the Ray output keeps it as text) is
    parsed, so both paths read back the same.

    Args:
        path: The JSONL file or folder.
        as_results: Turn each ``result`` into the typed result it was written from
            (:meth:`Result.from_dict`), ready for plotting or filtering by score.
        on_error: What to do with a line that is not a record (cut, edited by hand, not
            UTF-8, fields of the wrong type, a result that cannot be read): "raise" a
            :class:`LabelFileError` naming the file and line, or "skip" it with a warning.

    Raises:
        LabelFileError: A line that is not a label record, with ``on_error="raise"``.
        FileNotFoundError: No such file or folder.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    target = expand_path(path)
    if not target.exists():
        raise FileNotFoundError(f"No label file or folder at {target}.")
    files = sorted(target.glob("*.json*")) if target.is_dir() else [target]
    records = []
    for file in files:
        for number, record in _numbered_records(file, on_error):
            if isinstance(record.get("result"), str):
                try:
                    record["result"] = json.loads(record["result"])
                except (ValueError, RecursionError):
                    _bad_line(file, number, "its result is not JSON", on_error)
                    continue
            if not isinstance(record.get("result"), dict | None):
                _bad_line(file, number, "its result is not an object", on_error)
                continue
            if as_results:
                try:
                    record["result"] = record_result(record)
                except (KeyError, TypeError, ValueError, IndexError) as error:
                    reason = str(error).rstrip(".")
                    _bad_line(file, number, f"its result cannot be read ({reason})", on_error)
                    continue
            records.append(record)
    return records


def _numbered_records(file: Path, on_error: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The records of one label file with their line numbers (job lines left out)."""
    try:  # a label file of any size, but a regular file (not a FIFO, not /dev/zero)
        data = read_file(file, max_bytes=None)
    except (OSError, InputError) as error:
        raise LabelFileError(str(error)) from None
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            _bad_line(file, number, f"not UTF-8 text (byte {error.start + 1})", on_error)
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as error:
            if number == len(lines):  # no newline after it: an interrupted write
                continue
            reason = getattr(error, "msg", "nested too deeply")
            _bad_line(file, number, f"not valid JSON ({reason})", on_error)
            continue
        if _is_header(record):
            continue
        problem = check_record(record) if isinstance(record, dict) else "not a label record"
        if problem is None:
            problem = masks_problem(record)
        if problem is not None:
            _bad_line(file, number, problem, on_error)
            continue
        yield number, record


_SKIP_HINT = " Pass on_error='skip' to read the other lines."


def _bad_line(file: Path, number: int, problem: str, on_error: str) -> None:
    message = f"{file} line {number}: {problem}."
    if on_error == "raise":
        error = LabelFileError(message + _SKIP_HINT)
        error.line_problem = message  # the message without its advice, for other callers
        raise error
    warnings.warn(f"Skipped {message}", stacklevel=4)


def record_result(record: dict[str, Any]) -> AnyResult | None:
    """The typed result of a labelling record (None for an error record)."""
    result = record.get("result")
    if result is None or isinstance(result, Result):
        return result
    size = (record["width"], record["height"])
    return Result.from_dict(result, task=record["task"], image_size=size)


def export_coco(
    labels: str | os.PathLike | list[dict[str, Any]], output: str | os.PathLike
) -> dict:
    """Write the boxes (and polygons) of labelling records as one COCO dataset JSON.

    Images keep their path as ``file_name``; categories are the distinct labels in first-seen
    order; scores, when the run had them, become ``score``; SAM 2 masks (``label(...,
    sam=...)``) become run-length encoded ``segmentation`` with their pixel count as ``area``.
    Error records are left out. The file is written whole or not at all, and never over the
    label file it reads.

    Raises:
        OutputError: ``output`` is the label file itself, or an existing file that is not a
            COCO JSON file (a label file, a model's config).
        LabelFileError: A record whose result cannot be read (named by file and line).

    Example:
        >>> export_coco("detections.jsonl", "detections.coco.json")  # doctest: +SKIP
    """
    from ..drawing.conversions import to_coco

    check_outputs(
        {"the COCO file": output},
        [] if isinstance(labels, list) else [labels],
        holds={"the COCO file": "COCO JSON"},
    )
    if isinstance(labels, list):
        records = labels
    else:  # a result that cannot be read is named by its file and line here
        try:
            records = read_labels(labels, as_results=True)
        except LabelFileError as error:
            fix = " Fix or delete that line, then export again."
            problem = getattr(error, "line_problem", str(error))
            raise LabelFileError(f"{problem}{fix}") from None
    categories: dict[str, int] = {}
    images, annotations = [], []
    for number, record in enumerate(records, start=1):
        result = record.get("result")
        if record.get("error") or result is None or result == {}:
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
        try:
            parsed = record_result(record)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            reason = str(error).rstrip(".")
            message = f"Record {number}: its result cannot be read ({reason})."
            raise LabelFileError(message) from None
        if not isinstance(parsed, BoxesResult | PolygonsResult):
            continue
        for name in parsed.labels:
            categories.setdefault(name, len(categories) + 1)
        found = to_coco(
            parsed, image_id=image_id, categories=categories, first_id=len(annotations) + 1
        )
        annotations += _with_masks(found, record, number)
    dataset = {
        "images": images,
        "categories": [{"id": i, "name": name} for name, i in categories.items()],
        "annotations": annotations,
    }
    write_atomically(output, json.dumps(dataset, allow_nan=False).encode("utf-8"))
    return dataset


def _with_masks(
    annotations: list[dict[str, Any]], record: dict[str, Any], number: int
) -> list[dict[str, Any]]:
    """The annotations with the record's SAM 2 masks as their segmentation, if it has them."""
    masks = record.get("masks")
    if masks is None:
        return annotations
    if len(masks) != len(annotations):
        raise LabelFileError(
            f"Record {number}: it holds {len(masks)} masks for {len(annotations)} boxes."
        )
    from ..masks.results import rle_area

    return [
        {**annotation, "segmentation": mask, "area": rle_area(mask), "mask_score": score}
        for annotation, mask, score in zip(annotations, masks, record["mask_scores"], strict=True)
    ]
