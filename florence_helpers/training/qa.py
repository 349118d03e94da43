"""Questions and answers (document VQA and any free-text task) read as training samples: rows
of image, question and answer from a JSON-lines or CSV file, or a Hugging Face ``datasets``
dataset. The answer is the target as written; the prompt is the task's token followed by the
question. Images held in the data are written once, under a hash of their content.
"""

from __future__ import annotations

import csv
import hashlib
import io
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from ..boundary.images import ImageLoadError, decode_image, to_rgb, upright
from ..boundary.inputs import DEFAULT_MAX_PIXELS, InputError, expand_path, is_unicode, read_file
from ..boundary.outputs import OutputError, write_atomically
from ..language.prompts import TaskInputError, build_prompt
from ..language.regions import RegionError
from ..language.tasks import InputKind, Task, TaskSpec, custom_task, task_spec
from .records import (
    _BOM,
    _checked_image_size,
    _finite,
    _image_path,
    _json_lines,
    _read_bytes,
    _shown,
    _text,
)
from .samples import (
    AnnotationProblem,
    OnError,
    TrainingSample,
    TrainingSet,
    _BadAnnotation,
    _finish,
)

DOCVQA = custom_task(
    "<DocVQA>", takes="text", description="answer a question about a document image"
)
"""The document-question prompt of the best-known Florence-2 fine-tuning tutorial: the token
``<DocVQA>`` followed by the question. Base checkpoints do not know it; fine-tuning teaches it."""


_REF, _BOX = "<ref-object>", "<bbox>"  # ms-swift's placeholders


MAX_QUESTION_CHARS = 4000
"""The longest question a row may hold: Florence-2's text encoder reads 1024 tokens, about
4000 characters of English. Training and evaluation check the exact length in tokens."""


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
            question = _question(row.get(question_column) if question_column is not None else None)
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


def _question(value: Any) -> str | None:
    """A row's question, stripped; None if it has none."""
    if value is not None and not isinstance(value, str):
        raise _BadAnnotation(f"a question must be text, got {_shown(value)}")
    question = _text(value.strip(), "the question") if value else None
    if question and len(question) > MAX_QUESTION_CHARS:
        raise _BadAnnotation(
            f"the question has {len(question):,} characters, more than the model reads "
            f"(at most {MAX_QUESTION_CHARS:,} here; the exact limit is in tokens)"
        )
    return question


def _qa_rows(
    source: str | Path | Iterable[Mapping[str, Any]], images_dir: str | Path | None
) -> tuple[Iterable[tuple[int, Any]], str, Path]:
    """Numbered rows (or the error that spoilt one), a name for messages, the image folder."""
    if not isinstance(source, str | Path):
        root = expand_path(images_dir) if images_dir is not None else Path.cwd()
        return enumerate(source, start=1), "row", root
    path = expand_path(source)
    root = expand_path(images_dir) if images_dir is not None else path.parent
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
    if not all(is_unicode(name) for name in header):
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
        elif not all(is_unicode(value) for value in values):
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
            except Exception as error:  # noqa: BLE001 - a decoder failing in its own way
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
        turned = to_rgb(upright(image))
        buffer = io.BytesIO()
        turned.save(buffer, format="PNG")
    except ImageLoadError as error:
        raise _BadAnnotation(str(error)) from None
    except Exception as error:  # noqa: BLE001 - EXIF or encoding failing in its own way
        raise _BadAnnotation(f"the image cannot be written as PNG ({error!r})") from None
    data = buffer.getvalue()
    path = root / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if path.is_symlink():  # a planted link would lead the write outside the folder
        raise _BadAnnotation(
            f"{path} is a symbolic link, which is not followed: give images_dir a folder of its own"
        )
    try:  # a file larger than this image cannot hold the same bytes
        existing: bytes | None = read_file(path, max_bytes=len(data), follow_links=False)
    except FileNotFoundError:
        existing = None
    except InputError as error:
        raise _BadAnnotation(
            f"{error} It was not overwritten: give images_dir a folder of its own"
        ) from None
    if existing is None:
        try:
            write_atomically(path, data, follow_links=False)
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
