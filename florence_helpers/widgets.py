"""An interactive explorer: pick an image and a task, draw a region, run, read the result.

:func:`explore` opens a panel built from ipywidgets and jupyter-bbox-widget (the ``explore``
extra: ``pip install "florence-helpers[explore]"``). The chosen image is
shown at once; for ``REGION_TO_*`` tasks you draw the region on it with the mouse (or type the
corners). While a task runs, the Run button is disabled and the panel shows the elapsed time;
changing any input clears the result that no longer matches it. Mistakes (no text for a task
that needs some, a region off the image, an unreadable file) are shown in the panel as errors.
"""

from __future__ import annotations

import html
import io
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .boundary.images import ImageSource, load_image
from .drawing.summaries import readable_json, summarize
from .language.tasks import TASKS, InputKind, Task, TaskSpec, task_spec
from .model.loading import FlorenceModel

_REGION_LABEL = "region"
_INSTALL_HINT = 'pip install "florence-helpers[explore]"'


# What each text task wants in the Text box, said to someone looking at the panel.
_TEXT_PROMPTS = {
    Task.CAPTION_TO_PHRASE_GROUNDING: "Type a caption in the Text box (its phrases get boxes).",
    Task.OPEN_VOCABULARY_DETECTION: "Type what to look for in the Text box, e.g. 'a red car'.",
    Task.REFERRING_EXPRESSION_SEGMENTATION: "Type a phrase in the Text box, e.g. 'the cat'.",
}


_STYLE = """<style>
.florence-explorer-busy::before { content: ""; display: inline-block; width: 0.9em;
  height: 0.9em; margin-right: 0.5em; vertical-align: -0.1em; border: 2px solid #90caf9;
  border-top-color: #1565c0; border-radius: 50%;
  animation: florence-explorer-spin 0.8s linear infinite; }
@keyframes florence-explorer-spin { to { transform: rotate(360deg); } }
.florence-explorer-error { color: #b71c1c; background: #ffebee; border-left: 4px solid #c62828;
  padding: 4px 8px; }
.florence-explorer-hint, .florence-explorer-stale { color: #555; }
.florence-explorer-canvas .classes { display: none; }
.florence-explorer-json { max-height: 24em; overflow: auto; white-space: pre-wrap;
  font-size: 12px; margin: 0; }
</style>"""


def _name(source: ImageSource, index: int) -> str:
    if isinstance(source, (str, Path)):
        return Path(str(source)).name or str(source)
    return f"image {index + 1}"


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _box_corners(box: Any) -> tuple[float, float, float, float] | None:
    """A drawn box's corners (x1, y1, x2, y2), or None unless it holds four finite numbers."""
    try:
        x, y = float(box["x"]), float(box["y"])
        corners = (x, y, x + float(box["width"]), y + float(box["height"]))
    except (KeyError, TypeError, ValueError):
        return None
    return corners if all(math.isfinite(value) for value in corners) else None


def _status(kind: str, text: str) -> str:
    """Status line HTML: kind is "busy", "done", "error", "stale" or "hint"."""
    return f'<div class="florence-explorer-{kind}">{html.escape(text)}</div>'


class _Ticker:
    """Calls ``tick(elapsed_seconds)`` every ``interval`` seconds in a thread until stopped."""

    def __init__(self, tick: Callable[[float], None], interval: float = 0.5) -> None:
        self._tick = tick
        self._interval = interval
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._tick(self.elapsed)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.elapsed


class Explorer:
    """An ipywidgets panel around :func:`run`.

    The text box shows only for tasks that take text (Enter runs), the region fields and drawing
    only for ``REGION_TO_*`` tasks; the region starts empty (drag a box on the image, or type
    its corners) and the drawn box and the corner fields follow each other. Every change of
    input clears a result that no longer matches it.

    Attributes:
        image, task, text, region, canvas, button: The input widgets (``canvas`` is the
            jupyter-bbox-widget showing the chosen image), for scripting or tests.
        status, drawing, summary, details: The output widgets: a status line (busy, error,
            time taken), the drawn result, a summary, and the raw JSON folded away.
        result: The result shown, or None.
        message: The error shown in the panel, or "".
        busy: Whether a run is in progress (clicks on Run are ignored meanwhile).
    """

    def __init__(
        self,
        florence: FlorenceModel,
        images: Sequence[ImageSource],
        *,
        task: str | Task = Task.CAPTION,
        **run_kwargs: Any,
    ) -> None:
        try:
            import ipywidgets as widgets
            from jupyter_bbox_widget import BBoxWidget
        except ImportError as error:
            raise ImportError(
                f"explore needs ipywidgets and jupyter-bbox-widget ({error.name} is missing): "
                f"{_INSTALL_HINT}."
            ) from None
        if not images:
            raise ValueError("explore needs at least one image.")
        self.florence = florence
        self.run_kwargs = run_kwargs
        self.images = list(images)
        self.result: Any = None
        self.message = ""
        self.busy = False
        self._syncing = False
        self._size: tuple[int, int] | None = None
        self._build_inputs(widgets, BBoxWidget, task)
        self._build_outputs(widgets)
        self._lay_out(widgets)
        self._connect()
        self._show_image()
        self._task_changed()

    def _build_inputs(self, widgets: Any, bbox_widget: Any, task: str | Task) -> None:
        """The image and task choosers, the text box, the region fields and drawing canvas."""
        wide = {"width": "560px"}
        label_width = {"description_width": "48px"}

        names = [_name(source, i) for i, source in enumerate(self.images)]
        self.image = widgets.Dropdown(
            options=[(name, i) for i, name in enumerate(names)],
            description="Image",
            layout=wide,
            style=label_width,
        )
        self.task = widgets.Dropdown(
            options=[(f"{spec.name}: {spec.description}", spec.task) for spec in TASKS.values()],
            value=task_spec(task).task,
            description="Task",
            layout=wide,
            style=label_width,
        )
        self.text = widgets.Text(
            description="Text",
            placeholder="type here, then press Enter or Run",
            layout=wide,
            style=label_width,
        )
        self.region = [
            widgets.FloatText(description=n, layout={"width": "136px"}, style=label_width)
            for n in "x1 y1 x2 y2".split()
        ]
        self.region_hint = widgets.HTML(
            _status("hint", "Drag on the image to draw the region, or type its corners (pixels).")
        )
        self.region_box = widgets.VBox([self.region_hint, widgets.HBox(self.region)])
        self.canvas = bbox_widget(
            classes=[_REGION_LABEL],
            label=_REGION_LABEL,
            hide_buttons=True,
            view_only=True,
            layout={"width": "560px"},
        )

    def _build_outputs(self, widgets: Any) -> None:
        """The Run button, the status line, the drawing, the summary and the folded JSON."""
        self.button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.status = widgets.HTML()
        self.drawing = widgets.Image(format="png", layout={"width": "560px", "display": "none"})
        self.summary = widgets.HTML()
        self.raw_json = widgets.HTML()
        self.details = widgets.Accordion(children=[self.raw_json], titles=("Result as JSON",))
        self.details.selected_index = None
        self.details.layout.display = "none"

    def _lay_out(self, widgets: Any) -> None:
        """The panel: inputs above, Run and the status, then what came back."""
        self.widget = widgets.VBox(
            [
                widgets.HTML(_STYLE),
                self.image,
                self.task,
                self.text,
                self.region_box,
                self.canvas,
                widgets.HBox([self.button, self.status]),
                self.drawing,
                self.summary,
                self.details,
            ],
            layout={"width": "600px"},
        )
        self.widget.add_class("florence-explorer")
        for widget, name in [
            (self.canvas, "canvas"),
            (self.region_box, "region"),
            (self.drawing, "drawing"),
            (self.summary, "summary"),
        ]:
            widget.add_class(f"florence-explorer-{name}")

    def _connect(self) -> None:
        """Every input change clears a stale result; Enter and Run run."""
        self.image.observe(lambda _: self._show_image(), names="value")
        self.task.observe(lambda _: self._task_changed(), names="value")
        self.text.observe(lambda _: self._clear_result(), names="value")
        for field in self.region:
            field.observe(lambda _: self._region_typed(), names="value")
        self.canvas.observe(lambda _: self._region_drawn(), names="bboxes")
        self.text.on_msg(self._text_message)
        self.button.on_click(lambda _: self.run())

    # Inputs ------------------------------------------------------------------------------

    @property
    def spec(self) -> TaskSpec:
        """The selected task."""
        return TASKS[self.task.value]

    def _task_changed(self) -> None:
        kind = self.spec.input
        self.text.layout.display = None if kind is InputKind.TEXT else "none"
        self.region_box.layout.display = None if kind is InputKind.REGION else "none"
        self.canvas.view_only = kind is not InputKind.REGION
        self._sync_canvas()
        self._clear_result()

    def _show_image(self) -> None:
        """Show the chosen image at once, with no region drawn on it yet."""
        self._clear_result()
        self._set_region((0, 0, 0, 0))
        try:
            picture = load_image(self.images[self.image.value])
        except ValueError as error:  # ImageLoadError: missing, unreadable, not an image
            self._size = None
            self.canvas.image_bytes = b""
            self._error(str(error))
            return
        self._size = picture.size
        self.canvas.image_bytes = _png(picture)

    def _set_region(self, box: Sequence[float], *, draw: bool = True) -> None:
        """Put ``box`` in the corner fields and, unless it came from the drawing, draw it."""
        self._syncing = True
        try:
            for field, value in zip(self.region, box, strict=True):
                field.value = float(value)
        finally:
            self._syncing = False
        if draw:
            self._sync_canvas()

    def _sync_canvas(self) -> None:
        """Draw the typed region on the image (region tasks only, once it is a box)."""
        x1, y1, x2, y2 = (field.value for field in self.region)
        wanted = []
        if self.spec.input is InputKind.REGION and self._size is not None and x1 < x2 and y1 < y2:
            box = {"x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1}
            wanted = [{**box, "label": _REGION_LABEL}]
        if self.canvas.bboxes != wanted:
            self._syncing = True
            try:
                self.canvas.bboxes = wanted
            finally:
                self._syncing = False

    def _region_typed(self) -> None:
        if self._syncing:
            return
        self._clear_result()
        self._sync_canvas()

    def _region_drawn(self) -> None:
        """Keep one box (the newest), inside the image, and copy its corners into the fields."""
        if self._syncing:
            return
        boxes = self.canvas.bboxes
        self._clear_result()
        if not boxes or self._size is None:  # deleted on the image
            self._set_region((0, 0, 0, 0), draw=False)
            return
        corners = _box_corners(boxes[-1])
        if corners is None:  # not four finite numbers: keep the fields as they are
            return
        width, height = self._size
        x1, y1, x2, y2 = corners
        x1, x2 = sorted(round(min(max(x, 0.0), width)) for x in (x1, x2))
        y1, y2 = sorted(round(min(max(y, 0.0), height)) for y in (y1, y2))
        # While the mouse is still down the box may have no size yet: leave the drawing alone.
        self._set_region((x1, y1, x2, y2), draw=len(boxes) > 1 or (x1 < x2 and y1 < y2))

    def _text_message(self, _widget: Any, content: dict[str, Any], _buffers: Any) -> None:
        if content.get("event") == "submit":  # Enter in the text box
            self.run()

    def _check_inputs(self) -> str:
        """What is wrong with the inputs, worded for the panel; "" when nothing is."""
        spec = self.spec
        if self._size is None:
            return ""  # run() names the unreadable image
        if spec.input is InputKind.TEXT and not self.text.value.strip():
            return _TEXT_PROMPTS.get(spec.task, "Type a phrase in the Text box.")
        if spec.input is InputKind.REGION:
            from .language.regions import RegionError, check_box

            x1, y1, x2, y2 = (field.value for field in self.region)
            if not (x1 < x2 and y1 < y2):
                return "Draw the region on the image (drag with the mouse), or type its corners."
            try:
                check_box([field.value for field in self.region], self._size)
            except RegionError as error:
                return f"Draw the region on the image or correct its corners. {error}"
        return ""

    # Outputs -----------------------------------------------------------------------------

    def _clear_result(self) -> None:
        had_result = self.result is not None
        self.result = None
        self.message = ""
        self.drawing.layout.display = "none"
        self.drawing.value = b""
        self.summary.value = ""
        self.raw_json.value = ""
        self.details.layout.display = "none"
        if had_result:
            self.status.value = _status("stale", "Inputs changed: press Run for a new result.")
        elif not self.busy:
            self.status.value = ""

    def _error(self, message: str) -> None:
        self.message = message
        self.status.value = _status("error", message)

    def _show_result(self, source: ImageSource, result: Any, region: Any, seconds: float) -> None:
        import matplotlib.pyplot as plt

        from .drawing.plotting import plot_result

        fig, ax = plt.subplots(figsize=(7, 7))
        try:
            plot_result(source, result, ax, region=region)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", bbox_inches="tight", dpi=80)
        finally:
            plt.close(fig)
        self.result = result
        self.drawing.value = buffer.getvalue()
        self.drawing.layout.display = None
        self.summary.value = summarize(result)
        payload = readable_json(result.to_dict())
        self.raw_json.value = f'<pre class="florence-explorer-json">{html.escape(payload)}</pre>'
        self.details.layout.display = None
        self.status.value = _status("done", f"{self.spec.name} took {seconds:.1f} s.")

    # Running -----------------------------------------------------------------------------

    def run(self) -> Any:
        """Run the selected task on the selected image and show the result in the panel.

        Returns:
            The result, or None when the inputs were wrong (the panel says why) or a run is
            already in progress.
        """
        if self.busy:
            return None
        from .model.inference import run

        spec = self.spec
        self.result = None
        self._clear_result()
        problem = self._check_inputs()
        if problem:
            self._error(problem)
            return None
        source = self.images[self.image.value]
        text = self.text.value.strip() if spec.input is InputKind.TEXT else None
        region = [field.value for field in self.region] if spec.input is InputKind.REGION else None
        doing = f"Running {spec.name} on {self.image.label}…"
        self.busy = True
        self.button.disabled = True
        self.status.value = _status("busy", doing)
        ticker = _Ticker(
            lambda s: setattr(self.status, "value", _status("busy", f"{doing} {s:.0f} s"))
        )
        failure = ""
        try:
            result = run(self.florence, source, spec, text=text, region=region, **self.run_kwargs)
        except ValueError as error:  # every input error of run() is a ValueError
            failure = str(error)
        finally:
            seconds = ticker.stop()
            self.busy = False
            self.button.disabled = False
        if failure:
            self._error(failure)
            return None
        self._show_result(source, result, region, seconds)
        return result

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _enable_colab_widgets() -> None:
    """Colab shows the widgets of other packages (the box drawing) only once this is enabled."""
    import sys

    if "google.colab" in sys.modules:
        from google.colab import output  # type: ignore[import-not-found]

        output.enable_custom_widget_manager()


def explore(florence: FlorenceModel, images: Sequence[ImageSource], **run_kwargs: Any) -> Explorer:
    """Open an interactive panel: choose an image and a task, give text or draw a region, run.

    Args:
        florence: What :func:`load_model` returned.
        images: The images to choose from (paths show their file names).
        **run_kwargs: Passed to :func:`run` (e.g. ``num_beams=1`` for speed).

    Returns:
        The :class:`Explorer`; it displays itself as the last expression of a cell.

    Example:
        >>> explore(florence, sorted(Path("images").glob("*.jpg")))  # doctest: +SKIP
    """
    panel = Explorer(florence, images, **run_kwargs)
    _enable_colab_widgets()
    return panel
