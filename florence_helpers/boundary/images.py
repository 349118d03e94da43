"""Load images from anything a user is likely to hold, as upright RGB PIL images.

Every image from outside passes the limits of :mod:`florence_helpers.boundary.inputs`: its size in
pixels is read from the file's header and checked before anything is decoded, and a URL is
fetched under that module's address policy and deadline.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .fetching import fetch_url as _fetch_url
from .file_structure import exif_problem, structure_problem
from .inputs import (
    DEFAULT_MAX_MB,
    DEFAULT_MAX_PIXELS,
    DEFAULT_TIMEOUT_S,
    InputError,
    InputLimits,
    TooLargeError,
    check_local_path,
    is_url,
    local_path,
    open_regular,
)

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
            (:class:`~florence_helpers.boundary.inputs.InputLimits`): by default at most 50 MB
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
        if "\x00" in text:
            raise ImageLoadError("An image path or URL cannot hold a NUL character.")
        if is_url(text):
            image = _from_url(text, limits)
        else:
            image = _open_file(_allowed(local_path(text), limits), limits)
    else:
        raise ImageLoadError(
            f"Cannot read an image from a {type(source).__name__}: pass a path, URL, bytes, "
            "PIL image or numpy array."
        )
    return to_rgb(upright(image) if isinstance(source, Image.Image | np.ndarray) else image)


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
    """Open a local image file and decode it from the descriptor that was checked.

    The file is opened first and everything is decided on the open descriptor: that it is a
    regular file (a FIFO named ``x.jpg`` would block a reader forever), and, when the limits
    name allowed folders, where it really is (a symbolic link swapped between a check and an
    open cannot lead outside them).
    """
    if "\x00" in str(path):
        raise ImageLoadError("An image path cannot hold a NUL character.")
    unreadable = _NOT_FOR_PILLOW.get(path.suffix.lower())
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise ImageLoadError(_open_error(path, error)) from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        if stat.S_ISDIR(info.st_mode):
            raise ImageLoadError(f"Expected an image file but {path} is a directory.")
        raise ImageLoadError(f"Cannot read {path}: it is not a regular file.")
    with os.fdopen(descriptor, "rb") as handle:
        if limits.allowed_folders is not None:
            _allowed(_opened_path(descriptor, path), limits)
        if unreadable:
            raise ImageLoadError(f"Cannot read {path}: it is {unreadable}.")
        return decode_image(handle, str(path), max_pixels=limits.max_pixels)


def _open_error(path: Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return f"Cannot open {path}: its symbolic links form a loop."
    try:  # asking about the path can fail as the open did (a name too long, no permission)
        target = os.readlink(path) if path.is_symlink() else None
    except OSError:
        target = None
    if target is not None:
        return f"Cannot open {path}: it is a symbolic link to {target}, which does not exist."
    if isinstance(error, FileNotFoundError):
        return f"Image file not found: {path}"
    return f"Cannot open {path}: {error.strerror or error}."


def _opened_path(descriptor: int, path: Path) -> str:
    """Where an open file really is: the kernel's answer where it gives one (Linux)."""
    try:
        return os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:
        return os.path.realpath(path)


DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "PPM", "AVIF", "HEIF")
"""The image formats decoded (where this Pillow has the plugin). Others are refused before
their decoder runs: some of Pillow's decoders do their work while the file is opened (an ICO
decodes its largest image), so a format outside this list could bypass the pixel check."""
MAX_JPEG_SCANS = 64
"""Progressive JPEG scans decoded, at most: each scan is another pass over every pixel, and a
file of a few kB repeating one scan thousands of times takes minutes to decode. Cameras and
encoders write at most about a dozen."""


def _formats() -> list[str]:
    Image.init()
    return [name for name in DECODED_FORMATS if name in Image.OPEN]


def open_header(data: bytes | os.PathLike | Any, name: str) -> Any:
    """The image opened (its header read) by one of the decoded formats' plugins."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    problem = _structure_problem(source)
    if problem is not None:
        raise ImageLoadError(
            f"Did not open {name}: it holds {problem}; no camera or editor writes such a "
            "file. Re-save it as PNG or JPEG."
        )
    try:
        return Image.open(source, formats=_formats())
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(too_large_message(name, _pixels_in(str(error)), None)) from error
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"Could not read {name} as an image: it is not a picture in a format this package "
            f"decodes ({', '.join(_formats())})."
        ) from None
    except Exception as error:  # noqa: BLE001 - a header Pillow cannot parse, however it fails
        raise ImageLoadError(
            f"Could not read {name} as an image: its header is damaged."
        ) from error


def _structure_problem(source: Any) -> str | None:
    """:func:`structure_problem` for an open file, or a path opened without blocking."""
    if hasattr(source, "seek"):
        return structure_problem(source)
    try:
        handle = open_regular(source)
    except (OSError, TypeError, ValueError):  # InputError is a ValueError
        return None  # Pillow names the problem
    with handle:
        return structure_problem(handle)


def decode_image(
    data: bytes | os.PathLike | Any, name: str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an image file, an open binary file or encoded bytes, refusing more than
    ``max_pixels`` pixels, formats outside :data:`DECODED_FORMATS`, variants that Pillow
    decodes in Python (plain-text PNM, RLE BMP: no time bound), and JPEGs of more than
    :data:`MAX_JPEG_SCANS` scans.

    The size is read from the file's header first: an image that is too large is refused
    before a byte of it is decoded (a 20 kB PNG can hold 13000x13000 pixels).

    Raises:
        ImageLoadError: Not an image of those formats, a damaged one, or one with too many
            pixels or scans (:class:`ImageTooLargeError` for too many pixels).
    """
    with open_header(data, name) as opened:
        width, height = opened.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(too_large_message(name, width * height, max_pixels))
        tile = _tiff_tile(opened)
        if max_pixels is not None and tile is not None and tile[0] * tile[1] > max_pixels:
            raise ImageTooLargeError(
                f"Did not decode {name}: its TIFF tiles are {tile[0]}x{tile[1]} pixels, more "
                f"than the {max_pixels / 1e6:,.1f} megapixels allowed, and the decoder holds a "
                "whole tile at once. Re-save it as an ordinary TIFF, PNG or JPEG."
            )
        slow = _python_decoder(opened)
        if slow is not None:
            raise ImageLoadError(
                f"Did not decode {name}: Pillow decodes this kind of {opened.format} file "
                f"({slow}) in Python, which can take minutes even for a small file; re-save it "
                "as PNG or JPEG."
            )
        if opened.format == "JPEG" and _jpeg_scans(opened.fp) > MAX_JPEG_SCANS:
            raise ImageLoadError(
                f"Did not decode {name}: it is a JPEG of more than {MAX_JPEG_SCANS} progressive "
                "scans, which takes minutes to decode; re-save it as an ordinary JPEG or PNG."
            )
        try:
            opened.load()
            return upright(opened.copy(), name)
        except ImageLoadError:
            raise
        except MemoryError as error:
            raise ImageTooLargeError(f"Could not decode {name}: not enough memory.") from error
        except Exception as error:  # noqa: BLE001 - Pillow raises many kinds on damaged data
            raise ImageLoadError(f"Could not read {name} as an image: it is damaged.") from error


def _python_decoder(opened: Image.Image) -> str | None:
    """The name of a decoder written in Python that the image would use, else None.

    Pillow's C decoders take time in proportion to the pixels, which the pixel limit bounds;
    its Python ones do not (a 1x1 plain PGM of 1 MB of comments takes 12 s, a 26 kB RLE BMP
    6 s, a 19 MB PGM whose maximum is not 255 38 s), so they are refused, whatever the size.
    """
    decoders = getattr(Image, "DECODERS", {})
    for tile in getattr(opened, "tile", None) or []:
        codec = getattr(tile, "codec_name", None) or (tile[0] if tile else None)
        if isinstance(codec, str) and codec in decoders:
            return codec
    return None


def _tiff_tile(opened: Image.Image) -> tuple[int, int] | None:
    """A tiled TIFF's tile size from its header, else None.

    The decoder allocates a whole tile, whatever the image's own size: a 2 MB file can be a
    1x1 image in one 26736x26736 tile (2 GB), so tiles count against the pixel limit too.
    """
    tags = getattr(opened, "tag_v2", None)
    if opened.format != "TIFF" or tags is None:
        return None
    width, length = tags.get(322), tags.get(323)  # TileWidth, TileLength
    if isinstance(width, int) and isinstance(length, int):
        return width, length
    return None


def upright(image: Image.Image, name: str = "the image") -> Image.Image:
    """``image`` turned as its EXIF orientation says; damaged EXIF data is an error.

    Raises:
        ImageLoadError: The orientation cannot be read.
    """
    check_exif(image, name)
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - EXIF parsing raises many kinds on bad data
        raise ImageLoadError(
            f"Could not read {name}: its EXIF data (orientation) is damaged; re-save the image "
            "without it."
        ) from error


def check_exif(image: Image.Image, name: str = "the image") -> None:
    """Refuse EXIF data that Pillow would take unbounded time to parse (see
    :mod:`~florence_helpers.boundary.file_structure`); call before ``getexif()``.

    Raises:
        ImageLoadError: The EXIF data holds more values than any camera writes.
    """
    exif = image.info.get("exif")
    raw = image.info.get("Raw profile type exif")  # hex in a PNG text chunk, read by getexif
    if exif is None and isinstance(raw, str):
        try:
            exif = bytes.fromhex("".join(raw.split("\n")[3:]))
        except ValueError:
            exif = None
    problem = exif_problem(exif) if isinstance(exif, bytes) else None
    if problem is not None:
        raise ImageLoadError(f"Did not read {name}: it holds {problem}; re-save it without it.")


def _jpeg_scans(handle: Any) -> int:
    """How many start-of-scan markers a JPEG stream holds (a marker cannot occur inside the
    compressed data: a 0xFF byte there is always followed by 0x00)."""
    position = handle.tell()
    handle.seek(0)
    count, previous = 0, b""
    try:
        while chunk := handle.read(1 << 20):
            joined = previous + chunk
            count += joined.count(b"\xff\xda") - previous.count(b"\xff\xda")
            previous = chunk[-1:]
            if count > MAX_JPEG_SCANS:
                break
    finally:
        handle.seek(position)
    return count


def _pixels_in(detail: str) -> int | None:
    found = re.search(r"\((\d+) pixels\)", detail)
    return int(found.group(1)) if found else None


def image_size(data: bytes | os.PathLike) -> tuple[int, int]:
    """An image's width and height from its header, without decoding it.

    Raises:
        ImageLoadError: Not an image of the formats decoded, or a damaged header.
    """
    with open_header(data, "the image") as opened:
        return opened.size


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
    """Scale an array's own value range linearly to uint8 0..255 (NaN and infinities as 0).

    Works in one float32 copy: a 90-megapixel float image costs its size once more, not
    three times as float64 temporaries would.
    """
    values = np.array(array, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        values[~finite] = 0.0
    low, high = float(values.min()), float(values.max())
    values -= low
    values *= 255 / (high - low) if high > low else 0.0
    values += 0.5
    return values.astype(np.uint8)
