"""A TIFF file's directories checked from its bytes, before Pillow parses them.

Pillow reads every tag of a TIFF (and of its EXIF and GPS directories) into Python objects
while it opens the file, before its size is known: a 19 MB TIFF of 1x1 pixel whose
XResolution holds 2.4 million fractions took 10 s and 0.6 GB to open. Here the directories are
walked with :mod:`struct` alone, and a file whose tags hold more values than any real TIFF is
refused first.

Part of the boundary: imports nothing from the rest of the package.
"""

from __future__ import annotations

import struct
from typing import Any

MAX_TAG_VALUES = 1 << 18
"""The most values one tag may hold (a 16-bit colour map, the largest ordinary tag, holds
196,608)."""
MAX_OFFSET_VALUES = 1 << 20
"""The most strips or tiles (their offsets and byte counts), each a plain integer."""
MAX_TAGS = 4096
"""The most tags one directory may hold."""
MAX_DIRECTORIES = 64
"""The most directories (pages, EXIF, GPS) walked."""
_OFFSET_TAGS = (273, 279, 324, 325)  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
_POINTER_TAGS = (34665, 34853)  # the EXIF and GPS directories, which Pillow also reads


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
