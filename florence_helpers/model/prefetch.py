"""Prepare the next batch on a worker thread while the model works on this one."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")


Prepared = TypeVar("Prepared")


def prefetched(prepare: Callable[[Item], Prepared], items: Sequence[Item]) -> Iterator[Prepared]:
    """``prepare(item)`` for each item, in order, with the next one prepared meanwhile.

    Reading and preprocessing images releases the GIL for most of its time, so one worker
    thread hides it behind the model's work on the current batch. An exception raised while
    preparing an item is raised here, when that item is reached.

    Example:
        >>> list(prefetched(lambda n: n * n, [1, 2, 3]))
        [1, 4, 9]
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(prepare, items[0]) if items else None
        for index in range(len(items)):
            current = upcoming.result()
            if index + 1 < len(items):
                upcoming = pool.submit(prepare, items[index + 1])
            yield current
