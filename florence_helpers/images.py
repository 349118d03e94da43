"""Load images from anything a user is likely to hold, as upright RGB PIL images."""

from __future__ import annotations

import errno
import http.client
import io
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray
"""A path, URL, encoded bytes, PIL image or numpy array (HxW, HxWx3 or HxWx4)."""

URL_MAX_MB = 50.0
"""The largest image :func:`load_image` downloads by default, in megabytes."""
URL_TIMEOUT_S = 60.0
"""How long :func:`load_image` waits for a whole download by default, in seconds."""
_READ_CHUNK = 1 << 16
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


def load_image(
    source: ImageSource,
    *,
    max_mb: float = URL_MAX_MB,
    timeout: float = URL_TIMEOUT_S,
) -> Image.Image:
    """Return ``source`` as an RGB PIL image, turned upright according to its EXIF orientation.

    Transparent images (RGBA, LA, P with transparency) are composited on white; grey, 16-bit,
    palette and CMYK images are converted to RGB. The input is never modified.

    Args:
        source: A file path, an ``http(s)://`` or ``file://`` URL, encoded image bytes, a PIL
            image, or a numpy array of shape HxW, HxWx3 or HxWx4 (uint8, uint16, or floats
            in 0..1).
        max_mb: For a URL: the largest download accepted, in megabytes.
        timeout: For a URL: the longest the whole download may take, in seconds.

    Returns:
        A new RGB image.

    Raises:
        ImageLoadError: The file is missing or unreadable, the URL cannot be fetched (or is
            too large or too slow), or the array has an unsupported shape or type. The
            message names the source.

    Example:
        >>> import numpy as np
        >>> load_image(np.zeros((4, 6), dtype=np.uint8)).size
        (6, 4)
    """
    if isinstance(source, Image.Image):
        image = source.copy()
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(bytes(source), "the given bytes")
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith(("http://", "https://")):
            image = _decode(_fetch(text, max_mb=max_mb, timeout=timeout), text)
        elif text.startswith("file://"):
            local = urllib.request.url2pathname(urllib.parse.urlparse(text).path)
            image = _open_file(Path(local))
        else:
            image = _open_file(Path(text).expanduser())
    else:
        raise ImageLoadError(
            f"Cannot read an image from a {type(source).__name__}: pass a path, URL, bytes, "
            "PIL image or numpy array."
        )
    return to_rgb(ImageOps.exif_transpose(image))


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


def _open_file(path: Path) -> Image.Image:
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
    return _decode(path, str(path))


def _decode(data: bytes | Path, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as opened:
            opened.load()
            return opened.copy()
    except Image.DecompressionBombError as error:
        raise ImageLoadError(too_large_message(name, str(error))) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"Could not read {name} as an image: {error}") from error


def too_large_message(name: str, detail: str) -> str:
    """Say which image is too large, how large, and how to read it anyway."""
    pixels = re.search(r"\((\d+) pixels\)", detail)
    size = f"{int(pixels.group(1)) / 1e6:,.0f} megapixels" if pixels else "too many pixels"
    limit = (Image.MAX_IMAGE_PIXELS or 0) * 2 / 1e6
    return (
        f"Cannot open {name}: it has {size}, more than Pillow opens by default "
        f"({limit:,.0f} megapixels, a guard against decompression bombs). Florence-2 sees "
        "every image at 768x768, so a smaller copy loses nothing: shrink the file first, or, "
        "if you trust it and have the memory, raise the limit before loading: "
        "`PIL.Image.MAX_IMAGE_PIXELS = None`."
    )


def _fetch(url: str, *, max_mb: float, timeout: float) -> bytes:
    """Download ``url``, refusing more than ``max_mb`` or more than ``timeout`` seconds."""
    limit = int(max_mb * 1e6)
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "florence-helpers"})
    try:
        # Each read waits at most 10 s, and the deadline is checked between reads.
        with urllib.request.urlopen(request, timeout=min(timeout, 10)) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise ImageLoadError(_too_big(url, int(declared), max_mb))
            data = bytearray()
            while True:
                if time.monotonic() > deadline:
                    raise ImageLoadError(
                        f"Could not download the image at {url}: it took more than {timeout:g} "
                        "s (pass timeout=... to load_image to wait longer)."
                    )
                chunk = response.read1(_READ_CHUNK)  # what has arrived, not a full chunk
                if not chunk:
                    break
                data += chunk
                if len(data) > limit:
                    raise ImageLoadError(_too_big(url, len(data), max_mb, at_least=True))
            if declared and declared.isdigit() and len(data) < int(declared):
                raise http.client.IncompleteRead(bytes(data), int(declared) - len(data))
            return bytes(data)
    except ImageLoadError:
        raise
    except http.client.IncompleteRead as error:
        raise ImageLoadError(
            f"Could not download the image at {url}: the server closed the connection after "
            f"{len(error.partial)} bytes"
            + (f" of {len(error.partial) + error.expected:,}." if error.expected else ".")
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise ImageLoadError(f"Could not download the image at {url}: {error}") from error


def _too_big(url: str, size: int, max_mb: float, at_least: bool = False) -> str:
    return (
        f"Did not download the image at {url}: it is {'more than ' if at_least else ''}"
        f"{size / 1e6:,.1f} MB, above the {max_mb:g} MB limit (pass max_mb=... to load_image "
        "to allow more)."
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
