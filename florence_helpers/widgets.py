"""An interactive explorer: pick an image and a task, run it, see the drawing and the result."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .images import ImageSource, load_image
from .model import FlorenceModel
from .tasks import TASKS, InputKind, Task, task_spec


def _name(source: ImageSource, index: int) -> str:
    if isinstance(source, (str, Path)):
        return Path(str(source)).name or str(source)
    return f"image {index + 1}"


class Explorer:
    """An ipywidgets panel around :func:`run`.

    The text box shows only for tasks that take text, the four region fields only for
    ``REGION_TO_*`` tasks (they start as the whole image). Errors (a region outside the
    image, missing text) appear in the panel instead of a traceback.

    Attributes:
        image, task, text, region, button, output: The widgets, for scripting or tests.
        result: The last result, or None.
        message: The last error shown in the panel, or "".
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
        except ImportError:
            raise ImportError(
                'explore needs ipywidgets: pip install "florence-helpers[notebooks]" '
                "(Colab already has it)."
            ) from None
        if not images:
            raise ValueError("explore needs at least one image.")
        self.florence = florence
        self.run_kwargs = run_kwargs
        self.images = list(images)
        self.result: Any = None
        self.message = ""
        names = [_name(source, i) for i, source in enumerate(self.images)]
        self.image = widgets.Dropdown(
            options=[(name, i) for i, name in enumerate(names)], description="Image"
        )
        self.task = widgets.Dropdown(
            options=[(spec.name, spec.task) for spec in TASKS.values()],
            value=task_spec(task).task,
            description="Task",
        )
        self.text = widgets.Text(description="Text", placeholder="a phrase or a caption")
        self.region = [
            widgets.FloatText(description=n, layout={"width": "150px"})
            for n in "x1 y1 x2 y2".split()
        ]
        self.region_box = widgets.HBox(self.region)
        self.button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.output = widgets.Output()
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.image, self.task]),
                self.text,
                self.region_box,
                self.button,
                self.output,
            ]
        )
        self.task.observe(lambda _: self._update_inputs(), names="value")
        self.image.observe(lambda _: self._reset_region(), names="value")
        self.button.on_click(lambda _: self.run())
        self._reset_region()
        self._update_inputs()

    def _update_inputs(self) -> None:
        kind = TASKS[self.task.value].input
        self.text.layout.display = None if kind is InputKind.TEXT else "none"
        self.region_box.layout.display = None if kind is InputKind.REGION else "none"

    def _reset_region(self) -> None:
        width, height = load_image(self.images[self.image.value]).size
        for widget, value in zip(self.region, (0, 0, width, height), strict=True):
            widget.value = value

    def run(self) -> Any:
        """Run the selected task on the selected image and show the result in the panel."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        from .inference import run
        from .plotting import plot_result

        spec = TASKS[self.task.value]
        source = self.images[self.image.value]
        text = self.text.value if spec.input is InputKind.TEXT else None
        region = [w.value for w in self.region] if spec.input is InputKind.REGION else None
        self.output.clear_output()
        self.message = ""
        with self.output:
            try:
                self.result = run(
                    self.florence, source, spec, text=text, region=region, **self.run_kwargs
                )
            except ValueError as error:  # every input error of run() is a ValueError
                self.message = f"error: {error}"
                print(self.message)
                return None
            fig, ax = plt.subplots(figsize=(7, 7))
            plot_result(source, self.result, ax, region=region)
            display(fig)
            plt.close(fig)
            payload = self.result.to_dict()
            payload.pop("raw")
            print(json.dumps(payload, ensure_ascii=False)[:2000])
        return self.result

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def explore(florence: FlorenceModel, images: Sequence[ImageSource], **run_kwargs: Any) -> Explorer:
    """Open an interactive panel: choose an image and a task, give text or a region, run.

    Args:
        florence: What :func:`load_model` returned.
        images: The images to choose from (paths show their file names).
        **run_kwargs: Passed to :func:`run` (e.g. ``num_beams=1`` for speed).

    Returns:
        The :class:`Explorer`; it displays itself as the last expression of a cell.

    Example:
        >>> explore(florence, sorted(Path("images").glob("*.jpg")))  # doctest: +SKIP
    """
    return Explorer(florence, images, **run_kwargs)
