"""Fine-tuning: labelled data read into prompts and targets, LoRA adapters, the training loop
and evaluation.

``samples`` (``TrainingSample``, ``TrainingSet``, targets in Florence-2's grammar), ``records``
(the checks every record from a file passes), ``coco``, ``grounding`` (ms-swift) and ``qa``
(the three readers), ``config`` (``TrainingConfig``, ``TrainingHistory``), ``steps`` (one
optimisation step, caching, checkpoints; ``resume_checks``: a checkpoint's states checked
before they load), ``finetune`` (``train``, ``collate``,
``validation_loss``), ``evaluation`` (mAP, exact match, ANLS), ``sample_data`` (generated
datasets for the notebooks). The adapter functions live in ``florence_helpers.model.adapters``
and are re-exported here, where a training script looks for them.

Layer 3: may import ``language``, ``boundary``, ``drawing`` and ``model``.

Example:
    >>> from florence_helpers.training import TrainingConfig, add_lora, read_coco, train
"""

from ..model.adapters import (
    LORA_TARGET_MODULES,
    AdapterError,
    adapter_fingerprint,
    add_lora,
    load_adapter,
    merge_adapter,
    save_adapter,
    save_model,
    trainable_parameters,
)
from .batches import collate, freeze_vision_tower, target_labels
from .coco import read_coco
from .config import TrainingConfig, TrainingHistory
from .evaluation import (
    DetectionEvaluation,
    SampleEvaluation,
    anls,
    character_error_rate,
    evaluate_detections,
    evaluate_samples,
    exact_match,
)
from .finetune import train, validation_loss
from .grounding import read_grounding_jsonl
from .qa import DOCVQA, read_qa
from .sample_data import make_receipts, make_shapes_dataset
from .samples import (
    AnnotationError,
    AnnotationProblem,
    TrainingSample,
    TrainingSet,
    detection_target,
    grounding_target,
)

__all__ = [
    "DOCVQA",
    "LORA_TARGET_MODULES",
    "AdapterError",
    "AnnotationError",
    "AnnotationProblem",
    "DetectionEvaluation",
    "SampleEvaluation",
    "TrainingConfig",
    "TrainingHistory",
    "TrainingSample",
    "TrainingSet",
    "adapter_fingerprint",
    "add_lora",
    "anls",
    "character_error_rate",
    "collate",
    "detection_target",
    "evaluate_detections",
    "evaluate_samples",
    "exact_match",
    "freeze_vision_tower",
    "grounding_target",
    "load_adapter",
    "make_receipts",
    "make_shapes_dataset",
    "merge_adapter",
    "read_coco",
    "read_grounding_jsonl",
    "read_qa",
    "save_adapter",
    "save_model",
    "target_labels",
    "train",
    "trainable_parameters",
    "validation_loss",
]
