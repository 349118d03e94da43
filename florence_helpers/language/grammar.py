"""Where each instance sits in a Florence-2 answer, as the native parser reads it.

The native processor (``post_process_generation``) turns an answer into coordinates, but
returns neither the characters each instance came from nor labels exactly as written. The
functions here run the native parser's own patterns with character offsets, so that scores
can be traced back to tokens (:mod:`florence_helpers.model.scores`) and labels read back verbatim
(:func:`instance_labels`), one entry per instance, in the native parser's order.
"""

from __future__ import annotations

import re

from .regions import LOC_TOKEN
from .tasks import ResultKind, Task, TaskSpec, task_spec

DROPPED_TOKENS = {"<s>", "</s>", "<pad>"}
"""Tokens the native parser removes before it parses (and so does everything here)."""


_BOX_TEXT = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)")
_BOX = re.compile(LOC_TOKEN.pattern * 4)


_POLY_TEXT = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)")
_POLY_INSTANCE = re.compile(r"<poly>(.*?)</poly>")


_POLY_RUN = re.compile(r"((?:<loc_\d+>)+)(?:<sep>|$)")
_OCR = re.compile(r"(.+?)" + LOC_TOKEN.pattern * 8)


_LOCS_OR_POLY = r"(?:<loc_\d+>|<sep>|<poly>|</poly>)"
_FRAGMENT = re.compile(r"^\s*(?:loc_\d+|/?poly|sep|/?od|/?box|/?bbox|ground|obj)>")


_TAG = re.compile(r"<(?:loc_\d+|/?poly|sep|/?od|/?box|/?bbox|ground|obj|/?s|pad)>")


Span = tuple[int, int]
"""Start and end character offsets."""


def _box_instances(text: str, *, allow_empty: bool, banned: set[str]) -> list[list[Span]]:
    pattern = r"(?:(?:<loc_\d+>){4,})" if allow_empty else r"([^<]+(?:<loc_\d+>){4,})"
    instances = []
    for match in re.finditer(pattern, text):
        phrase_text, offset = match.group(0), match.start()
        label = _BOX_TEXT.search(phrase_text)
        if not phrase_text or not label:
            continue
        if label.group().strip() in banned:
            continue
        label_span = (offset, offset + label.end())
        for box in _BOX.finditer(phrase_text):
            instances.append([label_span, (offset + box.start(), offset + box.end())])
    return instances


def _polygon_instances(
    text: str, *, allow_empty: bool, with_points_only: bool = False
) -> list[list[Span]]:
    if allow_empty:
        pattern = rf"(?:{_LOCS_OR_POLY}{{4,}})"
    else:
        pattern = rf"([^<]+{_LOCS_OR_POLY}{{4,}})"
    instances = []
    for match in re.finditer(pattern, text):
        phrase_text, offset = match.group(0), match.start()
        stripped = re.sub(r"^<loc_\d+>", "", phrase_text, count=1)
        if (not stripped and not allow_empty) or not _POLY_TEXT.search(stripped):
            continue
        label_span = (offset, offset + max(phrase_text.find("<"), 0))
        if "<poly>" in phrase_text and "</poly>" in phrase_text:
            parts = [
                (offset + m.start(1), m.group(1)) for m in _POLY_INSTANCE.finditer(phrase_text)
            ]
        else:
            parts = [(offset, phrase_text)]
        for part_offset, part in parts:
            runs = list(_POLY_RUN.finditer(part))
            points = sum(len(re.findall(r"<loc_", run.group(1))) // 2 for run in runs)
            if with_points_only and points == 0:
                continue  # the parser's result has no polygon left for this instance
            if runs:
                body = (part_offset + runs[0].start(), part_offset + runs[-1].end())
                instances.append([label_span, body])
    return instances


def _ocr_instances(text: str) -> list[list[Span]]:
    return [[match.span(1), (match.end(1), match.end())] for match in _OCR.finditer(text)]


def instance_spans(
    task: str | Task | TaskSpec, text: str, banned: set[str] = frozenset()
) -> list[list[Span]]:
    """Character spans of each instance the native parser returns: its label first, then
    its coordinates.

    ``text`` is the generation with ``<s>``, ``</s>`` and ``<pad>`` removed; the order is the
    native parser's order. A custom task is parsed by its result kind (boxes need a label,
    polygons and OCR regions may have none).
    """
    spec = task_spec(task)
    kind, known = spec.result, spec.task
    if kind is ResultKind.OCR_REGIONS:
        return _ocr_instances(text)
    if kind is ResultKind.POLYGONS:
        return _polygon_instances(
            text, allow_empty=not (spec.is_custom and starts_with_label(text))
        )
    if known is Task.OPEN_VOCABULARY_DETECTION and "<poly>" in text:
        return _polygon_instances(text, allow_empty=False, with_points_only=True)
    if known is Task.REGION_PROPOSAL:
        return _box_instances(text, allow_empty=True, banned=set())
    if known is Task.CAPTION_TO_PHRASE_GROUNDING:
        return _box_instances(text, allow_empty=False, banned=banned)
    return _box_instances(text, allow_empty=False, banned=set())


def instance_labels(
    task: str | Task | TaskSpec, text: str, banned: set[str] = frozenset()
) -> list[str]:
    """Each instance's label (or OCR text) exactly as the model wrote it.

    The native parser drops every non-ASCII character of box labels ("café" -> "caf",
    "狗" -> "") and, on malformed answers, can start a label inside a location token
    ("loc_400>dog"); OCR texts can keep location tokens. Here the label is read from the
    same characters the native parser matched, with those faults undone.

    Example:
        >>> instance_labels("OD", "café<loc_1><loc_2><loc_3><loc_4>狗<loc_5><loc_6><loc_7><loc_8>")
        ['café', '狗']
        >>> instance_labels("OD", "cat<loc_1><loc_2><loc_3>dog<loc_0><loc_0><loc_9><loc_9>")
        ['dog']
    """
    return [clean_label(text[start:end]) for (start, end), *_ in instance_spans(task, text, banned)]


def clean_label(text: str) -> str:
    """A label or OCR text without parser debris: a leading fragment of a token (``loc_4>``)
    left where a match started inside it, and any token such as ``<loc_12>`` or ``<poly>``."""
    return _TAG.sub("", _FRAGMENT.sub("", text)).strip()


def starts_with_label(text: str) -> bool:
    """Whether an answer opens with words rather than a token: for a custom polygon task,
    whether its polygons are labelled (the built-in segmentation tasks never are)."""
    return re.match(r"\s*[^<\s]", text) is not None


def strip_dropped(text: str) -> str:
    """``text`` without ``<s>``, ``</s>`` and ``<pad>``, as the native parser reads it."""
    for token in DROPPED_TOKENS:
        text = text.replace(token, "")
    return text
