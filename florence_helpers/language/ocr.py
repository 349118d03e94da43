"""Put OCR regions in reading order and join them into lines of text."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .results import OCRResult


def _line_groups(result: OCRResult) -> list[list[int]]:
    """Indices of the regions on each line, lines top to bottom, regions left to right.

    Two regions share a line when their vertical extents overlap by at least half the height
    of the shorter one.
    """
    if len(result) == 0:
        return []
    tops, bottoms = result.quads[:, :, 1].min(axis=1), result.quads[:, :, 1].max(axis=1)
    lefts = result.quads[:, :, 0].min(axis=1)
    lines: list[list[int]] = []
    # Each line's vertical span, tested for every line at once: a page of thousands of lines
    # (a tiled 90-megapixel scan) is not millions of comparisons in Python.
    line_tops, line_bottoms = np.empty_like(tops), np.empty_like(bottoms)
    for index in np.argsort((tops + bottoms) / 2, kind="stable"):
        top, bottom = tops[index], bottoms[index]
        known_tops, known_bottoms = line_tops[: len(lines)], line_bottoms[: len(lines)]
        overlap = np.minimum(bottom, known_bottoms) - np.maximum(top, known_tops)
        shorter = np.maximum(np.minimum(bottom - top, known_bottoms - known_tops), 1e-6)
        same = np.flatnonzero(overlap >= 0.5 * shorter)
        if same.size:  # the first line it shares, as lines were found
            k = int(same[0])
            lines[k].append(int(index))
            line_tops[k], line_bottoms[k] = min(top, line_tops[k]), max(bottom, line_bottoms[k])
        else:
            line_tops[len(lines)], line_bottoms[len(lines)] = top, bottom
            lines.append([int(index)])
    spans = list(zip(line_tops[: len(lines)], line_bottoms[: len(lines)], strict=True))
    order = sorted(range(len(lines)), key=lambda i: spans[i][0])
    return [sorted(lines[i], key=lambda j: lefts[j]) for i in order]


def reading_order(result: OCRResult) -> OCRResult:
    """The same regions sorted top to bottom, and left to right within a line.

    Florence-2 usually lists regions in reading order already, but not always (columns,
    rotated text). Scores, when present, move with their regions.

    Example:
        >>> ordered = reading_order(run(florence, "images/poster.png", "OCR_WITH_REGION"))
        ... # doctest: +SKIP
    """
    order = [i for line in _line_groups(result) for i in line]
    return replace(
        result,
        quads=result.quads[order] if order else result.quads,
        texts=[result.texts[i] for i in order],
        scores=None if result.scores is None else np.asarray(result.scores)[order],
    )


def to_lines(result: OCRResult, separator: str = " ") -> list[str]:
    """Join the regions on each visual line into one string, lines in reading order.

    Example:
        >>> from florence_helpers import Task
        >>> quads = np.array([[[60, 0], [90, 0], [90, 10], [60, 10]],
        ...                   [[0, 1], [50, 1], [50, 11], [0, 11]],
        ...                   [[0, 30], [40, 30], [40, 40], [0, 40]]], dtype=np.float32)
        >>> to_lines(OCRResult(Task.OCR_WITH_REGION, (100, 50), raw="", quads=quads,
        ...                    texts=["World", "Hello", "Bye"]))
        ['Hello World', 'Bye']
    """
    return [separator.join(result.texts[i] for i in line) for line in _line_groups(result)]
