"""Load images from anything a user is likely to hold, as upright RGB PIL images.

Every image from outside passes the limits of :mod:`florence_helpers.inputs`: its size in
pixels is read from the file's header and checked before anything is decoded, and a URL is
fetched under that module's address policy and deadline.
"""

from __future__ import annotations

import errno
import io
import os
import re
import struct
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .inputs import (
    DEFAULT_MAX_MB,
    DEFAULT_MAX_PIXELS,
    DEFAULT_TIMEOUT_S,
    InputError,
    InputLimits,
    TooLargeError,
    check_local_path,
)
from .inputs import fetch_url as _fetch_url

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray
"""A path, URL, encoded bytes, PIL image or numpy array (HxW, HxWx3 or HxWx4)."""

URL_MAX_MB = DEFAULT_MAX_MB
"""The largest image :func:`load_image` downloads by default, in megabytes."""
URL_TIMEOUT_S = DEFAULT_TIMEOUT_S
"""How long :func:`load_image` waits for a whole download by default, in seconds."""
_NOT_FOR_PILLOW = {
    ".svg": "an SVG drawing (vector graphics), which Pillow cannot read: convert it to PNG "
    "first (for example with cairosvg or Inkscape)",
    ".svgz": "a compressed SVG drawing, which Pillow cannot read: convert it to PNG first",
    ".heic": "a HEIC photo, which Pillow reads only with the pillow-heif plugin: "
    "pip install pillow-heif, then call pillow_heif.register_heif_opener()",
    ".heif": "a HEIF photo, which Pillow reads only with the pillow-heif plugin: "
    "pip install pillow-heif, then call pillow_heif.register_heif_opener()",
}


class ImageLoadError(ValueError):
    """Raised when an image cannot be found, fetched or decoded. The message names it."""


class ImageTooLargeError(ImageLoadError):
    """An image past a limit: more pixels, or more bytes to download, than allowed."""


def load_image(
    source: ImageSource,
    *,
    limits: InputLimits | None = None,
    max_mb: float | None = None,
    timeout: float | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Return ``source`` as an RGB PIL image, turned upright according to its EXIF orientation.

    Transparent images (RGBA, LA, P with transparency) are composited on white; grey, 16-bit,
    palette and CMYK images are converted to RGB. The input is never modified.

    Args:
        source: A file path, an ``http(s)://`` or ``file://`` URL, encoded image bytes, a PIL
            image, or a numpy array of shape HxW, HxWx3 or HxWx4 (uint8, uint16, or floats
            in 0..1).
        limits: What an image may cost and where it may come from
            (:class:`~florence_helpers.inputs.InputLimits`): by default at most 50 MB
            downloaded within 60 s, at most 89.5 million pixels decoded, URLs only to public
            addresses, any local path.
        max_mb: For a URL: the largest download accepted, in megabytes (overrides ``limits``).
        timeout: For a URL: the longest the whole download may take, in seconds (overrides
            ``limits``).
        max_pixels: The largest image decoded, width times height (overrides ``limits``).

    Returns:
        A new RGB image.

    Raises:
        ImageLoadError: The file is missing or unreadable, has more pixels than allowed, the
            URL cannot be fetched (too large, too slow, an address not allowed), or the array
            has an unsupported shape or type. The message names the source.
        SettingError: A limit that is not a positive finite number.

    Example:
        >>> import numpy as np
        >>> load_image(np.zeros((4, 6), dtype=np.uint8)).size
        (6, 4)
    """
    limits = (limits or InputLimits()).with_overrides(
        max_mb=max_mb, timeout=timeout, max_pixels=max_pixels
    )
    if isinstance(source, Image.Image):
        image = source.copy()
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = decode_image(bytes(source), "the given bytes", max_pixels=limits.max_pixels)
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        if text.lower().startswith(("http://", "https://")):
            image = _from_url(text, limits)
        elif text.lower().startswith("file://"):
            local = urllib.request.url2pathname(urllib.parse.urlparse(text).path)
            image = _open_file(_allowed(local, limits), limits)
        else:
            image = _open_file(_allowed(text, limits), limits)
    else:
        raise ImageLoadError(
            f"Cannot read an image from a {type(source).__name__}: pass a path, URL, bytes, "
            "PIL image or numpy array."
        )
    return to_rgb(ImageOps.exif_transpose(image))


def _allowed(path: str, limits: InputLimits) -> Path:
    try:
        return check_local_path(path, limits)
    except InputError as error:
        raise ImageLoadError(str(error)) from None


def _from_url(url: str, limits: InputLimits) -> Image.Image:
    """Fetch and decode; a decoding failure says nothing of the bytes the server sent."""
    try:
        data = _fetch_url(url, limits)
    except TooLargeError as error:
        raise ImageTooLargeError(str(error)) from None
    except InputError as error:
        raise ImageLoadError(str(error)) from None
    try:
        return decode_image(data, url, max_pixels=limits.max_pixels)
    except ImageTooLargeError:
        raise
    except ImageLoadError:
        raise ImageLoadError(
            f"Could not read the data at {url} as an image: it is not a picture in a format "
            "Pillow reads."
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency on white and scaling 16-bit data."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        if image.mode == "RGB":
            return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16"):
        # 16-bit grey: keep the full range, 65535 maps to 255.
        values = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        # 32-bit integer or float data has no fixed range: stretch its own range to 0..255.
        return Image.fromarray(_stretch(np.asarray(image))).convert("RGB")
    return image.convert("RGB")


def _open_file(path: Path, limits: InputLimits) -> Image.Image:
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ImageLoadError(f"Cannot open {path}: its symbolic links form a loop.") from None
        if path.is_symlink():
            raise ImageLoadError(
                f"Cannot open {path}: it is a symbolic link to {os.readlink(path)}, which "
                "does not exist."
            ) from None
        if isinstance(error, FileNotFoundError):
            raise ImageLoadError(f"Image file not found: {path}") from None
        raise ImageLoadError(f"Cannot open {path}: {error.strerror or error}.") from None
    if path.is_dir():
        raise ImageLoadError(f"Expected an image file but {path} is a directory.")
    unreadable = _NOT_FOR_PILLOW.get(path.suffix.lower())
    if unreadable:
        raise ImageLoadError(f"Cannot read {path}: it is {unreadable}.")
    return decode_image(path, str(path), max_pixels=limits.max_pixels)


def decode_image(
    data: bytes | os.PathLike, name: str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an image file or encoded bytes, refusing more than ``max_pixels`` pixels.

    The size is read from the file's header first: an image that is too large is refused
    before a byte of it is decoded (a 20 kB PNG can hold 13000x13000 pixels).

    Raises:
        ImageLoadError: Not an image Pillow reads, a damaged one, or one with too many pixels.
    """
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(too_large_message(name, width * height, max_pixels))
            opened.load()
            return opened.copy()
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(too_large_message(name, _pixels_in(str(error)), None)) from error
    except ImageLoadError:
        raise
    except UnidentifiedImageError as error:
        raise ImageLoadError(
            f"Could not read {name} as an image: it is not a picture in a format Pillow reads."
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"Could not read {name} as an image: {error}") from error
    except (MemoryError, RecursionError, EOFError, IndexError, struct.error) as error:
        raise ImageLoadError(f"Could not read {name} as an image: it is damaged.") from error


def _pixels_in(detail: str) -> int | None:
    found = re.search(r"\((\d+) pixels\)", detail)
    return int(found.group(1)) if found else None


def image_size(data: bytes | os.PathLike) -> tuple[int, int]:
    """An image's width and height from its header, without decoding it.

    Raises:
        ImageLoadError: Not an image Pillow reads.
    """
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as opened:
            return opened.size
    except Image.DecompressionBombError as error:
        message = too_large_message("the image", _pixels_in(str(error)))
        raise ImageTooLargeError(message) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error):
        raise ImageLoadError(
            "Could not read the image: it is not a picture Pillow reads."
        ) from None


def too_large_message(name: str, pixels: int | str | None, limit: int | None = None) -> str:
    """Say which image is too large, how large, and how to read it anyway."""
    if isinstance(pixels, str):  # Pillow's own message
        pixels = _pixels_in(pixels)
    size = f"{pixels / 1e6:,.0f} megapixels" if pixels else "too many pixels"
    if limit is not None:
        return (
            f"Did not decode {name}: it has {size}, more than the {limit / 1e6:,.1f} megapixels "
            "allowed (a guard against images that take gigabytes to decode). Florence-2 sees "
            "every image at 768x768, so a smaller copy loses nothing: shrink the file first, or "
            "allow more with max_pixels=..."
        )
    pillow = (Image.MAX_IMAGE_PIXELS or 0) * 2 / 1e6
    return (
        f"Cannot open {name}: it has {size}, more than Pillow opens by default "
        f"({pillow:,.0f} megapixels, a guard against decompression bombs). Florence-2 sees "
        "every image at 768x768, so a smaller copy loses nothing: shrink the file first, or, "
        "if you trust it and have the memory, raise the limit before loading: "
        "`PIL.Image.MAX_IMAGE_PIXELS = None`."
    )


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageLoadError(
            f"Cannot read an image from an array of shape {array.shape}: "
            "expected HxW, HxWx3 or HxWx4."
        )
    if array.size == 0:
        raise ImageLoadError(f"Cannot read an image from an empty array of shape {array.shape}.")
    if array.dtype == np.uint8:
        data = array
    elif array.dtype == np.uint16:
        data = (array >> 8).astype(np.uint8)
    elif array.dtype == np.bool_:
        data = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError("Cannot read an image from an array with NaN or infinite values.")
        data = (np.clip(array, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        data = _stretch(array)
    else:
        raise ImageLoadError(f"Cannot read an image from an array of dtype {array.dtype}.")
    return Image.fromarray(np.ascontiguousarray(data))


def _stretch(array: np.ndarray) -> np.ndarray:
    """Scale an array's own value range linearly to uint8 0..255."""
    values = array.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scale = 255 / (high - low) if high > low else 0.0
    return ((values - low) * scale + 0.5).astype(np.uint8)
