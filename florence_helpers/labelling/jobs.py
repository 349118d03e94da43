"""Label a whole image collection: one JSON line per image, resumable, errors recorded.

``label`` walks a folder (or takes a list of paths or URLs), runs one task in batches and
appends one JSON line per image as it goes. The file knows what it holds
(:mod:`florence_helpers.labelling.files`): its first line records the job (model, adapter, task,
its text, region or classes, and every setting that changes an answer), and every record names
the image's resolved path. Started again with the same output file, a job resumes: images
already labelled by the same job are skipped (however their path was written), a half-written
last line is cut off, and no image is written twice. A different job on the same file is
refused, unless you ask to add it; a file that is not a label file is never written to; a
second process writing the same file is refused at once. An image that cannot be read
(missing, corrupt, too large to open) or that fails in the model becomes an error record
naming it, and the run goes on; ``retry_errors=True`` redoes those records in place. A mistake
in the job's settings (a task that needs text and got none, a batch size of 0, a token limit
the model cannot write, an output that is one of the images) stops it before anything is
written. ``label_batch`` is the per-batch step, shared with the Ray Data path
(:mod:`florence_helpers.labelling.ray`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..boundary.images import ImageLoadError, load_image
from ..boundary.inputs import expand_path, is_url, local_path
from ..boundary.outputs import Appender, check_outputs, resolved
from ..language.prompts import Region, TaskInputError, build_prompt
from ..language.tasks import Task, TaskSpec, UnknownTaskError, task_spec
from ..masks.sam import SamModel
from ..model.detection import check_classes, detect
from ..model.inference import check_generation_settings, check_prompt_lengths, run
from ..model.loading import FlorenceModel
from ..model.prefetch import prefetched
from .files import (
    FileContents,
    check_label_file,
    drop_error_records,
    header_line,
    job_settings,
    json_line,
    locked,
    resolved_path,
    same_job,
)
from .masks import check_masks_task, mask_fields, masks_job

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif"}
UNREADABLE_IMAGE_SUFFIXES = {".svg", ".svgz", ".heic", ".heif"}
"""Image files Pillow cannot open: a folder's are listed, each becoming an error record that
says how to convert it, instead of being passed over without a word."""


@dataclass
class LabelSummary:
    """What a :func:`label` run did."""

    written: int
    errors: int
    skipped: int
    output: Path
    retried: int = 0


class LabellingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`label`: ``summary`` says what was written before it (all of it
    whole and kept; the same call resumes)."""

    def __init__(self, summary: LabelSummary) -> None:
        super().__init__(
            f"Interrupted after writing {summary.written} records to {summary.output}."
        )
        self.summary = summary


def find_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursively, by extension), sorted for a stable order.

    Files that Pillow cannot open (SVG, HEIC; :data:`UNREADABLE_IMAGE_SUFFIXES`) are listed
    too, so that labelling gives each an error record saying what to do with it.

    Raises:
        ImageLoadError: ``folder`` is not a folder, or one of its subfolders cannot be read
            (its images would be left out without a word).
    """
    root = expand_path(folder)
    if not root.is_dir():
        raise ImageLoadError(f"Not a folder: {root}")
    suffixes = IMAGE_SUFFIXES | UNREADABLE_IMAGE_SUFFIXES
    unreadable: list[OSError] = []
    found = []
    for parent, _, files in os.walk(root, onerror=unreadable.append):
        found += [os.path.join(parent, f) for f in files if Path(f).suffix.lower() in suffixes]
    if unreadable:
        names = ", ".join(f"{e.filename} ({e.strerror or e})" for e in unreadable[:3])
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        raise ImageLoadError(
            f"Cannot read every folder under {root}: {names}{more}. Their images would be left "
            "out: fix the permissions, or pass the images you want as a list."
        )
    return sorted(found)


def _image_list(sources: str | bytes | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The images a job labels: a folder's, one file or URL, or the list given."""
    if not isinstance(sources, (str, bytes, os.PathLike)):  # bytes: one path, not a list
        return [os.fsdecode(os.fspath(source)) for source in sources]
    text = os.fsdecode(os.fspath(sources))
    if is_url(text):
        return [text]
    path = expand_path(local_path(text))
    if path.is_dir():
        return find_images(path)
    if not path.exists():
        raise ImageLoadError(
            f"No folder or image file at {text}: give a folder of images, an image file or a "
            "list of them."
        )
    return [text]


def label_batch(
    florence: FlorenceModel,
    sources: Sequence[str],
    task: str | Task | TaskSpec,
    *,
    text: str | None = None,
    region: Region | None = None,
    classes: Sequence[str] | None = None,
    loaded: Sequence[Any] | None = None,
    sam: SamModel | None = None,
    **run_kwargs: Any,
) -> list[dict[str, Any]]:
    """Label one batch: one record per source, in order; unreadable images become errors.

    A record is ``{"image", "path", "width", "height", "task", "result", "error"}``:
    ``image`` as given, ``path`` resolved (an absolute path without symbolic links, or the
    URL), ``result`` the parsed result (:meth:`Result.to_dict` without the size and task it
    repeats) and ``error`` None; or ``result`` None and ``error`` the reason. ``loaded``
    may hold the images already read by :func:`read_images`. ``classes`` runs
    :func:`~florence_helpers.detect` instead (the task must then be
    ``OPEN_VOCABULARY_DETECTION``). With ``sam``, each record also gets ``masks`` and
    ``mask_scores`` (:mod:`florence_helpers.labelling.masks`).
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
            records[index] = _finished(sources[index], spec, image, result, sam)
    return records  # type: ignore[return-value]


def _finished(
    source: str, spec: TaskSpec, image: Any, result: Any, sam: SamModel | None
) -> dict[str, Any]:
    """One image's record: its result (with SAM 2's masks, when asked), or its error."""
    if isinstance(result, Exception):
        return _record(source, spec, size=image.size, error=_describe(result))
    try:
        fields = mask_fields(sam, image, result) if sam is not None else {}
    except Exception as error:  # noqa: BLE001 - recorded for this image, the job goes on
        return _record(source, spec, size=image.size, error=f"SAM 2: {_describe(error)}")
    return {**_record(source, spec, size=image.size, result=result), **fields}


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
    sam: SamModel | None = None,
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
        retry_errors: Label again the images of ``sources`` whose record is an error (a
            passing failure: out of memory, a network error); their error records are
            replaced, not repeated, and every other record is left as it was.
        sam: A SAM 2 model (:func:`~florence_helpers.masks.load_sam`): each record's boxes
            also get a mask, run-length encoded (:mod:`florence_helpers.labelling.masks`).
        **run_kwargs: Passed to :func:`run` (``num_beams``, ``max_new_tokens``, ``scores``).

    Returns:
        How many records were written, how many of them are errors, how many images were
        skipped as already done, and how many error records were retried.

    Raises:
        TaskInputError: A mistake in the job's settings (including a prompt or token limit
            the model cannot take); nothing is written.
        ImageLoadError: ``sources`` names no folder or file, or a subfolder cannot be read;
            nothing is written.
        OutputError: ``output`` is one of the images; nothing is written.
        LabelFileError: ``output`` is not a label file, holds another job's labels, cannot
            be written, or another process is writing it; nothing is written.
        OSError: Writing failed part-way (a full disk): every record written before is
            intact and the same call resumes.
        LabellingInterrupted: Ctrl-C; its ``summary`` says what was written, all of it whole.

    Example:
        >>> label(florence, "images", "DETAILED_CAPTION", "captions.jsonl")  # doctest: +SKIP
    """
    spec = task_spec(task)
    check_generation_settings(
        run_kwargs.get("num_beams", 3), run_kwargs.get("max_new_tokens", 1024), batch_size
    )
    _inference(florence, spec, text, region, classes)  # a settings mistake stops it here
    if sam is not None:
        check_masks_task(spec, classes)
    paths = _image_list(sources)
    out = expand_path(output)
    _check_output(out, paths, [florence, sam])
    check_job_fits(florence, spec, text, region, classes, run_kwargs.get("max_new_tokens", 1024))
    job = job_for(florence, spec, text=text, region=region, classes=classes, sam=sam, **run_kwargs)
    check_label_file(out, job, add=add)
    Path(resolved(out)).parent.mkdir(parents=True, exist_ok=True)  # a link's target's folder
    summary = LabelSummary(written=0, errors=0, skipped=0, output=out)
    with locked(out):
        contents = check_label_file(out, job, add=add)  # again, now that no one else writes
        unique = list(dict.fromkeys((resolved_path(p), p) for p in paths))
        if retry_errors:
            wanted = {key for key, _ in unique if key in contents.errors}
            retried = drop_error_records(out, job, wanted, contents.keep) if wanted else set()
            if retried:
                contents = check_label_file(out, job, add=add)
            summary.retried = len(retried)
        todo, seen = [], set()
        for key, path in unique:
            if key not in contents.done and key not in seen:
                seen.add(key)
                todo.append(path)
        summary.skipped = len(paths) - len(todo)
        if not todo:
            return summary
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        inputs = {"text": text, "region": region, "classes": classes, "sam": sam}
        try:
            _write_batches(
                florence, out, job, contents, batches, spec, inputs, run_kwargs, summary, progress
            )
        except KeyboardInterrupt:
            raise LabellingInterrupted(summary) from None
    return summary


def _check_output(out: Path, paths: list[str], models: list[Any]) -> None:
    """Refuse an output that is one of the images or inside a model's folder."""
    folders = [expand_path(str(m.model_id)) for m in models if m is not None]
    check_outputs(
        {"output": out},
        [local_path(p) for p in paths if not is_url(p)],
        folders=[folder for folder in folders if folder.is_dir()],
    )


def _write_batches(
    florence: FlorenceModel,
    out: Path,
    job: dict[str, Any],
    contents: FileContents,
    batches: list[list[str]],
    spec: TaskSpec,
    inputs: dict[str, Any],
    run_kwargs: dict[str, Any],
    summary: LabelSummary,
    progress: bool,
) -> None:
    """Append each batch's records as one whole write (the job line goes with the first)."""
    prefix = "\n" if contents.needs_newline else ""
    if contents.last_job is None or not same_job(contents.last_job, job):
        prefix += header_line(job)
    total = sum(len(batch) for batch in batches)
    bar = tqdm(total=total, desc=spec.name, unit="img", disable=not progress)
    with Appender.open(out, keep=contents.keep) as writer, bar:
        for records in _labelled_batches(florence, batches, spec, inputs, run_kwargs):
            # One write per batch, flushed to disk: a kill loses at most this batch.
            try:
                writer.write((prefix + "".join(json_line(r) for r in records)).encode("utf-8"))
            except OSError as error:
                raise OSError(
                    error.errno,
                    f"Could not write to {out}: {error.strerror or error}. The "
                    f"{summary.written} records written before are intact. Fix the problem "
                    "(free disk space, for example) and run the same job again: it resumes "
                    "where it stopped.",
                ) from None
            prefix = ""
            summary.written += len(records)
            summary.errors += sum(r["error"] is not None for r in records)
            bar.update(len(records))


def job_for(
    florence: FlorenceModel,
    task: str | Task | TaskSpec,
    *,
    text: str | None = None,
    region: Region | None = None,
    classes: Sequence[str] | None = None,
    sam: SamModel | None = None,
    **run_kwargs: Any,
) -> dict[str, Any]:
    """The job :func:`label` records for this model (its adapter and dtype included), and
    for the SAM 2 model that draws masks, if any."""
    from ..model.adapters import adapter_fingerprint

    return job_settings(
        florence.model_id,
        task,
        text=text,
        region=region,
        classes=classes,
        adapter=adapter_fingerprint(florence),
        dtype=str(florence.dtype).removeprefix("torch."),
        masks=masks_job(sam),
        **run_kwargs,
    )


def check_job_fits(
    florence: FlorenceModel,
    spec: TaskSpec,
    text: str | None,
    region: Region | None,
    classes: Sequence[str] | None,
    max_new_tokens: Any,
) -> None:
    """Refuse a prompt or token limit this model cannot take, before anything is written.

    Raises:
        TaskInputError: The prompt is longer than the text encoder reads, or
            ``max_new_tokens`` is more than the decoder can write.
    """
    size = (10**6, 10**6)  # the prompt's length does not depend on the image's size
    if classes is not None:
        prompts = [build_prompt(spec, size, text=name) for name in check_classes(classes)]
    else:
        prompts = [build_prompt(spec, size, text=text, region=region)]
    check_prompt_lengths(florence, prompts, max_new_tokens)


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
