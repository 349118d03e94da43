"""The label file: JSON lines that say which job wrote them, read back, resumed and exported.

A label file's first line records the job (model, adapter, task, its text, region or classes,
and every setting that changes an answer); each following line is one image's record. This
module decides what such a file holds and whether a job may write to it: the same job resumes,
another job is refused unless added, a file that is not a label file is never written, a
torn last line of an interrupted run is cut off, and a second writer is refused at once (a
lock beside it, ``.<name>.florence-lock``). :mod:`florence_helpers.labelling` runs the jobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..boundary.inputs import (
    DEFAULT_MAX_PIXELS,
    InputError,
    expand_path,
    is_url,
    local_path,
    open_regular,
    read_file,
    read_head,
)
from ..boundary.outputs import (
    InUseError,
    lock_path,  # noqa: F401 - where label code has looked for it
    one_writer,
    write_atomically,
)
from ..language.prompts import Region
from ..language.tasks import Task, TaskSpec, task_spec

LABEL_FILE_VERSION = 1
HEADER = "florence_labels"


# Records and headers are written with these keys first: a torn last line that starts with
# one of them is this package's own interrupted write.
_OWN_LINE_STARTS = (b'{"image": ', b'{"' + HEADER.encode() + b'": ')


# run() settings that change no answer, left out of a job's description.
_NOT_ANSWER_SETTINGS = {"progress", "batch_size", "fast_beams"}
_RUN_DEFAULTS = {"num_beams": 3, "max_new_tokens": 1024, "scores": False}


# Written into jobs after some label files were: a job line without them was written by an
# older version, and is read as "no adapter" and "dtype not recorded".
_LATER_KEYS = {"adapter": None, "dtype": None, "weights": None, "masks": None}
_UNRECORDED_MATCHES = ("dtype", "weights")  # not in an older job line: anything resumes it
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


class LabelFileError(ValueError):
    """The output file cannot take this job: not a label file, another job's, or in use."""


def resolved_path(source: str | os.PathLike) -> str:
    """The key an image is resumed by: its absolute path without symbolic links, or its URL.

    ``imgs/a.jpg``, ``./imgs/a.jpg`` and ``/home/me/imgs/a.jpg`` are one image.
    """
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if is_url(text):
        return text
    return os.path.realpath(os.path.expanduser(local_path(text)))


def model_key(model_id: str | os.PathLike) -> str:
    """A model as a job records it: a local folder by its resolved path (``dir/``, ``./dir``
    and a link to it are one model), a hub id as written."""
    text = os.fspath(model_id)
    local = os.path.expanduser(text)
    return os.path.realpath(local) if os.path.isdir(local) else text


def weights_key(model_id: str | os.PathLike) -> str | None:
    """For a local model folder, a fingerprint of its files (names, sizes, modification
    times): weights replaced in place make another job. None for a hub id (its revision is
    fixed by the hub's cache)."""
    folder = os.path.expanduser(os.fspath(model_id))
    if not os.path.isdir(folder):
        return None
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith(_WEIGHT_SUFFIXES):
            info = entry.stat()
            digest.update(f"{entry.name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return "files:" + digest.hexdigest()[:16]


def job_settings(
    model_id: str,
    task: str | Task | TaskSpec,
    *,
    text: str | None = None,
    region: Region | None = None,
    classes: Sequence[str] | None = None,
    adapter: str | None = None,
    dtype: str | None = None,
    masks: dict[str, Any] | None = None,
    **run_kwargs: Any,
) -> dict[str, Any]:
    """What a labelling job is, as its label file records it: everything that changes an
    answer (model, its files' fingerprint, adapter, weights' dtype, task, text, region,
    classes, beams, token limit, scores, other generation settings, the SAM 2 model drawing
    masks), and nothing that does not (batch size, progress)."""
    spec = task_spec(task)
    settings: dict[str, Any] = {
        "model": model_key(model_id),
        "weights": weights_key(model_id),
        "adapter": adapter,
        "dtype": dtype,
        "task": spec.token,
        "result": spec.result.value,
        "text": text,
        "region": [float(v) for v in region] if region is not None else None,
        "classes": list(classes) if classes is not None else None,
        "masks": masks,
        **_RUN_DEFAULTS,
    }
    for name, value in sorted(run_kwargs.items()):
        if name not in _NOT_ANSWER_SETTINGS:
            settings[name] = _as_json(value)
    return settings


def same_job(recorded: dict[str, Any], job: dict[str, Any]) -> bool:
    """Whether a job line read from a file describes ``job`` (older lines lack some keys)."""
    return _differences(recorded, job) == []


def _differences(recorded: dict[str, Any], job: dict[str, Any]) -> list[str]:
    theirs = {**_LATER_KEYS, **recorded}
    if isinstance(theirs.get("model"), str):
        theirs["model"] = model_key(theirs["model"])
    for key in _UNRECORDED_MATCHES:
        if key not in recorded:
            theirs[key] = job.get(key)
    return [k for k in sorted(set(job) | set(theirs)) if job.get(k) != theirs.get(k)]


def _as_json(value: Any) -> Any:
    """A JSON value standing for a setting (objects by their type's name)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return f"<{type(value).__name__}>"
    return value


def json_line(entry: dict[str, Any]) -> str:
    """One JSON line; file names that are not valid UTF-8 are written as escapes."""
    line = json.dumps(entry, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(entry)  # \udcXX escapes: read back, os.fsencode gives the bytes
    return line + "\n"


def header_line(job: dict[str, Any]) -> str:
    return json_line({HEADER: LABEL_FILE_VERSION, "job": job})


@dataclass
class FileContents:
    """What a label file already holds, for one job."""

    done: set[str]  # resolved paths this job labelled
    errors: set[str]  # of those, the ones whose record is an error
    other_jobs: list[dict[str, Any]]
    last_job: dict[str, Any] | None  # the job the file's last lines belong to
    keep: int  # bytes of whole lines (a torn last line of ours is cut there)
    size: int
    needs_newline: bool = False  # a whole last record written without its newline


def check_label_file(
    output: str | os.PathLike, job: dict[str, Any], *, add: bool = False
) -> FileContents:
    """Check that ``output`` can take this job's labels, without writing anything.

    Raises:
        LabelFileError: ``output`` is a folder, cannot be written, is not a label file, or
            holds another job's labels (unless ``add``). The message says which, and what to do.
    """
    out = expand_path(output)
    if out.is_dir():
        raise LabelFileError(f"{out} is a folder: give a file name for the labels (--out).")
    folder = out.parent if str(out.parent) else Path(".")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LabelFileError(f"Cannot write {out}: {existing} is not a folder you can write to.")
    if out.exists() and not out.is_file():
        raise LabelFileError(f"{out} is not a regular file: give a file name for the labels.")
    if out.exists() and not os.access(out, os.R_OK | os.W_OK):
        raise LabelFileError(f"Cannot write {out}: you may not read and write that file.")
    contents = _scan(out, job)
    if contents.other_jobs and not add:
        theirs = contents.other_jobs[0]
        full = {**_LATER_KEYS, **theirs}
        described = "; ".join(
            f"{k}: {full.get(k)!r} there, {job.get(k)!r} now" for k in _differences(theirs, job)
        )
        raise LabelFileError(
            f"{out} holds labels of another job ({described}). Write to another file, or "
            "pass add=True (--add on the command line) to add this job's labels to it."
        )
    return contents


def _not_a_label_file(out: Path, why: str) -> LabelFileError:
    return LabelFileError(
        f"{out} is not a label file ({why}), so it is left as it is: choose another output file."
    )


_FIRST_LINE_BYTES = 16 * 2**20  # far longer than any record this package writes


def _check_first_line(out: Path, head: bytes) -> None:
    """Refuse a file whose first whole line is no label line before reading the rest (a file
    of many gigabytes, or a sparse one, is not read to find out it is not a label file)."""
    first, newline, _ = head.lstrip().partition(b"\n")
    if not newline and len(head) == _FIRST_LINE_BYTES:
        raise _not_a_label_file(out, "line 1 is longer than any label record")
    entry = _parsed(first) if newline else None
    if newline and not (_is_header(entry) or _is_entry(entry)):
        raise _not_a_label_file(out, "line 1 is not a label record")


def _check_line_lengths(out: Path) -> None:
    """Refuse a file with a line longer than any record before reading it whole: a label line
    followed by a sparse hole of gigabytes is no label file (one pass, a chunk at a time)."""
    run = 0
    with open_regular(out) as handle:
        while chunk := handle.read(1 << 20):
            newline = chunk.rfind(b"\n")
            if newline < 0:
                run += len(chunk)
            else:
                first, *others = chunk[:newline].split(b"\n")
                if max([run + len(first), *map(len, others)]) > _FIRST_LINE_BYTES:
                    break
                run = len(chunk) - newline - 1
            if run > _FIRST_LINE_BYTES:
                break
        else:
            return
    raise _not_a_label_file(out, "a line is longer than any label record")


def _scan(out: Path, job: dict[str, Any]) -> FileContents:
    """Read an existing label file; refuse anything that is not one."""
    empty = FileContents(set(), set(), [], None, 0, 0)
    if not out.exists():
        return empty
    try:  # any size (it grows with every job), but a regular file
        _check_first_line(out, read_head(out, _FIRST_LINE_BYTES))
        _check_line_lengths(out)
        data = read_file(out, max_bytes=None)
    except InputError as error:
        raise LabelFileError(str(error)) from None
    empty.size = len(data)
    if not data.strip():
        return empty
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: b"" when the file ends with one
    keep, needs_newline = len(data) - len(tail), False
    if tail.strip():
        whole = _parsed(tail)
        if _is_entry(whole):  # a whole line whose newline is missing: keep it
            lines.append(tail)
            keep, needs_newline = len(data), True
        elif whole is not None or not tail.startswith(_OWN_LINE_STARTS):
            raise _not_a_label_file(out, "it does not end as one does")
        elif not any(_is_header(_parsed(raw)) for raw in lines):
            # Only a file this package wrote (it starts with a job line) has torn lines cut.
            raise _not_a_label_file(out, "its only line is not a whole record")
    contents = FileContents(set(), set(), [], None, keep, len(data), needs_newline)
    current: dict[str, Any] | None = None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        entry = _parsed(raw)
        if _is_header(entry):
            current = entry["job"]
            if not same_job(current, job) and current not in contents.other_jobs:
                contents.other_jobs.append(current)
            contents.last_job = current
            continue
        if not _is_entry(entry):
            raise _not_a_label_file(out, f"line {number} is not a label record")
        ours = _belongs(entry, current, job)
        if current is None:  # written before label files recorded their job: task only
            contents.last_job = None
            owner = {"task": entry["task"]}
            if not ours and owner not in contents.other_jobs:
                contents.other_jobs.append(owner)
        if not ours:
            continue
        key = record_key(entry)
        contents.done.add(key)
        if entry.get("error") is not None:
            contents.errors.add(key)
        else:
            contents.errors.discard(key)
    return contents


def _parsed(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _is_header(entry: Any) -> bool:
    return isinstance(entry, dict) and HEADER in entry and isinstance(entry.get("job"), dict)


def _is_entry(entry: Any) -> bool:
    """A job line, or a record whose fields have the types this package writes."""
    if _is_header(entry):
        return True
    return isinstance(entry, dict) and check_record(entry) is None


def check_record(entry: dict[str, Any]) -> str | None:
    """What is wrong with a record's fields (None if nothing): the reason, for messages."""
    if not isinstance(entry.get("image"), str) or not isinstance(entry.get("task"), str):
        return "not a label record (no image and task)"
    if not isinstance(entry.get("path", ""), str | None):
        return "its path is not text"
    if not isinstance(entry.get("error"), str | None):
        return "its error is not text"
    for side in ("width", "height"):
        value = entry.get(side)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            return f"its {side} is not a whole number"
        if value is not None and value < 1:
            return f"its {side} is not a number of pixels"
    if (entry.get("width") or 1) * (entry.get("height") or 1) > DEFAULT_MAX_PIXELS:
        return "its width and height are larger than any image labelled"
    if not isinstance(entry.get("result"), dict | str | None):
        return "its result is not an object"
    return None


def _belongs(entry: dict[str, Any], current: dict[str, Any] | None, job: dict[str, Any]) -> bool:
    if current is None:
        return entry["task"] == job["task"]
    return same_job(current, job)


def record_key(entry: dict[str, Any]) -> str:
    """The resolved path a record is resumed by."""
    return entry.get("path") or resolved_path(entry["image"])


def drop_error_records(out: Path, job: dict[str, Any], keys: set[str], keep: int) -> set[str]:
    """Rewrite ``out`` without this job's error records for ``keys``; the keys dropped.

    Only those records go: the rest of the file, other jobs' and other folders' records
    included, is written back byte for byte, atomically, keeping the file's mode, owner and
    symbolic link.
    """
    kept: list[bytes] = []
    dropped: set[str] = set()
    current: dict[str, Any] | None = None
    for raw in read_file(out, max_bytes=None)[:keep].split(b"\n"):
        if not raw.strip():
            continue
        entry = _parsed(raw)
        if _is_header(entry):
            current = entry["job"]
        elif (
            _belongs(entry, current, job)
            and entry.get("error") is not None
            and record_key(entry) in keys
        ):
            dropped.add(record_key(entry))
            continue
        kept.append(raw + b"\n")
    if dropped and os.stat(out).st_nlink > 1:
        raise LabelFileError(
            f"{out} has {os.stat(out).st_nlink} hard links: retrying its errors rewrites it, "
            "which would leave the other names with the old records. Label into a copy."
        )
    if dropped:
        write_atomically(out, b"".join(kept))
    return dropped


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the label file's lock while the block runs; refuse at once if another labelling
    process holds it (see :func:`~florence_helpers.boundary.outputs.one_writer`)."""
    try:
        with one_writer(out):
            yield
    except InUseError as error:
        raise LabelFileError(
            f"{out} is being written by another labelling process ({error.lock} is locked). "
            "Wait for it to finish, or write to another file."
        ) from None
