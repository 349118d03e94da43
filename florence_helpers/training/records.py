"""The checks every record read from a data file passes: exact types (a width is a whole
number, a box four finite numbers), text without Florence-2's tokens in it, readable images of
a size that matches, files read as UTF-8 line by line.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import stat
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from ..boundary.images import ImageLoadError, check_exif, open_header
from ..boundary.inputs import (
    DEFAULT_MAX_PIXELS,
    MAX_DATA_FILE_BYTES,
    expand_path,
    is_unicode,
    read_file,
)
from ..boundary.inputs import shown as _shown
from .samples import _BadAnnotation

_EXIF_ORIENTATION = 0x0112
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


_SPECIAL_TOKEN = re.compile(r"</?[A-Za-z][\w-]*>")  # <loc_5>, </s>, <OD>, <ref-object>...
_BOM = b"\xef\xbb\xbf"


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


def _text(text: str, what: str) -> str:
    if not is_unicode(text):
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
    path = expand_path(value)
    return path if path.is_absolute() else root / path


def _read_bytes(path: Path) -> bytes:
    """A data file's bytes: a regular file of at most 1 GiB (see :func:`read_file`).

    Raises:
        FileNotFoundError: There is no such file.
        ValueError: It is not a regular file (a FIFO, ``/dev/zero``), is too large, or cannot
            be read.
    """
    return read_file(path, max_bytes=MAX_DATA_FILE_BYTES)


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
            with open_header(path, str(path)) as image:  # the formats load_image decodes
                width, height = image.size
                too_large = width * height > DEFAULT_MAX_PIXELS
                check_exif(image, str(path))
                if not too_large and image.getexif().get(_EXIF_ORIENTATION) in _ROTATED:
                    width, height = height, width
    except ImageLoadError as error:
        raise _BadAnnotation(f"image file unreadable: {error}") from None
    except Exception as error:  # noqa: BLE001 - EXIF parsing raises many kinds on bad data
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
