"""Draw Florence-2 results: on a matplotlib ``ax`` you pass, or onto a copy of the image.

The ``plot_*`` functions show the image on ``ax`` (a new figure when you pass none), draw over
it and return ``ax``. :func:`annotate` returns a new PIL image instead, for saving; the input
image is never modified. A label always gets the same colour (:func:`label_color`), label text
sits on a filled tag so it reads on dark and light photos, and boxes on the image border stay
inside the picture, and so do their tags (one at the right edge moves left).

Both paths draw the same shapes: :func:`drawables` turns any result into a list of
:class:`Drawable` (box or polygon, filled or outlined, colour, tag), and a matplotlib and a PIL
renderer draw that list. A new kind of result is drawn by teaching :func:`drawables` alone.
"""

from __future__ import annotations

import hashlib
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..boundary.images import ImageSource, load_image
from ..language.results import AnyResult, BoxesResult, OCRResult, PolygonsResult, TextResult
from .tags import _rgb01, _tag, _text_color

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


_REGION_COLOR = (255, 255, 255)
TITLE_WIDTH = 60
"""Characters per title line (about a 4-inch panel at font size 10)."""


TITLE_LINES = 3
"""Title lines at most; the rest of a long answer is cut with "…"."""


def label_color(label: str) -> tuple[int, int, int]:
    """A colour that depends only on the label: the same label looks the same in every figure.

    Example:
        >>> label_color("car") == label_color("car")
        True
    """
    digest = hashlib.md5(label.encode("utf-8")).digest()
    return _PALETTE[digest[0] % len(_PALETTE)]


def _caption(label: str, scores: np.ndarray | None, index: int) -> str:
    if scores is None:
        return label
    return f"{label} {float(scores[index]):.2f}".strip()


def _show(image: ImageSource, ax: Any) -> tuple[Any, Image.Image]:
    """Put the image on ``ax`` (or a new figure) with pixel coordinates and no frame."""
    import matplotlib.pyplot as plt

    picture = load_image(image)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 8 * picture.height / max(picture.width, 1)))
    ax.imshow(picture)
    ax.set_axis_off()
    ax.set_xlim(-0.5, picture.width - 0.5)
    ax.set_ylim(picture.height - 0.5, -0.5)
    return ax, picture


def _inside(box: Sequence[float], size: tuple[int, int], margin: float) -> list[float]:
    """Keep a box's outline inside the image so boxes at the border stay visible."""
    width, height = size
    x1, y1, x2, y2 = box
    left, top = min(max(x1, margin), width - 1 - margin), min(max(y1, margin), height - 1 - margin)
    right = max(min(x2, width - 1 - margin), left)
    bottom = max(min(y2, height - 1 - margin), top)
    return [left, top, right, bottom]


@dataclass(frozen=True)
class Drawable:
    """One shape of a result, as both drawing paths (matplotlib and PIL) render it.

    Attributes:
        points: A box as ``[x1, y1, x2, y2]`` (``is_box``), else a polygon's ``(K, 2)`` points.
        is_box: Whether ``points`` is a box.
        filled: Fill the shape semi-transparently (segmentation masks) or only outline it.
        color: The shape's colour, from its label.
        tag: Text to write on a filled tag at the shape's top-left corner, or None.
    """

    points: Any
    is_box: bool
    filled: bool
    color: tuple[int, int, int]
    tag: str | None

    def corner(self) -> tuple[float, float]:
        """Top-left of the shape: where its tag goes."""
        if self.is_box:
            return self.points[0], self.points[1]
        x, y = np.asarray(self.points).min(axis=0)
        return float(x), float(y)


def drawables(result: AnyResult) -> list[Drawable]:
    """The shapes that draw ``result``: the one place that knows how each result kind looks.

    Boxes are outlined, segmentation polygons filled (every polygon of an instance in its
    colour, the tag on the first), OCR quadrilaterals outlined with their text; a text result
    has no shapes (it becomes the title or a caption).
    """
    shapes: list[Drawable] = []
    if isinstance(result, BoxesResult):
        for i, (box, label) in enumerate(zip(result.boxes.tolist(), result.labels, strict=True)):
            tag = _caption(label, result.scores, i) or None
            shapes.append(Drawable(box, True, False, label_color(label), tag))
    elif isinstance(result, PolygonsResult):
        for i, (polygons, label) in enumerate(zip(result.polygons, result.labels, strict=True)):
            tag = _caption(label, result.scores, i) or None
            for number, polygon in enumerate(polygons):
                first = tag if number == 0 else None
                shapes.append(Drawable(polygon, False, True, label_color(label), first))
    elif isinstance(result, OCRResult):
        for i, (quad, text) in enumerate(zip(result.quads, result.texts, strict=True)):
            shapes.append(
                Drawable(quad, False, False, label_color(text), _caption(text, result.scores, i))
            )
    return shapes


def _draw_on_axes(ax: Any, shapes: Sequence[Drawable], size: tuple[int, int]) -> None:
    """Render drawables with matplotlib patches and tags."""
    from matplotlib.patches import Polygon, Rectangle

    for shape in shapes:
        color = shape.color
        if shape.is_box:
            x1, y1, x2, y2 = _inside(shape.points, size, 1)
            patch = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=_rgb01(color), lw=2)
            corner = (x1, y1)
        elif len(shape.points) >= 2:
            fill = {"fc": _rgb01(color, 0.4)} if shape.filled else {"fill": False, "lw": 2}
            patch = Polygon(shape.points, closed=True, ec=_rgb01(color), **fill)
            corner = shape.corner()
        else:
            continue
        ax.add_patch(patch)
        if shape.tag:
            _tag(ax, *corner, shape.tag, color)


def _draw_on_image(draw: Any, shapes: Sequence[Drawable], size: tuple[int, int], line: int) -> list:
    """Render drawables with PIL onto an RGBA overlay; returns the tags to write on top."""
    tags = []
    for shape in shapes:
        color = shape.color
        if shape.is_box:
            draw.rectangle(_inside(shape.points, size, 0), outline=(*color, 255), width=line)
        elif len(shape.points) >= 3:
            points = [tuple(p) for p in np.asarray(shape.points).tolist()]
            fill = (*color, 100) if shape.filled else None
            draw.polygon(points, fill=fill, outline=(*color, 255), width=line)
        else:
            continue
        if shape.tag:
            tags.append((*shape.corner(), shape.tag, color))
    return tags


def plot_boxes(image: ImageSource, result: BoxesResult, ax: Any = None) -> Any:
    """Draw boxes with their labels (and scores when the result has them).

    Args:
        image: The image the result belongs to (anything :func:`load_image` accepts).
        result: A :class:`BoxesResult`.
        ax: Matplotlib axes to draw on; a new figure when omitted.

    Returns:
        The axes.

    Example:
        >>> boxes = run(florence, "images/astronaut.jpg", "OD")  # doctest: +SKIP
        >>> plot_boxes("images/astronaut.jpg", boxes)  # doctest: +SKIP
    """
    ax, picture = _show(image, ax)
    _draw_on_axes(ax, drawables(result), picture.size)
    return ax


def plot_polygons(image: ImageSource, result: PolygonsResult, ax: Any = None) -> Any:
    """Fill each instance's polygons semi-transparently and outline them.

    An instance may have several polygons (an object split by an occluder); they share the
    instance's colour.

    Example:
        >>> mask = run(florence, image, "REFERRING_EXPRESSION_SEGMENTATION", text="the cat")
        ... # doctest: +SKIP
        >>> plot_polygons(image, mask)  # doctest: +SKIP
    """
    ax, picture = _show(image, ax)
    _draw_on_axes(ax, drawables(result), picture.size)
    return ax


def plot_ocr(image: ImageSource, result: OCRResult, ax: Any = None) -> Any:
    """Outline each text line's quadrilateral and write the text it holds.

    Example:
        >>> lines = run(florence, "images/poster.png", "OCR_WITH_REGION")  # doctest: +SKIP
        >>> plot_ocr("images/poster.png", lines)  # doctest: +SKIP
    """
    ax, picture = _show(image, ax)
    _draw_on_axes(ax, drawables(result), picture.size)
    return ax


def plot_region(image: ImageSource, region: Sequence[float], ax: Any = None) -> Any:
    """Outline the pixel box a region task was asked about (white with black dashes).

    Example:
        >>> plot_region("images/astronaut.jpg", (60, 100, 300, 500))  # doctest: +SKIP
    """
    from matplotlib.patches import Rectangle

    ax, picture = _show(image, ax) if ax is None or not ax.images else (ax, None)
    x1, y1, x2, y2 = region
    for style in ({"ec": "white", "ls": "-"}, {"ec": "black", "ls": "--"}):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2.5, **style))
    return ax


def plot_result(
    image: ImageSource,
    result: AnyResult,
    ax: Any = None,
    *,
    region: Sequence[float] | None = None,
    title: str | None = None,
) -> Any:
    """Draw any result with the right helper; a text result becomes the title.

    Args:
        image: The image the result belongs to.
        result: What :func:`run` returned for it.
        ax: Matplotlib axes; a new figure when omitted.
        region: The pixel box a region task was asked about, outlined.
        title: Overrides the default title, which says what was asked and what came back
            (:func:`default_title`: ``OD: 3 boxes``, ``OPEN_VOCABULARY_DETECTION "a flag":
            0 boxes``, ``CAPTION: A cat on a sofa.``).

    Returns:
        The axes.

    Example:
        >>> import matplotlib.pyplot as plt
        >>> fig, ax = plt.subplots()  # doctest: +SKIP
        >>> plot_result("images/cat.jpg", run(florence, "images/cat.jpg", "OD"), ax)
        ... # doctest: +SKIP
    """
    ax, picture = _show(image, ax)
    _draw_on_axes(ax, drawables(result), picture.size)
    if region is not None:
        plot_region(image, region, ax)
    if title is None:
        title = default_title(result)
    ax.set_title(fit_title(title, width=_title_width(ax)), fontsize=10)
    return ax


def _title_width(ax: Any) -> int:
    """Characters that fit across the axes' panel at font size 10 (about 11 per inch)."""
    spec = ax.get_subplotspec()
    columns = spec.get_gridspec().ncols if spec is not None else 1
    return max(20, int(ax.figure.get_figwidth() / columns * 11))


_COUNTED = {"BoxesResult": "box", "PolygonsResult": "instance", "OCRResult": "text region"}


def default_title(result: AnyResult) -> str:
    """What was asked and what came back: the task, its query, and the answer or a count.

    A count of 0 says the model answered with nothing; a cut-off answer says so.

    Example:
        >>> from florence_helpers import BoxesResult, Task
        >>> found = BoxesResult(Task.OPEN_VOCABULARY_DETECTION, (64, 48), raw="",
        ...                     boxes=np.zeros((0, 4)), labels=[], query="a flag")
        >>> default_title(found)
        'OPEN_VOCABULARY_DETECTION "a flag": 0 boxes'
    """
    name = getattr(result.task, "name", result.task)  # a custom prompt has no enum name
    query = result.query
    if query is None:
        asked = ""
    elif query.startswith("(") and str(name).startswith("REGION_TO"):
        asked = f" {query}"  # a region in pixels
    else:
        asked = f' "{query}"'
    if isinstance(result, TextResult):
        answer = result.text or "(empty answer)"
    else:
        count = len(result)
        noun = _COUNTED.get(type(result).__name__, "instance")
        plural = "es" if noun.endswith("x") else "s"
        answer = f"{count} {noun}{'' if count == 1 else plural}"
    cut = " (cut off at max_new_tokens)" if result.truncated else ""
    return f"{name}{asked}: {answer}{cut}"


def fit_title(text: str, width: int = TITLE_WIDTH, lines: int = TITLE_LINES) -> str:
    """``text`` wrapped to ``width`` characters, cut to ``lines`` lines ending in "…".

    Every title the plot helpers draw goes through it, so a long answer cannot make a figure
    thousands of pixels wide or run into the panel above.

    Example:
        >>> print(fit_title("a " * 100, width=20, lines=2))
        a a a a a a a a a a
        a a a a a a a a a a…
    """
    wrapped = [row for part in str(text).splitlines() for row in textwrap.wrap(part, width)]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1].rstrip() + "…"
    return "\n".join(wrapped)


def plot_grid(
    images: Sequence[ImageSource],
    results: Sequence[AnyResult],
    *,
    columns: int = 3,
    titles: Sequence[str] | None = None,
    size: float = 4.0,
) -> Any:
    """Draw several results side by side, one image per panel; returns the figure.

    Args:
        images: One image per result (the same image may repeat, e.g. one per task).
        results: The results to draw.
        columns: Panels per row.
        titles: Optional panel titles; by default each result's own.
        size: Width and height of one panel in inches.

    Example:
        >>> results = run(florence, paths, "CAPTION")  # doctest: +SKIP
        >>> plot_grid(paths, results, columns=4)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    if len(images) != len(results):
        raise ValueError(f"Got {len(images)} images for {len(results)} results.")
    count = max(len(results), 1)
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    pictures = [load_image(image) for image in images]
    # Panels as tall as the tallest image needs at this width, plus room for a 3-line title:
    # square panels would leave wide gaps between rows of landscape photos.
    aspect = max((p.height / p.width for p in pictures), default=1.0)
    height = size * aspect + 0.55
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, height * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(results):
            ax.set_axis_off()
            continue
        title = titles[index] if titles is not None else None
        plot_result(pictures[index], results[index], ax, title=title)
    fig.tight_layout()
    return fig


def annotate(
    image: ImageSource, result: AnyResult, *, region: Sequence[float] | None = None
) -> Image.Image:
    """Return a copy of ``image`` with ``result`` drawn on it (for saving, or the CLI).

    The input image is never modified.

    Args:
        image: The image the result belongs to.
        result: What :func:`run` returned for it.
        region: The pixel box a region task was asked about, outlined.

    Returns:
        A new RGB image of the same size.

    Example:
        >>> annotate("images/astronaut.jpg", boxes).save("annotated.png")  # doctest: +SKIP
    """
    canvas = load_image(image).convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    line = max(2, round(max(canvas.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(canvas.size) / 50)))
    tags = _draw_on_image(draw, drawables(result), canvas.size, line)
    if isinstance(result, TextResult):
        tags.append((0, 0, textwrap.shorten(result.text, 120) or "(empty)", (0, 0, 0)))
    if region is not None:
        draw.rectangle(_inside(region, canvas.size, 0), outline=(*_REGION_COLOR, 255), width=line)

    for x, y, text, color in tags:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 4, bottom - top + 4
        x = min(max(0, x), max(0, canvas.width - w))
        y = y - h if y - h >= 0 else max(0, y)
        draw.rectangle((x, y, x + w, y + h), fill=(*color, 255))
        draw.text((x + 2 - left, y + 2 - top), text, font=font, fill=_text_color(color))
    return Image.alpha_composite(canvas, overlay).convert("RGB")
