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
    spans: list[tuple[float, float]] = []
    for index in np.argsort((tops + bottoms) / 2, kind="stable"):
        top, bottom = tops[index], bottoms[index]
        for k, (line, (line_top, line_bottom)) in enumerate(zip(lines, spans, strict=True)):
            overlap = min(bottom, line_bottom) - max(top, line_top)
            shorter = max(min(bottom - top, line_bottom - line_top), 1e-6)
            if overlap >= 0.5 * shorter:
                line.append(int(index))
                spans[k] = (min(top, line_top), max(bottom, line_bottom))
                break
        else:
            lines.append([int(index)])
            spans.append((top, bottom))
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
