"""Labels drawn on figures: a filled tag in the label's colour that keeps itself inside the
axes (a box at the right edge gets its label moved left, not cut off)."""

from __future__ import annotations

import functools
from typing import Any


def _rgb01(color: tuple[int, int, int], alpha: float = 1.0) -> tuple[float, float, float, float]:
    return (color[0] / 255, color[1] / 255, color[2] / 255, alpha)


def _text_color(color: tuple[int, int, int]) -> str:
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return "black" if luminance > 150 else "white"


def _tag(ax: Any, x: float, y: float, text: str, color: tuple[int, int, int]) -> None:
    """A filled label above (x, y), or just below it when that would leave the image; moved
    just enough to stay inside the axes (left, for a box at the right edge)."""
    height = abs(ax.get_ylim()[0] - ax.get_ylim()[1])
    tag = _tag_class()(
        x,
        y,
        text,
        fontsize=8,
        color=_text_color(color),
        va="bottom" if y > 0.05 * height else "top",
        clip_on=True,
        bbox={"facecolor": _rgb01(color), "edgecolor": "none", "pad": 1.5, "alpha": 0.85},
    )
    ax.add_artist(tag)
    tag.set_transform(ax.transData + tag.shift)


@functools.cache
def _tag_class() -> type:
    """The tag's Text subclass, made on first use: importing this module imports no matplotlib."""
    from matplotlib.text import Text
    from matplotlib.transforms import Affine2D, Bbox

    class Tag(Text):
        """Text at a shape's corner that, each time it is drawn, moves by the fewest display
        pixels that keep it and its filled tag inside the axes: the label of a box at the right
        edge moves left instead of being cut off. It is measured with the renderer that draws
        it, so it holds after ``tight_layout``, at any dpi and in saved figures; its position
        stays the shape's corner."""

        def __init__(self, x: float, y: float, text: str, **kwargs: Any) -> None:
            super().__init__(x, y, text, **kwargs)
            self.shift = Affine2D()  # display pixels, after the data transform

        def draw(self, renderer: Any) -> None:
            self.shift.clear()
            if renderer is not None and self.axes is not None and self.get_text():
                frame = self.axes.get_window_extent(renderer)
                extent = self.get_window_extent(renderer)
                if self.get_bbox_patch() is not None:
                    self.update_bbox_position_size(renderer)
                    patch = self.get_bbox_patch().get_window_extent(renderer)
                    extent = Bbox.union([extent, patch])
                # A tag wider than the axes keeps its left end in view.
                dx = max(min(0.0, frame.x1 - extent.x1), frame.x0 - extent.x0)
                dy = max(min(0.0, frame.y1 - extent.y1), frame.y0 - extent.y0)
                self.shift.translate(dx, dy)
            super().draw(renderer)

    Tag.__name__ = Tag.__qualname__ = "_Tag"  # pickled figures find it: see __getattr__
    return Tag


def __getattr__(name: str) -> Any:
    """``_Tag``, the tag class, made on first use (as when a pickled figure is loaded)."""
    if name == "_Tag":
        return _tag_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
