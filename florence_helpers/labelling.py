"""Label a whole image collection: one JSON line per image, resumable, errors recorded.

``label`` walks a folder (or takes a list of paths or URLs), runs one task in batches and
appends one JSON line per image as it goes. The file knows what it holds: its first line
records the job (model, task, its text, region or classes, and the generation settings that
change an answer), and every record names the image's resolved path. Started again with the
same output file, a job resumes: images already labelled by the same job are skipped (however
their path was written), a half-written last line is cut off, and no image is written twice.
A different job on the same file is refused, unless you ask to add it; a file that is not a
label file is never written to; a second process writing the same file is refused at once
(a lock beside it, ``<output>.lock``, held while a job runs). An image that cannot be read
(missing, corrupt, too large to open) or that fails in the model becomes an error record
naming it, and the run goes on; ``retry_errors=True`` redoes those records in place. Only a
mistake in the job's settings (a task that needs text and got none, a batch size of 0) stops
it, before any image is labelled. ``label_batch`` is the per-batch step, shared with the Ray
Data path (:mod:`florence_helpers.ray_labelling`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .detection import check_classes, detect
from .images import ImageLoadError, load_image
from .inference import check_generation_settings, run
from .model import FlorenceModel
from .prefetch import prefetched
from .prompts import Region, TaskInputError
from .results import AnyResult, BoxesResult, PolygonsResult, Result
from .tasks import Task, TaskSpec, UnknownTaskError, task_spec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif"}
UNREADABLE_IMAGE_SUFFIXES = {".svg", ".svgz", ".heic", ".heif"}
"""Image files Pillow cannot open: a folder's are listed, each becoming an error record that
says how to convert it, instead of being passed over without a word."""
LABEL_FILE_VERSION = 1
_HEADER = "florence_labels"
# Records and headers are written with these keys first: a torn last line that starts with
# one of them is this package's own interrupted write.
_OWN_LINE_STARTS = (b'{"image": ', b'{"' + _HEADER.encode() + b'": ')
# run() settings that change no answer, left out of a job's description.
_NOT_ANSWER_SETTINGS = {"progress", "batch_size", "fast_beams"}
_RUN_DEFAULTS = {"num_beams": 3, "max_new_tokens": 1024, "scores": False}


class LabelFileError(ValueError):
    """The output file cannot take this job: not a label file, another job's, or in use."""


@dataclass
class LabelSummary:
    """What a :func:`label` run did."""

    written: int
    errors: int
    skipped: int
    output: Path
    retried: int = 0


def find_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursively, by extension), sorted for a stable order.

    Files that Pillow cannot open (SVG, HEIC; :data:`UNREADABLE_IMAGE_SUFFIXES`) are listed
    too, so that labelling gives each an error record saying what to do with it.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ImageLoadError(f"Not a folder: {root}")
    suffixes = IMAGE_SUFFIXES | UNREADABLE_IMAGE_SUFFIXES
    return sorted(str(path) for path in root.rglob("*") if path.suffix.lower() in suffixes)


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

    A record is ``{"image", "path", "width", "height", "task", "result", "error"}``:
    ``image`` as given, ``path`` resolved (an absolute path without symbolic links, or the
    URL), ``result`` the parsed result (:meth:`Result.to_dict` without the size and task it
    repeats) and ``error`` None; or ``result`` None and ``error`` the reason. ``loaded``
    may hold the images already read by :func:`read_images`. ``classes`` runs
    :func:`~florence_helpers.detect` instead (the task must then be
    ``OPEN_VOCABULARY_DETECTION``).
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
        "path": resolved_path(source),
        "width": size[0] if size else None,
        "height": size[1] if size else None,
        "task": spec.token,
        "result": payload,
        "error": error,
    }


def resolved_path(source: str | os.PathLike) -> str:
    """The key an image is resumed by: its absolute path without symbolic links, or its URL.

    ``imgs/a.jpg``, ``./imgs/a.jpg`` and ``/home/me/imgs/a.jpg`` are one image.
    """
    text = os.fspath(source)
    if "://" in text:
        return text
    return os.path.realpath(os.path.expanduser(text))


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
        on_error: What to do with a line that is not a record (cut, edited by hand): "raise"
            a :class:`LabelFileError` naming the file and line, or "skip" it with a warning.

    Raises:
        LabelFileError: A line that is not a label record, with ``on_error="raise"``.
        FileNotFoundError: No such file or folder.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"No label file or folder at {target}.")
    files = sorted(target.glob("*.json*")) if target.is_dir() else [target]
    records = []
    for file in files:
        for number, record in _numbered_records(file, on_error):
            if isinstance(record.get("result"), str):
                record["result"] = json.loads(record["result"])
            if as_results:
                try:
                    record["result"] = record_result(record)
                except (KeyError, TypeError, ValueError) as error:
                    _bad_line(file, number, f"its result cannot be read ({error})", on_error)
                    continue
            records.append(record)
    return records


def _numbered_records(file: Path, on_error: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The records of one label file with their line numbers (job lines left out)."""
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise LabelFileError(f"{file} is not a label file: not UTF-8 text ({error}).") from None
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: an interrupted write
                continue
            _bad_line(file, number, f"not valid JSON ({error.msg})", on_error)
            continue
        if isinstance(record, dict) and _HEADER in record:
            continue
        if not isinstance(record, dict) or "image" not in record or "task" not in record:
            _bad_line(file, number, "not a label record (no image and task)", on_error)
            continue
        yield number, record


def _bad_line(file: Path, number: int, problem: str, on_error: str) -> None:
    message = f"{file} line {number}: {problem}."
    if on_error == "raise":
        raise LabelFileError(message + " Pass on_error='skip' to read the other lines.")
    warnings.warn(f"Skipped {message}", stacklevel=4)


def record_result(record: dict[str, Any]) -> AnyResult | None:
    """The typed result of a labelling record (None for an error record)."""
    result = record.get("result")
    if result is None or isinstance(result, Result):
        return result
    size = (record["width"], record["height"])
    return Result.from_dict(result, task=record["task"], image_size=size)


def job_settings(
    model_id: str,
    task: str | Task | TaskSpec,
    *,
    text: str | None = None,
    region: Region | None = None,
    classes: Sequence[str] | None = None,
    **run_kwargs: Any,
) -> dict[str, Any]:
    """What a labelling job is, as its label file records it: everything that changes an
    answer (model, task, text, region, classes, beams, token limit, scores, other generation
    settings), and nothing that does not (batch size, progress bar)."""
    spec = task_spec(task)
    settings: dict[str, Any] = {
        "model": str(model_id),
        "task": spec.token,
        "result": spec.result.value,
        "text": text,
        "region": [float(v) for v in region] if region is not None else None,
        "classes": list(classes) if classes is not None else None,
        **_RUN_DEFAULTS,
    }
    for name, value in sorted(run_kwargs.items()):
        if name not in _NOT_ANSWER_SETTINGS:
            settings[name] = _as_json(value)
    return settings


def _as_json(value: Any) -> Any:
    """A JSON value standing for a setting (objects by their type's name)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return f"<{type(value).__name__}>"
    return value


@dataclass
class _Contents:
    """What a label file already holds, for one job."""

    done: set[str]  # resolved paths this job labelled
    errors: set[str]  # of those, the ones whose record is an error
    other_jobs: list[dict[str, Any]]
    last_job: dict[str, Any] | None  # the job the file's last lines belong to
    keep: int  # bytes of whole lines (a torn last line of ours is cut there)
    size: int


def check_label_file(
    output: str | os.PathLike, job: dict[str, Any], *, add: bool = False
) -> _Contents:
    """Check that ``output`` can take this job's labels, without writing anything.

    Raises:
        LabelFileError: ``output`` is a folder, cannot be written, is not a label file, or
            holds another job's labels (unless ``add``). The message says which, and what to do.
    """
    out = Path(output)
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
        different = [k for k in sorted(set(job) | set(theirs)) if job.get(k) != theirs.get(k)]
        described = "; ".join(
            f"{k}: {theirs.get(k)!r} there, {job.get(k)!r} now" for k in different
        )
        raise LabelFileError(
            f"{out} holds labels of another job ({described}). Write to another file, or "
            "pass add=True (--add on the command line) to add this job's labels to it."
        )
    return contents


def _scan(out: Path, job: dict[str, Any]) -> _Contents:
    """Read an existing label file; refuse anything that is not one."""
    empty = _Contents(set(), set(), [], None, 0, 0)
    if not out.exists():
        return empty
    data = out.read_bytes()
    empty.size = len(data)
    if not data.strip():
        return empty
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: b"" when the file ends with one
    if tail.strip() and not tail.startswith(_OWN_LINE_STARTS):
        # A file of ours ends with a newline; if not, only a torn line of ours may follow it.
        raise LabelFileError(
            f"{out} is not a label file (it does not end as one does), so it is left as it "
            "is: choose another output file."
        )
    contents = _Contents(set(), set(), [], None, len(data) - len(tail), len(data))
    current: dict[str, Any] | None = None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            entry = None
        if isinstance(entry, dict) and _HEADER in entry and isinstance(entry.get("job"), dict):
            current = entry["job"]
            if current != job and current not in contents.other_jobs:
                contents.other_jobs.append(current)
            contents.last_job = current
            continue
        if not isinstance(entry, dict) or "image" not in entry or "task" not in entry:
            raise LabelFileError(
                f"{out} is not a label file (line {number} is not a label record), so it is "
                "left as it is: choose another output file."
            )
        owner = current if current is not None else {"task": entry["task"]}
        if current is None:  # written before label files recorded their job: task only
            contents.last_job = None
            if entry["task"] != job["task"] and owner not in contents.other_jobs:
                contents.other_jobs.append(owner)
        if current is None and entry["task"] != job["task"]:
            continue
        if current is not None and current != job:
            continue
        key = entry.get("path") or resolved_path(str(entry["image"]))
        contents.done.add(key)
        if entry.get("error") is not None:
            contents.errors.add(key)
        else:
            contents.errors.discard(key)
    return contents


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold ``<out>.lock`` exclusively while the block runs; refuse at once if it is held."""
    lock = out.with_name(out.name + ".lock")
    while True:
        handle = open(lock, "a+b")  # noqa: SIM115 - closed below
        try:
            _lock(handle)
        except OSError:
            handle.close()
            raise LabelFileError(
                f"{out} is being written by another labelling process ({lock} is held). "
                "Wait for it to finish, or write to another file."
            ) from None
        try:  # the lock file may have been removed by its last holder while we opened it
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        handle.close()


def _lock(handle: Any) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _json_line(entry: dict[str, Any]) -> str:
    """One JSON line; file names that are not valid UTF-8 are written as escapes."""
    line = json.dumps(entry, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(entry)  # \udcXX escapes: read back, os.fsencode gives the bytes
    return line + "\n"


class _Appender:
    """Appends whole lines to the label file; a failed write leaves no partial line."""

    def __init__(self, handle: Any, out: Path) -> None:
        self.handle, self.out, self.records = handle, out, 0

    def write(self, lines: str, records: int = 0) -> None:
        position = self.handle.tell()
        try:
            self.handle.write(lines.encode("utf-8"))
            self.handle.flush()
            os.fsync(self.handle.fileno())
        except OSError as error:
            with contextlib.suppress(OSError):
                self.handle.truncate(position)
            reason = error.strerror or str(error)
            raise OSError(
                error.errno,
                f"Could not write to {self.out}: {reason}. The {self.records} records "
                "written before are intact. Fix the problem (free disk space, for example) "
                "and run the same job again: it resumes where it stopped.",
            ) from None
        self.records += records


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
    add: bool = False,
    retry_errors: bool = False,
    **run_kwargs: Any,
) -> LabelSummary:
    """Label every image of a folder (or list) into a JSONL file, resuming where it stopped.

    Args:
        florence: What :func:`load_model` returned.
        sources: A folder (searched recursively) or an iterable of paths and URLs.
        task: The task to run on every image.
        output: The label file: created, or appended to by the same job, which skips the
            images it already labelled (by resolved path, however they are written).
        text, region: The task's extra input, the same for every image.
        classes: Class names to detect in every image with :func:`~florence_helpers.detect`
            (task ``OPEN_VOCABULARY_DETECTION``); boxes are labelled with these names.
        batch_size: Images per ``generate`` call.
        progress: Show a progress bar with images/s and the time left.
        add: Add this job's labels to a file that holds another job's (the file then holds
            both; each record names its task).
        retry_errors: Label again the images whose record is an error (a passing failure: out
            of memory, a network error); their error records are replaced, not repeated.
        **run_kwargs: Passed to :func:`run` (``num_beams``, ``max_new_tokens``, ``scores``).

    Returns:
        How many records were written, how many of them are errors, how many images were
        skipped as already done, and how many error records were retried.

    Raises:
        TaskInputError: A mistake in the job's settings; nothing is written.
        LabelFileError: ``output`` is not a label file, holds another job's labels, cannot
            be written, or another process is writing it; nothing is written.
        OSError: Writing failed part-way (a full disk): every record written before is
            intact and the same call resumes.

    Example:
        >>> label(florence, "images", "DETAILED_CAPTION", "captions.jsonl")  # doctest: +SKIP
    """
    spec = task_spec(task)
    check_generation_settings(
        run_kwargs.get("num_beams", 3), run_kwargs.get("max_new_tokens", 1024), batch_size
    )
    _inference(florence, spec, text, region, classes)  # a settings mistake stops it here
    if isinstance(sources, (str, os.PathLike)) and Path(sources).is_dir():
        paths = find_images(sources)
    elif isinstance(sources, (str, os.PathLike)):
        paths = [os.fspath(sources)]
    else:
        paths = [os.fspath(source) for source in sources]
    out = Path(output)
    job = job_settings(
        florence.model_id, spec, text=text, region=region, classes=classes, **run_kwargs
    )
    check_label_file(out, job, add=add)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        contents = check_label_file(out, job, add=add)  # again, now that no one else writes
        retried = _drop_error_records(out, job, contents) if retry_errors else set()
        if retried:
            contents = check_label_file(out, job, add=add)
        skip = contents.done - contents.errors if retry_errors else contents.done
        unique = dict.fromkeys((resolved_path(p), p) for p in paths)
        todo, seen = [], set()
        for key, path in unique:
            if key not in skip and key not in seen:
                seen.add(key)
                todo.append(path)
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        written = errors = 0
        bar = tqdm(total=len(todo), desc=spec.name, unit="img", disable=not progress)
        with open(out, "r+b" if out.exists() else "w+b") as handle, bar:
            if contents.keep != contents.size:
                handle.truncate(contents.keep)  # the torn last line of an interrupted run
            handle.seek(0, os.SEEK_END)
            writer = _Appender(handle, out)
            if todo and contents.last_job != job:
                header = {_HEADER: LABEL_FILE_VERSION, "job": job}
                writer.write(_json_line(header))
            inputs = {"text": text, "region": region, "classes": classes}
            for records in _labelled_batches(florence, batches, spec, inputs, run_kwargs):
                # One write per batch, flushed to disk: a kill loses at most this batch.
                writer.write("".join(_json_line(r) for r in records), len(records))
                written += len(records)
                errors += sum(r["error"] is not None for r in records)
                bar.update(len(records))
    return LabelSummary(
        written=written,
        errors=errors,
        skipped=len(paths) - len(todo),
        output=out,
        retried=len(retried),
    )


def _drop_error_records(out: Path, job: dict[str, Any], contents: _Contents) -> set[str]:
    """Rewrite the file without this job's error records (atomically); their paths."""
    if not contents.errors:
        return set()
    kept: list[bytes] = []
    current: dict[str, Any] | None = None
    for raw in out.read_bytes()[: contents.keep].split(b"\n"):
        if not raw.strip():
            continue
        entry = json.loads(raw.decode("utf-8"))
        if _HEADER in entry:
            current = entry["job"]
        elif (current == job or (current is None and entry["task"] == job["task"])) and (
            entry.get("error") is not None
            and (entry.get("path") or resolved_path(entry["image"])) in contents.errors
        ):
            continue
        kept.append(raw + b"\n")
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(b"".join(kept))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return set(contents.errors)


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
