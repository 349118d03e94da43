"""A result in words: a one-line summary (text, or labels with counts and scores) and JSON
that keeps each box on one line. The explorer shows both.
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any


def _count_labels(labels: Sequence[str], scores: Any) -> str:
    """'dog ×2 (0.91, 0.40), cat' — labels in order of first appearance, with their scores."""
    counts = Counter(labels)
    parts = []
    for label in dict.fromkeys(labels):
        shown = html.escape(label) if label else "<i>no label</i>"
        if counts[label] > 1:
            shown += f" ×{counts[label]}"
        if scores is not None:
            values = [f"{s:.2f}" for s, lab in zip(scores, labels, strict=True) if lab == label]
            shown += f" ({', '.join(values)})"
        parts.append(shown)
    return ", ".join(parts)


def summarize(result: Any) -> str:
    """A short HTML summary of a result: the text, or labels with counts and scores.

    Example:
        >>> from florence_helpers import TextResult
        >>> summarize(TextResult("CAPTION", (10, 10), raw="a cat", text="a cat"))
        '<b>Text:</b> a cat'
    """
    from ..language.results import BoxesResult, OCRResult, PolygonsResult, TextResult

    note = " <i>(the answer was cut at max_new_tokens)</i>" if result.truncated else ""
    if isinstance(result, TextResult):
        text = html.escape(result.text) if result.text else "<i>empty answer</i>"
        return f"<b>Text:</b> {text}{note}"
    if isinstance(result, OCRResult):
        if not len(result):
            return f"<b>No text found.</b>{note}"
        lines = "".join(f"<li>{html.escape(t)}</li>" for t in result.texts)
        return f"<b>{len(result)} lines of text:</b><ol>{lines}</ol>{note}"
    if isinstance(result, (BoxesResult, PolygonsResult)):
        what = "boxes" if isinstance(result, BoxesResult) else "masks"
        if not len(result):
            return f"<b>No {what}.</b>{note}"
        labels = _count_labels(result.labels, result.scores)
        return f"<b>{len(result)} {what}:</b> {labels}{note}"
    return html.escape(type(result).__name__)


# A pretty-printed array of numbers only: it spans lines (a string's brackets never do).
_NUMBER_ARRAY = re.compile(r"\[(\s*\n[-+0-9.eE,\s]*)\]")


def readable_json(payload: Any) -> str:
    """JSON indented by object, with each list of numbers (a box, a point) on one line.

    Example:
        >>> print(readable_json({"boxes": [[1.0, 2.0, 3.0, 4.0]], "labels": ["car"]}))
        {
          "boxes": [
            [1.0, 2.0, 3.0, 4.0]
          ],
          "labels": [
            "car"
          ]
        }
    """
    text = json.dumps(payload, ensure_ascii=False, indent=2)
    return _NUMBER_ARRAY.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
