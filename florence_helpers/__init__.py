"""Helpers for Microsoft's Florence-2 on native transformers: load, run, parse, draw.

What is exported here: what a notebook or script needs to load a model, run tasks, read and
select results, draw them and convert them (COCO, masks, supervision, box formats). Whole
workflows with their own vocabulary come from their subpackages: ``florence_helpers.training``
(datasets, LoRA adapters, ``train``, ``evaluate_samples``), ``florence_helpers.masks``
(SAM 2 masks from Florence-2's boxes: ``load_sam``, ``segment``), ``florence_helpers.labelling``
(``label``, ``read_labels``, Ray Data), ``florence_helpers.serve`` (HTTP and MCP),
``florence_helpers.widgets`` (``explore``); the offline test model is in
``florence_helpers.testing``. ``__all__`` is sorted: constants, classes, then functions.

The package is in layers, each a subpackage that imports only those below it: ``language``
(tasks, prompts, the answer grammar, results) and ``boundary`` (the one way in and out),
``drawing``, ``model``, ``training`` and ``masks``, then the applications (``labelling``,
``serve``) and the top (``cli``, ``widgets``, ``testing``). Each subpackage's docstring says
what it holds.

Example:
    >>> from florence_helpers import load_model, run, plot_result
    >>> florence = load_model()  # doctest: +SKIP
    >>> result = run(florence, "images/astronaut.jpg", "OD")  # doctest: +SKIP
    >>> plot_result("images/astronaut.jpg", result)  # doctest: +SKIP
"""

from .boundary.images import ImageLoadError, load_image
from .drawing.conversions import (
    coco_categories,
    cutout,
    from_coco,
    polygons_to_mask,
    to_coco,
    to_mask,
    to_masks,
    to_supervision,
)
from .drawing.plotting import (
    annotate,
    label_color,
    plot_boxes,
    plot_grid,
    plot_ocr,
    plot_polygons,
    plot_region,
    plot_result,
)
from .language.ocr import reading_order, to_lines
from .language.prompts import TaskInputError, build_prompt
from .language.regions import (
    RegionError,
    box_to_loc_tokens,
    dequantize,
    loc_tokens_to_box,
    quantize,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from .language.results import (
    BoxesResult,
    OCRResult,
    PolygonsResult,
    Result,
    TextResult,
    parse_answer,
)
from .language.tasks import (
    TASKS,
    InputKind,
    ResultKind,
    Task,
    TaskSpec,
    UnknownTaskError,
    custom_task,
    task_spec,
)
from .model.detection import detect
from .model.inference import run, run_tasks
from .model.loading import (
    CHECKPOINTS,
    DEFAULT_MODEL_ID,
    FlorenceModel,
    ModelNotAvailableError,
    load_model,
)
from .model.scores import filter_by_score, sort_by_score, top_k
from .model.tiling import tiled_ocr
from .training.evaluation import DetectionEvaluation, evaluate_detections

__all__ = [
    "CHECKPOINTS",
    "DEFAULT_MODEL_ID",
    "TASKS",
    "BoxesResult",
    "DetectionEvaluation",
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
    "annotate",
    "box_to_loc_tokens",
    "build_prompt",
    "coco_categories",
    "custom_task",
    "cutout",
    "dequantize",
    "detect",
    "evaluate_detections",
    "filter_by_score",
    "from_coco",
    "label_color",
    "load_image",
    "load_model",
    "loc_tokens_to_box",
    "parse_answer",
    "plot_boxes",
    "plot_grid",
    "plot_ocr",
    "plot_polygons",
    "plot_region",
    "plot_result",
    "polygons_to_mask",
    "quantize",
    "reading_order",
    "run",
    "run_tasks",
    "sort_by_score",
    "task_spec",
    "tiled_ocr",
    "to_coco",
    "to_lines",
    "to_mask",
    "to_masks",
    "to_supervision",
    "top_k",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
