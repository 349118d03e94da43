"""Typed results for Florence-2 answers, parsed with the native processor's own parser.

Every result keeps the task, the image size the coordinates refer to, the raw generated text
(special tokens included, padding removed) and whether the answer was cut off by
``max_new_tokens``. Coordinates are pixels of the original image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .grammar import clean_label, instance_labels, starts_with_label, strip_dropped
from .regions import LOC_TOKEN, dequantize
from .tasks import ResultKind, Task, TaskSpec, UnknownTaskError, task_spec

_SPECIAL_TOKENS = re.compile(r"</?s>|<pad>")


@dataclass
class Result:
    """What all results share.

    Attributes:
        task: The task that produced it: a :class:`Task`, or a custom prompt's token.
        image_size: ``(width, height)`` of the original image.
        raw: The generated text with special tokens, without padding.
        truncated: True when generation hit ``max_new_tokens`` before the answer ended; the
            parsed fields then hold only what parsed cleanly.
        query: What the task was asked besides the image: the text (a phrase to find, a
            caption to ground), the region as ``"(x1, y1, x2, y2)"`` in pixels, or the class
            names of :func:`~florence_helpers.detect`; None for tasks that take only the image.
    """

    task: Task | str
    image_size: tuple[int, int]
    raw: str = field(repr=False)
    truncated: bool = field(default=False, kw_only=True)
    query: str | None = field(default=None, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the result."""
        asked = {"query": self.query} if self.query is not None else {}
        return {
            "task": str(self.task),
            **asked,
            "image_size": list(self.image_size),
            "truncated": self.truncated,
            **self._payload(),
            "raw": self.raw,
        }

    def _payload(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        task: str | Task | None = None,
        image_size: Sequence[int] | None = None,
    ) -> AnyResult:
        """The result that :meth:`to_dict` wrote; its kind is read from the fields.

        Args:
            data: A dict from :meth:`to_dict` (or JSON read back).
            task, image_size: Fill in what the dict leaves out (a labelling record keeps
                them beside the result, not in it).

        Example:
            >>> boxes = BoxesResult(Task.OD, (64, 48), raw="", boxes=np.ones((1, 4)), labels=["a"])
            >>> Result.from_dict(boxes.to_dict()).labels
            ['a']
        """
        kind = next(
            (k for k in (BoxesResult, PolygonsResult, OCRResult, TextResult) if k._key in data),
            None,
        )
        if kind is None or (cls is not Result and kind is not cls):
            raise ValueError(
                f"Not a {cls.__name__} dict: expected one of the keys boxes, polygons, quads or "
                f"text, got {sorted(data)}."
            )
        return kind(
            _task_of(task if task is not None else data["task"]),
            _image_size(image_size if image_size is not None else data["image_size"]),
            raw=data.get("raw", ""),
            truncated=bool(data.get("truncated", False)),
            query=data.get("query"),
            **kind._from_payload(data),
        )

    @classmethod
    def _from_payload(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class TextResult(Result):
    """A caption, OCR text, or the answer of a region task.

    Attributes:
        text: The answer without special or location tokens.
        box: The pixel box ``x1, y1, x2, y2`` the answer gave with its text (a region
            task answers with the region it described), else None.
        score: With ``scores=True``: the geometric mean of the answer tokens' probabilities.
        logprob: With ``scores=True``: their mean log-probability (``log(score)``).
        word_scores: With ``scores=True``: ``(word, probability)`` for each word, the
            probability being the product over the word's tokens.
    """

    text: str = ""
    box: np.ndarray | None = None
    score: float | None = None
    logprob: float | None = None
    word_scores: list[tuple[str, float]] | None = field(default=None, repr=False)
    _key = "text"

    def _payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"text": self.text}
        if self.box is not None:
            payload["box"] = np.asarray(self.box).tolist()
        if self.score is not None:
            payload.update(score=self.score, logprob=self.logprob, word_scores=self.word_scores)
        return payload

    @classmethod
    def _from_payload(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        words = data.get("word_scores")
        box = data.get("box")
        return {
            "text": data["text"],
            "box": None if box is None else np.asarray(box, dtype=np.float32),
            "score": data.get("score"),
            "logprob": data.get("logprob"),
            "word_scores": None if words is None else [(w, float(p)) for w, p in words],
        }

    def __str__(self) -> str:
        return self.text


class _Instances:
    """Select instances like a numpy array: ``result[result.scores > 0.5]``, ``result[:3]``."""

    _fields: tuple[str, ...] = ()

    def __getitem__(self, index: Any) -> Any:
        chosen = np.atleast_1d(np.arange(len(self))[index])  # type: ignore[arg-type]
        changes: dict[str, Any] = {}
        for name in self._fields:
            values = getattr(self, name)
            if values is None:
                continue
            if isinstance(values, np.ndarray):
                changes[name] = values[chosen]
            else:
                changes[name] = [values[i] for i in chosen]
        return replace(self, **changes)  # type: ignore[type-var]


@dataclass
class BoxesResult(_Instances, Result):
    """Boxes with labels: detection, dense captions, proposals, grounding.

    Attributes:
        boxes: Float array of shape ``(N, 4)``, ``x1, y1, x2, y2`` in pixels.
        labels: ``N`` labels; empty strings for region proposals.
        scores: ``N`` confidences in 0..1, or None (the native model gives none).
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float32))
    labels: list[str] = field(default_factory=list)
    scores: np.ndarray | None = None
    _fields = ("boxes", "labels", "scores")
    _key = "boxes"

    def __len__(self) -> int:
        return len(self.labels)

    def _payload(self) -> dict[str, Any]:
        return {"boxes": self.boxes.tolist(), "labels": list(self.labels), **_scores(self)}

    @classmethod
    def _from_payload(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        boxes = _coordinates(data, "boxes", (-1, 4), "boxes of four numbers")
        return {
            "boxes": boxes,
            "labels": _strings(data, "labels", len(boxes)),
            "scores": _read_scores(data, len(boxes)),
        }


@dataclass
class PolygonsResult(_Instances, Result):
    """Segmentation polygons: one or more polygons per instance.

    Attributes:
        polygons: For each instance, a list of float arrays of shape ``(K, 2)`` (x, y pixels).
        labels: One label per instance (often empty: the phrase was yours).
        scores: One confidence per instance in 0..1, or None.
    """

    polygons: list[list[np.ndarray]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    scores: np.ndarray | None = None
    _fields = ("polygons", "labels", "scores")
    _key = "polygons"

    def __len__(self) -> int:
        return len(self.polygons)

    @classmethod
    def _from_payload(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        instances = data["polygons"]
        if not isinstance(instances, list) or not all(isinstance(i, list) for i in instances):
            raise ValueError("polygons must be a list of instances, each a list of polygons.")
        polygons = [
            [_coordinates({"polygons": p}, "polygons", (-1, 2), "points") for p in instance]
            for instance in instances
        ]
        return {
            "polygons": polygons,
            "labels": _strings(data, "labels", len(polygons)),
            "scores": _read_scores(data, len(polygons)),
        }

    def _payload(self) -> dict[str, Any]:
        return {
            "polygons": [[p.tolist() for p in instance] for instance in self.polygons],
            "labels": list(self.labels),
            **_scores(self),
        }


@dataclass
class OCRResult(_Instances, Result):
    """Text lines with their quadrilaterals.

    Attributes:
        quads: Float array of shape ``(N, 4, 2)``: four ``(x, y)`` corners per line, in the
            model's order (clockwise from top-left for upright text).
        texts: ``N`` strings.
        scores: ``N`` confidences in 0..1, or None.
    """

    quads: np.ndarray = field(default_factory=lambda: np.zeros((0, 4, 2), dtype=np.float32))
    texts: list[str] = field(default_factory=list)
    scores: np.ndarray | None = None
    _fields = ("quads", "texts", "scores")
    _key = "quads"

    def __len__(self) -> int:
        return len(self.texts)

    def _payload(self) -> dict[str, Any]:
        return {"quads": self.quads.tolist(), "texts": list(self.texts), **_scores(self)}

    @classmethod
    def _from_payload(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        quads = _coordinates(data, "quads", (-1, 4, 2), "quadrilaterals of four points")
        return {
            "quads": quads,
            "texts": _strings(data, "texts", len(quads)),
            "scores": _read_scores(data, len(quads)),
        }


def _image_size(value: Any) -> tuple[int, int]:
    """``(width, height)`` read back: two whole numbers of pixels, at least 1 each."""
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(f"image_size must be [width, height] in whole pixels, got {value!r}.")
    return int(value[0]), int(value[1])


def _scores(result: Any) -> dict[str, Any]:
    return {} if result.scores is None else {"scores": np.asarray(result.scores).tolist()}


def _read_scores(data: Mapping[str, Any], count: int) -> np.ndarray | None:
    if data.get("scores") is None:
        return None
    scores = _coordinates(data, "scores", (-1,), "numbers")
    if len(scores) != count:
        raise ValueError(f"scores holds {len(scores)} numbers for {count} instances.")
    return scores


def _coordinates(data: Mapping[str, Any], key: str, shape: tuple[int, ...], what: str) -> Any:
    """``data[key]`` as a float32 array of ``shape``, every number finite, or a ValueError
    saying what it must be (a result read back from a file may have been edited by hand)."""
    values = data[key]
    try:
        if isinstance(values, str | bytes | Mapping):
            raise TypeError
        with np.errstate(over="ignore"):  # past float32's range: refused below as not finite
            array = np.asarray(values, dtype=np.float32).reshape(shape)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} must be a list of {what}, got {str(values)[:60]}.") from None
    if not np.isfinite(array).all():
        raise ValueError(f"{key} holds a number that is not finite.")
    return array


def _strings(data: Mapping[str, Any], key: str, count: int) -> list[str]:
    """``data[key]`` as ``count`` strings, one per instance, or a ValueError."""
    values = data.get(key)
    if (
        not isinstance(values, list)
        or len(values) != count
        or not all(isinstance(v, str) for v in values)
    ):
        raise ValueError(
            f"{key} must be {count} strings, one per instance, got {str(values)[:60]}."
        )
    return list(values)


AnyResult = TextResult | BoxesResult | PolygonsResult | OCRResult


def clean_generated_text(text: str) -> str:
    """Remove padding from a decoded generation (the native parser keeps ``<pad>`` in text)."""
    return text.replace("<pad>", "")


def parse_answer(
    processor: Any,
    raw: str,
    task: str | Task | TaskSpec,
    image_size: tuple[int, int],
    *,
    truncated: bool = False,
) -> AnyResult:
    """Parse one generated answer into a typed result.

    Args:
        processor: A Florence-2 processor (its ``post_process_generation`` does the parsing).
        raw: The decoded generation, special tokens kept.
        task: The task that was run.
        image_size: ``(width, height)`` of the original image.
        truncated: Whether generation stopped at ``max_new_tokens``.

    Returns:
        A :class:`TextResult`, :class:`BoxesResult`, :class:`PolygonsResult` or
        :class:`OCRResult`, according to the task.

    Example:
        >>> result = parse_answer(processor, "</s><s>car<loc_52><loc_333><loc_932><loc_774></s>",
        ...                       "OD", (1000, 1000))  # doctest: +SKIP
        >>> result.labels, result.boxes.tolist()  # doctest: +SKIP
        (['car'], [[52.0, 333.0, 932.0, 774.0]])
    """
    spec = task_spec(task)
    raw = clean_generated_text(raw)
    size = (int(image_size[0]), int(image_size[1]))
    common = {"task": spec.task, "image_size": size, "raw": raw, "truncated": truncated}
    parsed = _native_parse(processor, raw, spec, size)
    banned = set(getattr(processor.post_processor, "banned_grounding_tokens", ()))
    written = instance_labels(spec, strip_dropped(raw), banned)

    if spec.result is ResultKind.TEXT:
        text = _SPECIAL_TOKENS.sub("", LOC_TOKEN.sub("", parsed)).strip()
        return TextResult(**common, text=text, box=_first_box(raw, size))
    if spec.result is ResultKind.OCR_REGIONS:
        quads = _array(parsed["quad_boxes"], (-1, 4, 2))
        texts = _exact(written, parsed["labels"])
        return OCRResult(**common, quads=quads, texts=texts)
    if spec.result is ResultKind.POLYGONS:
        polygons = [_polygons(instance) for instance in parsed["polygons"]]
        labels = _exact(written, parsed["labels"])
        return PolygonsResult(**common, polygons=polygons, labels=labels)
    if spec.task is Task.OPEN_VOCABULARY_DETECTION:
        return _open_vocabulary(parsed, common, written)
    boxes = _array(parsed["bboxes"], (-1, 4))
    return BoxesResult(**common, boxes=boxes, labels=_exact(written, parsed["labels"]))


# The native post-processing type for each result kind of a custom task.
_NATIVE_TYPE = {
    ResultKind.TEXT: "pure_text",
    ResultKind.BOXES: "description_with_bboxes",
    ResultKind.POLYGONS: "polygons",
    ResultKind.OCR_REGIONS: "ocr",
}


def _native_parse(processor: Any, raw: str, spec: TaskSpec, size: tuple[int, int]) -> Any:
    """What the native processor makes of ``raw``: coordinates are always its own."""
    if not spec.is_custom:
        return processor.post_process_generation(raw, task=spec.token, image_size=size)[spec.token]
    kind = _NATIVE_TYPE[spec.result]
    if spec.result is ResultKind.POLYGONS and starts_with_label(strip_dropped(raw)):
        kind = "description_with_polygons"
    instances = processor.post_processor(text=raw, image_size=size, parse_tasks=[kind])[kind]
    if spec.result is ResultKind.TEXT:
        return instances
    if spec.result is ResultKind.OCR_REGIONS:
        return {
            "quad_boxes": [i["quad_box"] for i in instances],
            "labels": [i["text"] for i in instances],
        }
    if spec.result is ResultKind.POLYGONS:
        return {
            "polygons": [i["polygons"] for i in instances],
            "labels": [i["cat_name"] for i in instances],
        }
    return {"bboxes": [i["bbox"] for i in instances], "labels": [i["cat_name"] for i in instances]}


def _exact(written: list[str], native: list[str]) -> list[str]:
    """The labels as written, one per native instance; the native ones, cleaned, if the two
    readings ever disagree on the number of instances."""
    if len(written) == len(native):
        return written
    return [clean_label(label) for label in native]


def _first_box(raw: str, size: tuple[int, int]) -> np.ndarray | None:
    """The first four location tokens of an answer as a pixel box, if it has four."""
    bins = [int(b) for b in LOC_TOKEN.findall(raw)[:4]]
    if len(bins) < 4:
        return None
    return dequantize(bins, size).astype(np.float32)


def _task_of(value: Any) -> Task | str:
    """The task a stored result names: a built-in one, or a custom prompt's token."""
    try:
        return task_spec(value).task
    except UnknownTaskError:
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise


def _open_vocabulary(
    parsed: dict[str, Any], common: dict[str, Any], written: list[str]
) -> BoxesResult:
    """Merge the native split answer (boxes, polygons) into one list of boxes.

    A polygon answer is represented by the box that encloses it. An answer holds boxes or
    polygons, never both, so ``written`` (the exact labels) lines up with either.
    """
    boxes = list(parsed["bboxes"])
    labels = _exact(written, parsed["bboxes_labels"]) if boxes else []
    polygon_labels = _exact(written, parsed["polygons_labels"])
    for instance, label in zip(parsed["polygons"], polygon_labels, strict=True):
        points = np.concatenate([p for p in _polygons(instance)] or [np.zeros((0, 2))])
        if len(points):
            boxes.append([*points.min(axis=0), *points.max(axis=0)])
            labels.append(label)
    return BoxesResult(**common, boxes=_array(boxes, (-1, 4)), labels=labels)


def _polygons(instance: list[list[float]]) -> list[np.ndarray]:
    shapes = [_array(flat, (-1, 2)) for flat in instance]
    return [shape for shape in shapes if len(shape) > 0]


def _array(values: Any, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(shape)
