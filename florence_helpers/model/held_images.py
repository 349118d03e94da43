"""Images of a long list, checked all at once but held in memory a bounded number at a time.

``run`` decodes every image before the model runs, so a bad file stops the call before any
work. Keeping them all decoded made memory grow with the list: 40 copies of a 12-megapixel
photo held 2.3 GB before the first token. Past :data:`HELD_PIXELS`, an image that can be read
again (a local file, encoded bytes) is kept as its size only and decoded again when its batch
is prepared; images given in memory, and URLs (fetched once), stay held.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..boundary.images import ImageSource, load_image
from ..boundary.inputs import is_url

HELD_PIXELS = 100_000_000
"""Decoded pixels a list may hold at once before images are read again per batch."""


@dataclass(frozen=True)
class ReadAgain:
    """An image checked and let go: its source, read again when its batch needs it."""

    source: ImageSource
    size: tuple[int, int]


def load_images(sources: list[ImageSource]) -> list[Any]:
    """Each source decoded (so every error comes now), as an RGB image or a :class:`ReadAgain`.

    Raises:
        ImageLoadError: A source that cannot be read, naming it.
    """
    loaded: list[Any] = []
    held = 0
    for source in sources:
        image = load_image(source)
        pixels = image.width * image.height
        if held + pixels > HELD_PIXELS and _readable_again(source):
            loaded.append(ReadAgain(source, image.size))
            continue
        held += pixels
        loaded.append(image)
    return loaded


def materialized(items: list[Any]) -> list[Any]:
    """The images themselves, reading again those let go."""
    return [load_image(item.source) if isinstance(item, ReadAgain) else item for item in items]


def _readable_again(source: ImageSource) -> bool:
    if isinstance(source, bytes):
        return True
    if isinstance(source, str | os.PathLike):
        return not (isinstance(source, str) and is_url(source))
    return False
