"""Turn results into masks, COCO annotations and ``supervision.Detections``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..boundary.images import ImageSource, load_image
from ..language.regions import xywh_to_xyxy, xyxy_to_xywh
from ..language.results import AnyResult, BoxesResult, OCRResult, PolygonsResult
from ..language.tasks import Task


def polygons_to_mask(polygons: Iterable[np.ndarray], image_size: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons (each ``(K, 2)`` pixel points) into one boolean mask.

    A pixel belongs to the mask when its centre lies inside a polygon, so the mask's pixel
    count matches the polygon's area.

    Args:
        polygons: The polygons to fill; their union is returned.
        image_size: ``(width, height)`` of the mask.

    Returns:
        A boolean array of shape ``(height, width)``.

    Example:
        >>> square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]])
        >>> int(polygons_to_mask([square], (20, 20)).sum())
        100
    """
    from matplotlib.path import Path

    width, height = _mask_size(image_size)
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=float).reshape(-1, 2)
        if len(points) < 3 or not np.isfinite(points).all():
            continue
        x0, y0 = np.maximum(np.floor(points.min(axis=0)).astype(int), 0)
        x1 = min(int(np.ceil(points[:, 0].max())), width)
        y1 = min(int(np.ceil(points[:, 1].max())), height)
        if x1 <= x0 or y1 <= y0:
            continue
        path = Path(points)
        rows = max(1, _CENTRES_AT_ONCE // (x1 - x0))  # a strip at a time: 45 bytes a centre
        for top in range(y0, y1, rows):
            bottom = min(top + rows, y1)
            xs, ys = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(top, bottom) + 0.5)
            centres = np.column_stack([xs.ravel(), ys.ravel()])
            mask[top:bottom, x0:x1] |= path.contains_points(centres).reshape(xs.shape)
    return mask


_CENTRES_AT_ONCE = 1 << 20


def _mask_size(image_size: Sequence[int]) -> tuple[int, int]:
    """``(width, height)`` of a mask, checked: whole pixels, at most the pixels decoded."""
    from ..boundary.inputs import DEFAULT_MAX_PIXELS

    width, height = (int(v) for v in image_size)
    if width < 1 or height < 1 or width * height > DEFAULT_MAX_PIXELS:
        raise ValueError(
            f"A mask of {width}x{height} pixels: its size must be at least 1x1 and at most "
            f"{DEFAULT_MAX_PIXELS / 1e6:.1f} megapixels, the largest image decoded."
        )
    return width, height


def to_masks(result: PolygonsResult) -> np.ndarray:
    """One boolean mask per instance: an array of shape ``(N, height, width)``.

    Example:
        >>> masks = to_masks(run(florence, image, "REFERRING_EXPRESSION_SEGMENTATION",
        ...                      text="the cat"))  # doctest: +SKIP
        >>> masks.sum(axis=(1, 2))  # pixels per instance  # doctest: +SKIP
    """
    width, height = result.image_size
    masks = [polygons_to_mask(shapes, result.image_size) for shapes in result.polygons]
    return np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)


def to_mask(result: PolygonsResult) -> np.ndarray:
    """The union of all instances as one ``(height, width)`` boolean mask."""
    return polygons_to_mask((p for shapes in result.polygons for p in shapes), result.image_size)


def cutout(image: ImageSource, mask: np.ndarray, *, crop: bool = True) -> Image.Image:
    """Cut the masked object out of ``image``: an RGBA image, transparent outside the mask.

    Args:
        image: The image the mask belongs to.
        mask: A boolean ``(height, width)`` mask, e.g. from :func:`to_mask`.
        crop: Crop to the mask's bounding box (an empty mask gives a 1x1 transparent image).

    Example:
        >>> cutout("images/cat.jpg", to_mask(segmentation)).save("cat.png")  # doctest: +SKIP
    """
    picture = load_image(image)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (picture.height, picture.width):
        raise ValueError(
            f"The mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{picture.width}x{picture.height}."
        )
    rgba = picture.convert("RGBA")
    rgba.putalpha(Image.fromarray(mask.astype(np.uint8) * 255))
    if not crop:
        return rgba
    if not mask.any():
        return Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    ys, xs = np.nonzero(mask)
    return rgba.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))


def to_coco(
    result: BoxesResult | PolygonsResult | OCRResult,
    *,
    image_id: int = 1,
    categories: Mapping[str, int] | None = None,
    first_id: int = 1,
) -> list[dict[str, Any]]:
    """COCO-style annotation dicts for the instances of a result.

    Boxes become ``bbox`` (``[x, y, width, height]``); polygons and OCR quads also get
    ``segmentation`` (flat ``[x1, y1, x2, y2, ...]`` lists). Scores, when present, become
    ``score`` (the COCO results format). OCR texts are kept under ``text``.

    Args:
        result: A boxes, polygons or OCR result.
        image_id: The COCO image id to write.
        categories: Label to category id; labels not in it get new ids after the largest one.
            Pass the same dict for every image to keep ids consistent (it is not modified; use
            :func:`coco_categories` to build one from all labels first).
        first_id: Annotation id of the first instance.

    Returns:
        One dict per instance.

    Example:
        >>> result = BoxesResult(Task.OD, (100, 100), raw="",
        ...                      boxes=np.array([[10., 20., 30., 60.]]), labels=["cat"])
        >>> to_coco(result)[0]["bbox"]
        [10.0, 20.0, 20.0, 40.0]
    """
    ids = dict(categories or {})
    annotations = []
    for index, (label, box, segmentation) in enumerate(_instances(result)):
        if label not in ids:
            ids[label] = max(ids.values(), default=0) + 1
        bbox = xyxy_to_xywh(box)
        annotation: dict[str, Any] = {
            "id": first_id + index,
            "image_id": image_id,
            "category_id": ids[label],
            "bbox": bbox,
            "area": bbox[2] * bbox[3],
            "iscrowd": 0,
        }
        if segmentation is not None:
            annotation["segmentation"] = segmentation
            annotation["area"] = float(
                sum(_polygon_area(np.reshape(s, (-1, 2))) for s in segmentation)
            )
        if isinstance(result, OCRResult):
            annotation["text"] = label
        if result.scores is not None:
            annotation["score"] = float(result.scores[index])
        annotations.append(annotation)
    return annotations


def coco_categories(labels: Iterable[str]) -> dict[str, int]:
    """Label to COCO category id (1, 2, ...) for the distinct labels, in first-seen order."""
    ids: dict[str, int] = {}
    for label in labels:
        ids.setdefault(label, len(ids) + 1)
    return ids


def from_coco(
    annotations: Sequence[Mapping[str, Any]],
    categories: Mapping[int, str] | Sequence[Mapping[str, Any]],
    image_size: tuple[int, int],
    *,
    task: Task = Task.OD,
) -> BoxesResult:
    """Read COCO annotations (``bbox`` as ``[x, y, width, height]``) back as a boxes result.

    Args:
        annotations: The annotations of one image.
        categories: Category id to name, or COCO's ``categories`` list of ``{"id", "name"}``.
        image_size: ``(width, height)`` of the image.
        task: The task to record on the result.

    Raises:
        ValueError: An annotation without a usable ``bbox`` (four finite numbers, width and
            height not negative) or with a ``category_id`` that is not among ``categories``;
            the message names it.

    Example:
        >>> back = from_coco([{"bbox": [10, 20, 20, 40], "category_id": 1}], {1: "cat"}, (100, 100))
        >>> back.labels, back.boxes.tolist()
        (['cat'], [[10.0, 20.0, 30.0, 60.0]])
    """
    if not isinstance(categories, Mapping):
        try:
            categories = {int(c["id"]): str(c["name"]) for c in categories}
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                "categories must be COCO's list of {'id', 'name'} entries, or a dict of id to "
                "name; an entry lacks its id or name."
            ) from None
    boxes, labels = [], []
    for number, annotation in enumerate(annotations):
        where = f"annotation {annotation.get('id', f'#{number}')}"
        bbox = annotation.get("bbox")
        try:
            x, y, width, height = (float(v) for v in bbox)
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: bbox must be [x, y, width, height], got {bbox!r}."
            ) from None
        if not all(np.isfinite([x, y, width, height])) or width < 0 or height < 0:
            raise ValueError(
                f"{where}: bbox {bbox!r} needs finite numbers and a width and height of 0 or more."
            )
        if annotation.get("category_id") not in categories:
            raise ValueError(
                f"{where}: category_id {annotation.get('category_id')!r} is not among the "
                f"categories ({sorted(categories)})."
            )
        boxes.append(xywh_to_xyxy(bbox))
        labels.append(categories[annotation["category_id"]])
    scores = [a["score"] for a in annotations if "score" in a]
    return BoxesResult(
        task,
        (int(image_size[0]), int(image_size[1])),
        raw="",
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=labels,
        scores=np.asarray(scores, dtype=np.float32)
        if len(scores) == len(annotations) and scores
        else None,
    )


def to_supervision(result: BoxesResult | PolygonsResult | OCRResult) -> Any:
    """The result as ``supervision.Detections`` (boxes, class names, masks for polygons).

    Requires the optional ``supervision`` package: ``pip install "florence-helpers[supervision]"``.
    ``class_id`` numbers the distinct labels in first-seen order; the names are in
    ``detections.data["class_name"]``.

    Example:
        >>> detections = to_supervision(run(florence, "images/cat.jpg", "OD"))  # doctest: +SKIP
    """
    sv = supervision_module()
    instances = list(_instances(result))
    labels = [label for label, _, _ in instances]
    ids = coco_categories(labels)
    kwargs: dict[str, Any] = {
        "xyxy": np.asarray([box for _, box, _ in instances], dtype=np.float32).reshape(-1, 4),
        "class_id": np.asarray([ids[label] - 1 for label in labels], dtype=int),
        "data": {"class_name": np.asarray(labels, dtype=str)},
    }
    if result.scores is not None:
        kwargs["confidence"] = np.asarray(result.scores, dtype=np.float32)
    if isinstance(result, PolygonsResult):
        kwargs["mask"] = to_masks(result)
    return sv.Detections(**kwargs)


def supervision_module() -> Any:
    """The optional ``supervision`` package, or an ImportError saying how to install it."""
    try:
        import supervision
    except ImportError:
        raise ImportError(
            "to_supervision needs the optional 'supervision' package: "
            'pip install "florence-helpers[supervision]" (or pip install supervision).'
        ) from None
    return supervision


def _instances(result: AnyResult) -> Iterable[tuple[str, list[float], list[list[float]] | None]]:
    """(label, xyxy box, flat polygons or None) for each instance of a spatial result."""
    if isinstance(result, BoxesResult):
        for (x1, y1, x2, y2), label in zip(result.boxes.tolist(), result.labels, strict=True):
            # A box written corner-first the other way round (x2 < x1) is the same box; COCO's
            # width and height cannot be negative.
            yield label, [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], None
    elif isinstance(result, PolygonsResult):
        for shapes, label in zip(result.polygons, result.labels, strict=True):
            points = np.concatenate(shapes) if shapes else np.zeros((1, 2))
            box = [*points.min(axis=0).tolist(), *points.max(axis=0).tolist()]
            yield label, box, [s.flatten().tolist() for s in shapes]
    elif isinstance(result, OCRResult):
        for quad, text in zip(result.quads, result.texts, strict=True):
            box = [*quad.min(axis=0).tolist(), *quad.max(axis=0).tolist()]
            yield text, box, [quad.flatten().tolist()]
    else:
        raise TypeError(f"{type(result).__name__} has no boxes, polygons or quads to convert.")


def _polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a polygon given as ``(K, 2)`` points."""
    if len(points) < 3:
        return 0.0
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)
