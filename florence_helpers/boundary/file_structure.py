"""An image file's structure checked from its bytes, before Pillow parses it.

Pillow walks some containers piece by piece in Python before an image's size is known, and
the pixel limit cannot bound that work:

- every tag of a TIFF (and of its EXIF and GPS directories, also found in PNG ``eXIf`` and WebP
  ``EXIF`` chunks) becomes Python objects: a 19 MB TIFF of 1x1 pixel whose XResolution holds
  2.4 million fractions took 10 s and 0.6 GB to open;
- every PNG chunk, before and after the pixel data: a million empty chunks (12 MB) took 3.5 s;
- every GIF extension block before the first picture: 3 million comment blocks took 2 s.

Here those structures are walked with :mod:`struct` alone, reading headers and seeking past
data, and a file holding more pieces than any camera or editor writes is refused first.

Part of the boundary: imports nothing from the rest of the package.
"""

from __future__ import annotations

import io
import struct
from typing import Any

MAX_TAG_VALUES = 1 << 18
"""The most values one tag may hold (a 16-bit colour map, the largest ordinary tag, holds
196,608)."""
MAX_OFFSET_VALUES = 1 << 16
"""The most strips or tiles (their offsets and byte counts): Pillow makes a decoder tile of
each in Python (a million one-row strips took 6.6 s); an 89-megapixel image in 8 kB strips has
33,000."""
MAX_TAGS = 4096
"""The most tags one directory may hold."""
MAX_DIRECTORIES = 64
"""The most directories (pages, EXIF, GPS) walked."""
_OFFSET_TAGS = (273, 279, 324, 325)  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
_POINTER_TAGS = (34665, 34853, 40965)  # EXIF, GPS and Interop directories: Pillow reads them
_TIFF_WHY = (
    ", which Pillow reads value by value before the image's size is known (2.4 million took 10 s)"
)
MAX_PIECES = 10_000
"""The most metadata pieces walked: PNG chunks other than large pixel-data chunks, or GIF
extension sub-blocks before the first picture. Real files hold a few dozen."""
_SMALL_CHUNK = 1024
"""A PNG pixel-data (IDAT) chunk shorter than this counts as a piece: encoders write 8 kB or
more, and Pillow loops in Python over each chunk, however empty."""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_EXIF_BYTES = 16 * 2**20


def structure_problem(handle: Any) -> str | None:
    """Why this file cannot be opened within bounds, or None (also for other formats).

    ``handle`` is a seekable binary file at the image's start; it is left where it was. The
    answer completes "it holds ...". A structure cut short is left for Pillow to report as
    damage.
    """
    start = handle.tell()
    try:
        head = handle.read(16)
        handle.seek(start)
        if head.startswith(_PNG_SIGNATURE):
            return _png_problem(handle)
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return _gif_problem(handle)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp_problem(handle)
        if head[:3] == b"\xff\xd8\xff":  # JPEG and MPO
            return _jpeg_problem(handle)
        if head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"f"):
            return _pnm_problem(handle)
        problem = tiff_problem(handle)
        return None if problem is None else problem + _TIFF_WHY
    finally:
        handle.seek(start)


def exif_problem(data: bytes) -> str | None:
    """Why these EXIF bytes (a TIFF structure, perhaps after ``Exif\\0\\0``) cannot be parsed
    within bounds, or None."""
    if len(data) > _MAX_EXIF_BYTES:
        return f"EXIF data of more than {_MAX_EXIF_BYTES // 2**20} MB (cameras write 64 kB at most)"
    body = data[6:] if data.startswith(b"Exif\0\0") else data
    problem = tiff_problem(io.BytesIO(body))
    return None if problem is None else "EXIF data with " + problem + _TIFF_WHY


def tiff_problem(handle: Any) -> str | None:
    """Why this TIFF cannot be opened within bounds, or None (also for any other file).

    ``handle`` is a seekable binary file at the image's start; it is left where it was. A
    directory cut short is left for Pillow to report as damage.
    """
    start = handle.tell()
    try:
        head = handle.read(16)
        layout = _layout(head)
        if layout is None:
            return None
        order, big, first = layout
        pending, seen = [first], set()
        while pending and len(seen) < MAX_DIRECTORIES:
            offset = pending.pop()
            if offset == 0 or offset in seen:
                continue
            seen.add(offset)
            handle.seek(start + offset)
            problem, more = _directory(handle, order, big)
            if problem is not None:
                return problem
            pending += more
        return None
    finally:
        handle.seek(start)


def _layout(head: bytes) -> tuple[str, bool, int] | None:
    """Byte order, whether BigTIFF, and the first directory's offset; None if no TIFF."""
    if len(head) < 16 or head[:2] not in (b"II", b"MM"):
        return None
    order = "<" if head[:2] == b"II" else ">"
    magic = struct.unpack(order + "H", head[2:4])[0]
    if magic == 42:
        return order, False, struct.unpack(order + "I", head[4:8])[0]
    if magic == 43:
        return order, True, struct.unpack(order + "Q", head[8:16])[0]
    return None


def _directory(handle: Any, order: str, big: bool) -> tuple[str | None, list[int]]:
    """A problem with one directory, or the offsets of the directories it points to."""
    raw = handle.read(8 if big else 2)
    if len(raw) < (8 if big else 2):
        return None, []
    (count,) = struct.unpack(order + ("Q" if big else "H"), raw)
    if count > MAX_TAGS:
        return f"a TIFF directory of {count:,} tags (at most {MAX_TAGS:,})", []
    size = 20 if big else 12
    entries = handle.read(count * size)
    pointers = []
    for at in range(0, len(entries) - size + 1, size):
        tag = struct.unpack(order + "H", entries[at : at + 2])[0]
        values = struct.unpack(
            order + ("Q" if big else "I"), entries[at + 4 : at + (12 if big else 8)]
        )[0]
        limit = MAX_OFFSET_VALUES if tag in _OFFSET_TAGS else MAX_TAG_VALUES
        if values > limit:
            return f"a TIFF tag ({tag}) of {values:,} values (at most {limit:,})", []
        if tag in _POINTER_TAGS and values == 1:
            field = entries[at + (12 if big else 8) : at + size]
            pointers.append(struct.unpack(order + ("Q" if big else "I"), field)[0])
    following = handle.read(8 if big else 4)
    if len(following) == (8 if big else 4):
        pointers.append(struct.unpack(order + ("Q" if big else "I"), following)[0])
    return None, pointers


def _png_problem(handle: Any) -> str | None:
    """Too many chunks, or an ``eXIf`` chunk too large to parse, anywhere in a PNG."""
    handle.seek(len(_PNG_SIGNATURE), 1)
    pieces, pixels_seen, animated = 0, False, False
    while len(header := handle.read(8)) == 8:
        length, kind = struct.unpack(">I", header[:4])[0], header[4:]
        if kind == b"IEND" or (kind == b"fcTL" and pixels_seen and animated):
            return None  # the end, or an animation's next frame: Pillow stops there too
        pixels_seen = pixels_seen or kind == b"IDAT"
        if kind == b"acTL" and not pixels_seen and length >= 4:
            animated = struct.unpack(">I", (handle.read(4) + bytes(4))[:4])[0] > 1
            length -= 4
        if kind != b"IDAT" or length < _SMALL_CHUNK:
            pieces += 1
            if pieces > MAX_PIECES:
                return (
                    f"more than {MAX_PIECES:,} PNG chunks of metadata, which Pillow reads one "
                    "by one in Python (a million empty ones took 3.5 s)"
                )
        if kind == b"eXIf":
            problem = exif_problem(handle.read(min(length, _MAX_EXIF_BYTES + 1)))
            if problem is not None:
                return problem
            length -= min(length, _MAX_EXIF_BYTES + 1)
        handle.seek(length + 4, 1)  # the data and its CRC
    return None


def _gif_problem(handle: Any) -> str | None:
    """Too many extension sub-blocks before a GIF's first picture (after it, Pillow reads
    nothing until another frame is asked for)."""
    screen = handle.read(13)
    if len(screen) < 13:
        return None
    if screen[10] & 0x80:  # a global colour table
        handle.seek(3 << ((screen[10] & 7) + 1), 1)
    pieces = 0
    while (kind := handle.read(1)) not in (b"", b";", b","):  # the end, or the picture
        pieces += 1  # an extension, or a junk byte Pillow skips one at a time
        if kind == b"!":  # an extension: its label, then sub-blocks
            handle.seek(1, 1)
            while (size := handle.read(1)) not in (b"", b"\0") and pieces <= MAX_PIECES:
                pieces += 1
                handle.seek(size[0], 1)
        if pieces > MAX_PIECES:
            return (
                f"more than {MAX_PIECES:,} GIF extension blocks or stray bytes before its "
                "picture, which Pillow reads one by one in Python (3 million took 2 s)"
            )
    return None


def _webp_problem(handle: Any) -> str | None:
    """An ``EXIF`` chunk of a WebP too large to parse (the rest is parsed by libwebp)."""
    handle.seek(12, 1)
    for _ in range(MAX_PIECES):
        header = handle.read(8)
        if len(header) < 8:
            return None
        kind, length = header[:4], struct.unpack("<I", header[4:])[0]
        if kind == b"EXIF":
            return exif_problem(handle.read(min(length, _MAX_EXIF_BYTES + 1)))
        handle.seek(length + (length & 1), 1)
    return None


def _jpeg_problem(handle: Any) -> str | None:
    """Too many markers, fill bytes or stray bytes before a JPEG's first scan: Pillow walks
    them one at a time in Python, keeping every APP segment (5 million empty ones, 20 MB,
    took 8.8 s and 750 MB). Mirrors the loop of Pillow's ``JpegImageFile._open``."""
    from PIL.JpegImagePlugin import MARKER

    handle.seek(3, 1)
    current, pieces = b"\xff", 0
    while current:
        pieces += 1
        if pieces > MAX_PIECES:
            return (
                f"more than {MAX_PIECES:,} JPEG markers, fill or stray bytes before its "
                "pixels, which Pillow reads one by one in Python (5 million took 8.8 s)"
            )
        if current[0] != 0xFF:
            current = handle.read(1)  # a stray byte, skipped
            continue
        current += handle.read(1)
        if len(current) < 2:
            return None
        marker = struct.unpack(">H", current)[0]
        if marker == 0xFFDA or (marker not in MARKER and marker not in (0, 0xFFFF, 0xFF00)):
            return None  # the first scan, or damage Pillow reports
        if marker in (0, 0xFFFF):
            current = b"\xff"  # fill bytes
            continue
        if marker in MARKER and MARKER[marker][2] is not None:  # a segment with a length
            length = handle.read(2)
            if len(length) < 2:
                return None
            handle.seek(max(struct.unpack(">H", length)[0] - 2, 0), 1)
        current = handle.read(1)
    return None


_PNM_HEADER_BYTES = 1 << 16


def _pnm_problem(handle: Any) -> str | None:
    """A PNM header (magic, width, height, maximum) that does not end within 64 kB: Pillow
    reads it a byte at a time, whitespace and comments without limit (20 MB took 6.8 s)."""
    head = handle.read(_PNM_HEADER_BYTES + 1)
    wanted = 2 if head[1:2] in (b"1", b"4") else 3
    at, found = 2, 0
    while found < wanted and at < len(head):
        byte = head[at : at + 1]
        if byte == b"#":
            ends = [i for i in (head.find(b"\n", at), head.find(b"\r", at)) if i >= 0]
            at = min(ends) + 1 if ends else len(head)
        elif byte.isspace():
            at += 1
        else:
            while at < len(head) and not head[at : at + 1].isspace() and head[at] != 0x23:
                at += 1
            found += 1
    if found < wanted and len(head) > _PNM_HEADER_BYTES:
        return (
            f"a PNM header longer than {_PNM_HEADER_BYTES // 1024} kB, which Pillow reads a "
            "byte at a time in Python (20 MB took 6.8 s)"
        )
    return None
