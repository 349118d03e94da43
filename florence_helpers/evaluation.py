"""Detection quality against labelled boxes: COCO mAP (pycocotools) and precision/recall."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .results import BoxesResult

_AGNOSTIC = "object"


@dataclass
class DetectionEvaluation:
    """COCO metrics for a set of detections, and every detection's match at IoU 0.5.

    Attributes:
        map: mAP averaged over IoU 0.50:0.95 (COCO's main number), or NaN without boxes.
        map50: mAP at IoU 0.50.
        constant_scores: True when some result had no scores and every box was given 1.0:
            then the ranking is just the order the model wrote its boxes, and mAP says little.
        scores: Score of each detection.
        matched: Whether each detection matched a labelled box at IoU 0.5.
        num_ground_truth: Labelled boxes evaluated.
    """

    map: float
    map50: float
    constant_scores: bool
    scores: np.ndarray
    matched: np.ndarray
    num_ground_truth: int

    def precision_recall(self, thresholds: Any) -> tuple[np.ndarray, np.ndarray]:
        """Precision and recall at IoU 0.5 when keeping detections with score >= threshold.

        Precision is 1.0 where no detection is kept.

        Example:
            >>> evaluation.precision_recall([0.3, 0.5, 0.7])  # doctest: +SKIP
        """
        thresholds = np.atleast_1d(np.asarray(thresholds, dtype=float))
        kept = self.scores[None, :] >= thresholds[:, None]
        true = (kept & self.matched[None, :]).sum(axis=1)
        count = kept.sum(axis=1)
        precision = np.where(count > 0, true / np.maximum(count, 1), 1.0)
        recall = true / max(self.num_ground_truth, 1)
        return precision, recall


def evaluate_detections(
    ground_truth: str | Path | Mapping[str, Any],
    predictions: Mapping[str, BoxesResult],
    *,
    class_agnostic: bool = False,
) -> DetectionEvaluation:
    """Score detections against COCO-format labelled boxes with pycocotools.

    Args:
        ground_truth: A COCO dataset (path or dict with ``images``, ``categories``,
            ``annotations``).
        predictions: A boxes result per image, keyed by the image's ``file_name``. Only these
            images are evaluated; give an empty result for an image where nothing was found.
        class_agnostic: Ignore labels: any box may match any labelled box. Florence-2 writes
            free-form labels ("coffee cup" for "cup"), so this shows localisation quality
            alone. Otherwise a label must equal a category name exactly; boxes with other
            labels match nothing.

    Returns:
        A :class:`DetectionEvaluation`. When a result has no scores, all boxes get 1.0, a
        warning says so, and ``constant_scores`` is True.

    Example:
        >>> preds = {p.name: run(florence, p, "OD", scores=True) for p in paths}  # doctest: +SKIP
        >>> evaluate_detections("images/annotations.json", preds).map50  # doctest: +SKIP
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not isinstance(ground_truth, Mapping):
        ground_truth = json.loads(Path(ground_truth).read_text())
    dataset = copy.deepcopy(dict(ground_truth))
    dataset.setdefault("info", {})
    if class_agnostic:
        dataset["categories"] = [{"id": 1, "name": _AGNOSTIC}]
        for annotation in dataset["annotations"]:
            annotation["category_id"] = 1
    by_name = {c["name"]: c["id"] for c in dataset["categories"]}
    image_ids = {image["file_name"]: image["id"] for image in dataset["images"]}
    unknown = sorted(set(predictions) - set(image_ids))
    if unknown:
        raise KeyError(f"Predictions for images not in the ground truth: {', '.join(unknown)}")

    constant = any(result.scores is None for result in predictions.values())
    if constant:
        warnings.warn(
            "Some results have no scores: mAP is computed with every score set to 1.0, so the "
            "ranking is the order the model wrote its boxes. Run with scores=True for real "
            "confidences.",
            stacklevel=2,
        )
    detections = []
    for file_name, result in predictions.items():
        scores = np.ones(len(result)) if constant else np.asarray(result.scores, dtype=float)
        for box, label, score in zip(result.boxes.tolist(), result.labels, scores, strict=True):
            category = 1 if class_agnostic else by_name.get(label)
            if category is None:
                continue  # a label the dataset does not have: it can match nothing
            x1, y1, x2, y2 = box
            detections.append(
                {
                    "image_id": image_ids[file_name],
                    "category_id": category,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
        if not detections:
            evaluated = {image_ids[name] for name in predictions}
            labelled = sum(
                1
                for a in dataset["annotations"]
                if a["image_id"] in evaluated and not a.get("iscrowd", 0)
            )
            nothing = float("nan") if labelled == 0 else 0.0
            return DetectionEvaluation(
                nothing, nothing, constant, np.zeros(0), np.zeros(0, bool), labelled
            )
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.params.imgIds = sorted(image_ids[name] for name in predictions)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    scores, matched, num_gt = _matches_at_iou50(evaluator)
    return DetectionEvaluation(
        map=float(evaluator.stats[0]),
        map50=float(evaluator.stats[1]),
        constant_scores=constant,
        scores=scores,
        matched=matched,
        num_ground_truth=num_gt,
    )


def _matches_at_iou50(evaluator: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Each detection's score and whether pycocotools matched it at IoU 0.5 (all areas)."""
    iou = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    all_areas = evaluator.params.areaRngLbl.index("all")
    scores, matched, num_gt = [], [], 0
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != evaluator.params.areaRng[all_areas]:
            continue
        ignore = np.asarray(entry["dtIgnore"][iou], dtype=bool)
        scores += list(np.asarray(entry["dtScores"])[~ignore])
        matched += list((np.asarray(entry["dtMatches"][iou]) > 0)[~ignore])
        num_gt += int((~np.asarray(entry["gtIgnore"], dtype=bool)).sum())
    return np.asarray(scores, dtype=float), np.asarray(matched, dtype=bool), num_gt
