"""Helpers for Microsoft's Florence-2 on native transformers: load, run, parse, draw.

Example:
    >>> from florence_helpers import load_model, run, plot_result
    >>> florence = load_model()  # doctest: +SKIP
    >>> result = run(florence, "images/astronaut.jpg", "OD")  # doctest: +SKIP
    >>> plot_result("images/astronaut.jpg", result)  # doctest: +SKIP
"""

from .images import ImageLoadError, load_image
from .inference import run
from .model import (
    CHECKPOINTS,
    DEFAULT_MODEL_ID,
    FlorenceModel,
    ModelNotAvailableError,
    load_model,
)
from .plotting import annotate, label_color, plot_result
from .prompts import TaskInputError, build_prompt
from .regions import RegionError, box_to_loc_tokens, dequantize, loc_tokens_to_box, quantize
from .results import BoxesResult, OCRResult, PolygonsResult, Result, TextResult, parse_answer
from .tasks import TASKS, InputKind, ResultKind, Task, TaskSpec, UnknownTaskError, get_task

__all__ = [
    "CHECKPOINTS",
    "DEFAULT_MODEL_ID",
    "TASKS",
    "BoxesResult",
    "FlorenceModel",
    "ImageLoadError",
    "InputKind",
    "ModelNotAvailableError",
    "OCRResult",
    "PolygonsResult",
    "RegionError",
    "Result",
    "ResultKind",
    "Task",
    "TaskInputError",
    "TaskSpec",
    "TextResult",
    "UnknownTaskError",
    "box_to_loc_tokens",
    "annotate",
    "build_prompt",
    "dequantize",
    "get_task",
    "label_color",
    "load_image",
    "load_model",
    "loc_tokens_to_box",
    "parse_answer",
    "plot_result",
    "quantize",
    "run",
]
