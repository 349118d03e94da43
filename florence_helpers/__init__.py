"""Helpers for Microsoft's Florence-2 on native transformers: load, run, parse, draw.

What is exported here: what a notebook or script needs to load a model, run tasks, read and
select results, draw them and convert them (COCO, masks, supervision, box formats). Whole
workflows with their own vocabulary are imported from their modules: ``finetune``,
``adapters``, ``training_data``, ``evaluation.evaluate_samples``, ``labelling``,
``ray_labelling``, ``widgets``; so are internals (``decoding``, ``prefetch``) and the offline
test model (``testing``). ``__all__`` is sorted: constants, classes, then functions.

Example:
    >>> from florence_helpers import load_model, run, plot_result
    >>> florence = load_model()  # doctest: +SKIP
    >>> result = run(florence, "images/astronaut.jpg", "OD")  # doctest: +SKIP
    >>> plot_result("images/astronaut.jpg", result)  # doctest: +SKIP
"""

from .conversions import (
    coco_categories,
    cutout,
    from_coco,
    polygons_to_mask,
    to_coco,
    to_mask,
    to_masks,
    to_supervision,
)
from .detection import detect
from .evaluation import DetectionEvaluation, evaluate_detections
from .images import ImageLoadError, load_image
from .inference import run, run_tasks
from .model import (
    CHECKPOINTS,
    DEFAULT_MODEL_ID,
    FlorenceModel,
    ModelNotAvailableError,
    load_model,
)
from .ocr import reading_order, to_lines
from .plotting import (
    annotate,
    label_color,
    plot_boxes,
    plot_grid,
    plot_ocr,
    plot_polygons,
    plot_region,
    plot_result,
)
from .prompts import TaskInputError, build_prompt
from .regions import (
    RegionError,
    box_to_loc_tokens,
    dequantize,
    loc_tokens_to_box,
    quantize,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from .results import BoxesResult, OCRResult, PolygonsResult, Result, TextResult, parse_answer
from .scores import filter_by_score, sort_by_score, top_k
from .tasks import (
    TASKS,
    InputKind,
    ResultKind,
    Task,
    TaskSpec,
    UnknownTaskError,
    custom_task,
    task_spec,
)
from .tiling import tiled_ocr

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
