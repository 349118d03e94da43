"""Draw Florence-2 results: on a matplotlib ``ax`` you pass, or onto a copy of the image."""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .images import ImageSource, load_image
from .results import AnyResult, BoxesResult, OCRResult, PolygonsResult, TextResult

_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 225, 25),
    (128, 0, 0),
    (128, 128, 0),
    (0, 0, 128),
]


def label_color(label: str) -> tuple[int, int, int]:
    """A colour that depends only on the label: the same label looks the same in every figure.

    Example:
        >>> label_color("car") == label_color("car")
        True
    """
    digest = hashlib.md5(label.encode("utf-8")).digest()
    return _PALETTE[digest[0] % len(_PALETTE)]


def _rgb01(color: tuple[int, int, int]) -> tuple[float, float, float]:
    return (color[0] / 255, color[1] / 255, color[2] / 255)


def _text_color(color: tuple[int, int, int]) -> str:
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return "black" if luminance > 150 else "white"


def plot_result(
    image: ImageSource,
    result: AnyResult,
    ax: Any = None,
    *,
    region: Sequence[float] | None = None,
    title: str | None = None,
) -> Any:
    """Show ``image`` on ``ax`` with ``result`` drawn over it, and return ``ax``.

    Boxes get their label; polygons are filled semi-transparently with an outline; OCR lines
    get their quadrilateral and text; a text result becomes the title. Colours follow
    :func:`label_color`.

    Args:
        image: The image the result belongs to (anything :func:`load_image` accepts).
        result: What :func:`run` returned for it.
        ax: A matplotlib axes; a new figure is made when omitted.
        region: The pixel box a region task was asked about, drawn dashed.
        title: Overrides the default title (the task name, or the text of a text result).

    Returns:
        The axes drawn on.

    Example:
        >>> import matplotlib.pyplot as plt
        >>> fig, ax = plt.subplots()  # doctest: +SKIP
        >>> plot_result("images/astronaut.jpg", run(florence, "images/astronaut.jpg", "OD"), ax)
        ... # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon, Rectangle

    picture = load_image(image)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 8 * picture.height / max(picture.width, 1)))
    ax.imshow(picture)
    ax.set_axis_off()
    width, height = picture.size
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)

    if isinstance(result, BoxesResult):
        for (x1, y1, x2, y2), label in zip(result.boxes.tolist(), result.labels, strict=True):
            color = label_color(label)
            ax.add_patch(
                Rectangle(
                    (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=_rgb01(color), linewidth=2
                )
            )
            if label:
                _label(ax, x1, y1, label, color)
    elif isinstance(result, PolygonsResult):
        for shapes, label in zip(result.polygons, result.labels, strict=True):
            color = label_color(label)
            for shape in shapes:
                if len(shape) < 2:
                    continue
                ax.add_patch(Polygon(shape, closed=True, facecolor=(*_rgb01(color), 0.35)))
                ax.add_patch(Polygon(shape, closed=True, fill=False, edgecolor=_rgb01(color)))
            if label and shapes:
                x, y = np.concatenate(shapes).min(axis=0)
                _label(ax, x, y, label, color)
    elif isinstance(result, OCRResult):
        for quad, text in zip(result.quads, result.texts, strict=True):
            color = label_color(text)
            ax.add_patch(Polygon(quad, closed=True, fill=False, edgecolor=_rgb01(color), lw=2))
            _label(ax, quad[:, 0].min(), quad[:, 1].min(), text, color)
    if region is not None:
        x1, y1, x2, y2 = region
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=2.5)
        )
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="black", ls="--", lw=2.5)
        )
    if title is None:
        title = result.task.name
        if isinstance(result, TextResult):
            title = textwrap.fill(result.text, 60) or f"{result.task.name}: (empty answer)"
    ax.set_title(title, fontsize=10)
    return ax


def _label(ax: Any, x: float, y: float, text: str, color: tuple[int, int, int]) -> None:
    # Above the box, unless that would leave the image: then just inside its top edge.
    image_height = abs(ax.get_ylim()[0] - ax.get_ylim()[1])
    ax.text(
        x,
        y,
        text,
        fontsize=8,
        color=_text_color(color),
        va="bottom" if y > 0.05 * image_height else "top",
        clip_on=True,
        bbox={"facecolor": _rgb01(color), "edgecolor": "none", "pad": 1.5, "alpha": 0.85},
    )


def annotate(image: ImageSource, result: AnyResult) -> Image.Image:
    """Return a copy of ``image`` with ``result`` drawn on it (for saving or the CLI).

    The input image is never modified.

    Args:
        image: The image the result belongs to.
        result: What :func:`run` returned for it.

    Returns:
        A new RGB image.

    Example:
        >>> annotate("images/astronaut.jpg", result).save("annotated.png")  # doctest: +SKIP
    """
    picture = load_image(image)
    canvas = picture.convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    line = max(2, round(max(canvas.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(canvas.size) / 50)))
    labels: list[tuple[float, float, str, tuple[int, int, int]]] = []

    if isinstance(result, BoxesResult):
        for box, label in zip(result.boxes.tolist(), result.labels, strict=True):
            color = label_color(label)
            draw.rectangle(_inside(box, canvas.size, line), outline=(*color, 255), width=line)
            if label:
                labels.append((box[0], box[1], label, color))
    elif isinstance(result, PolygonsResult):
        for shapes, label in zip(result.polygons, result.labels, strict=True):
            color = label_color(label)
            for shape in shapes:
                if len(shape) >= 3:
                    points = [tuple(p) for p in shape.tolist()]
                    draw.polygon(points, fill=(*color, 90), outline=(*color, 255), width=line)
            if label and shapes:
                x, y = np.concatenate(shapes).min(axis=0)
                labels.append((x, y, label, color))
    elif isinstance(result, OCRResult):
        for quad, text in zip(result.quads.tolist(), result.texts, strict=True):
            color = label_color(text)
            draw.polygon([tuple(p) for p in quad], outline=(*color, 255), width=line)
            labels.append((min(p[0] for p in quad), min(p[1] for p in quad), text, color))
    elif isinstance(result, TextResult):
        labels.append((0, 0, textwrap.shorten(result.text, 120) or "(empty)", (0, 0, 0)))

    for x, y, text, color in labels:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 4, bottom - top + 4
        x = min(max(0, x), max(0, canvas.width - w))
        y = y - h if y - h >= 0 else y
        draw.rectangle((x, y, x + w, y + h), fill=(*color, 220))
        draw.text((x + 2 - left, y + 2 - top), text, font=font, fill=_text_color(color))
    return Image.alpha_composite(canvas, overlay).convert("RGB")


def _inside(box: Sequence[float], size: tuple[int, int], line: int) -> list[float]:
    """Keep a box's outline inside the image so boxes at the border stay visible."""
    width, height = size
    x1, y1, x2, y2 = box
    left, top = min(max(x1, 0), width - line), min(max(y1, 0), height - line)
    right, bottom = max(min(x2, width - 1), line), max(min(y2, height - 1), line)
    return [left, top, max(left, right), max(top, bottom)]
