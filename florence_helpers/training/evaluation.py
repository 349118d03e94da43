"""Answer quality against labels: COCO mAP (pycocotools) and precision/recall for boxes; exact
match, ANLS and character error rate (rapidfuzz's Levenshtein distance) for text.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..drawing.conversions import coco_categories
from ..language.regions import LOC_TOKEN, box_iou, xyxy_to_xywh
from ..language.results import BoxesResult
from ..language.tasks import ResultKind, Task, task_spec
from .records import _id_error, _is_id, _numbers, _shown
from .samples import _BadAnnotation

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

        Precision is NaN where no detection is kept (0 of 0: undefined, and left out of a
        plot rather than drawn as a perfect 1.0).

        Example:
            >>> evaluation.precision_recall([0.3, 0.5, 0.7])  # doctest: +SKIP
        """
        thresholds = np.atleast_1d(np.asarray(thresholds, dtype=float))
        kept = self.scores[None, :] >= thresholds[:, None]
        true = (kept & self.matched[None, :]).sum(axis=1)
        count = kept.sum(axis=1)
        precision = np.where(count > 0, true / np.maximum(count, 1), np.nan)
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

    dataset = _copy_of_dataset(ground_truth, class_agnostic)
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
    detections = _coco_detections(predictions, dataset, image_ids, constant, class_agnostic)

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


def _copy_of_dataset(ground_truth: str | Path | Mapping[str, Any], class_agnostic: bool) -> dict:
    """A private copy of the COCO dataset, checked (see :func:`_check_ground_truth`), with one
    category for all when class-agnostic."""
    from .coco import _coco_file  # reads a file as read_coco does: bounded, UTF-8 JSON

    ground_truth, source, _ = _coco_file(ground_truth, None)
    _check_ground_truth(ground_truth, source)
    dataset = copy.deepcopy(dict(ground_truth))
    dataset.setdefault("info", {})
    if class_agnostic:
        dataset["categories"] = [{"id": 1, "name": _AGNOSTIC}]
        for annotation in dataset["annotations"]:
            annotation["category_id"] = 1
    return dataset


MAX_BOXES_PER_IMAGE = 5000
"""Ground-truth boxes one image may hold (COCO's images hold at most a few hundred)."""


def _check_ground_truth(dataset: Mapping[str, Any], source: str) -> None:
    """Refuse what pycocotools would fail on deep inside, or score wrongly without a word:
    entries that are not objects, ids that are not ids, two images sharing an id or a file
    name, a box that is not four finite numbers.

    Raises:
        ValueError: Naming the file (or "COCO data"), the entry and what is wrong.
    """
    problems = []
    ids: set[Any] = set()
    names: set[Any] = set()
    for number, image in enumerate(dataset["images"]):
        if not isinstance(image, Mapping) or not _is_id(image.get("id")):
            problems.append(f"image #{number} is not an object with an id")
        elif not isinstance(image.get("file_name"), str):
            problems.append(f"image {_shown(image['id'])} has no file_name")
        elif image["id"] in ids or image["file_name"] in names:
            problems.append(f"two images share the id {_shown(image['id'])} or the file name "
                            f"{_shown(image['file_name'])}")  # fmt: skip
        else:
            ids.add(image["id"])
            names.add(image["file_name"])
    for number, category in enumerate(dataset["categories"]):
        if not isinstance(category, Mapping) or not _is_id(category.get("id")):
            problems.append(f"category #{number} is not an object with an id")
        elif not isinstance(category.get("name"), str):
            problems.append(f"category {_shown(category['id'])} has no name")
    per_image: dict[Any, int] = {}
    for number, annotation in enumerate(dataset["annotations"]):
        where = f"annotation #{number}"
        try:
            if not isinstance(annotation, Mapping):
                raise _BadAnnotation("not an object")
            if annotation.get("image_id") not in ids:
                raise _BadAnnotation(f"unknown image_id {_shown(annotation.get('image_id'))}")
            count = per_image[annotation["image_id"]] = per_image.get(annotation["image_id"], 0) + 1
            if count == MAX_BOXES_PER_IMAGE + 1:
                raise _BadAnnotation(
                    f"image {_shown(annotation['image_id'])} has more than "
                    f"{MAX_BOXES_PER_IMAGE:,} boxes, which pycocotools scores in Python against "
                    "every detection (20,000 took 34 s); split the image or sample its boxes"
                )
            if not _is_id(annotation.get("category_id")):
                raise _BadAnnotation(_id_error("category_id", annotation.get("category_id")))
            _numbers(annotation.get("bbox"), "its bbox", "[x, y, width, height]")
        except _BadAnnotation as error:
            problems.append(f"{where}: {error}")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(f"{source} is not a usable COCO ground truth: {problems[0]}{more}.")


def _coco_detections(
    predictions: Mapping[str, BoxesResult],
    dataset: Mapping[str, Any],
    image_ids: Mapping[str, int],
    constant: bool,
    class_agnostic: bool,
) -> list[dict[str, Any]]:
    """The predicted boxes as COCO results; a label the dataset lacks matches nothing."""
    by_name = {c["name"]: c["id"] for c in dataset["categories"]}
    detections = []
    for file_name, result in predictions.items():
        scores = np.ones(len(result)) if constant else np.asarray(result.scores, dtype=float)
        for box, label, score in zip(result.boxes.tolist(), result.labels, scores, strict=True):
            category = 1 if class_agnostic else by_name.get(label)
            if category is not None:
                detections.append(
                    {
                        "image_id": image_ids[file_name],
                        "category_id": category,
                        "bbox": xyxy_to_xywh(box),
                        "score": float(score),
                    }
                )
    return detections


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


@dataclass
class SampleEvaluation:
    """How well a model answers labelled samples (see :func:`evaluate_samples`).

    Attributes:
        map: COCO mAP@[.50:.95] over the samples with boxes (``OD`` and grounding); NaN if none.
        map50: mAP at IoU 0.50.
        constant_scores: True if mAP had to use a score of 1.0 for every box.
        grounding_accuracy: Share of grounding samples whose first box overlaps a labelled box
            with IoU >= 0.5 (the RefCOCO measure); NaN if none.
        region_accuracy: Share of ``REGION_TO_CATEGORY`` samples answered with their label
            (ignoring case and location tokens); NaN if none.
        exact_match: Share of text samples (questions, captions, OCR) answered exactly with
            one of their accepted answers (see :func:`exact_match`); NaN if none.
        anls: Mean ANLS over the text samples, DocVQA's measure (see :func:`anls`).
        cer: Mean character error rate of the text samples against their first answer.
        results: The model's result for each sample, in order.
    """

    map: float
    map50: float
    constant_scores: bool
    grounding_accuracy: float
    region_accuracy: float
    results: list[Any]
    exact_match: float = float("nan")
    anls: float = float("nan")
    cer: float = float("nan")

    def summary(self) -> dict[str, float]:
        """The metrics by name, for tables; those no sample measured are left out."""
        metrics = {
            "mAP@[.5:.95]": self.map,
            "mAP@.5": self.map50,
            "grounding acc@.5": self.grounding_accuracy,
            "region accuracy": self.region_accuracy,
            "exact match": self.exact_match,
            "ANLS": self.anls,
            "CER": self.cer,
        }
        return {name: value for name, value in metrics.items() if not np.isnan(value)}


def _normalised(text: str) -> str:
    return " ".join(text.casefold().split())


def exact_match(prediction: str, answers: str | list[str] | tuple[str, ...]) -> bool:
    """Whether ``prediction`` equals one of the accepted answers, ignoring case and spacing.

    Example:
        >>> exact_match("  Total 12.50", ["total 12.50", "12.50"])
        True
    """
    accepted = [answers] if isinstance(answers, str) else list(answers)
    return any(_normalised(prediction) == _normalised(answer) for answer in accepted)


def anls(
    prediction: str, answers: str | list[str] | tuple[str, ...], threshold: float = 0.5
) -> float:
    """Average Normalised Levenshtein Similarity for one answer, the DocVQA measure.

    The similarity to an accepted answer is ``1 - distance / max(len)`` on case-folded,
    space-normalised strings, counted as 0 below ``threshold`` (a different answer, not a
    misspelling); the best over the accepted answers is returned.

    Example:
        >>> round(anls("12.5O", ["12.50"]), 2), anls("42", ["12.50"])
        (0.8, 0.0)
    """
    from rapidfuzz.distance import Levenshtein

    accepted = [answers] if isinstance(answers, str) else list(answers)
    best = 0.0
    for answer in accepted:
        similarity = 1 - Levenshtein.normalized_distance(
            _normalised(prediction), _normalised(answer)
        )
        best = max(best, similarity if similarity >= threshold else 0.0)
    return best


def character_error_rate(prediction: str, reference: str) -> float:
    """Edits (insertions, deletions, substitutions) per reference character, for OCR.

    0 is perfect; it exceeds 1 when the prediction is much longer than the reference.

    Example:
        >>> character_error_rate("Helo world", "Hello world")
        0.09090909090909091
    """
    from rapidfuzz.distance import Levenshtein

    distance = Levenshtein.distance(prediction, reference)
    return distance / len(reference) if reference else float(distance > 0)


def evaluate_samples(
    florence: Any,
    samples: Any,
    *,
    num_beams: int = 3,
    batch_size: int = 8,
    class_agnostic: bool = False,
    progress: bool | None = None,
    **generate_kwargs: Any,
) -> SampleEvaluation:
    """Run the model on labelled samples and score its answers.

    Box samples (``OD``, open-vocabulary detection, phrase grounding) are run with
    ``scores=True`` so that mAP ranks boxes by the model's own confidence.

    Args:
        florence: What :func:`~florence_helpers.load_model` (or a fine-tuning helper) returned.
        samples: :class:`~florence_helpers.training.TrainingSample` objects.
        num_beams: Beam width for generation.
        batch_size: Images per ``generate`` call.
        class_agnostic: Score boxes whatever their label (see :func:`evaluate_detections`).
        progress: Show progress bars.
        **generate_kwargs: Passed on to :func:`~florence_helpers.run` for every task.

    Example:
        >>> evaluate_samples(florence, validation).summary()  # doctest: +SKIP
        {'mAP@[.5:.95]': 0.71, 'mAP@.5': 0.93, 'grounding acc@.5': nan, 'region accuracy': nan}
    """
    samples = list(samples)
    results = _answers(florence, samples, num_beams, batch_size, progress, generate_kwargs)
    kinds = [task_spec(s.task).result for s in samples]
    texts = [
        i
        for i, s in enumerate(samples)
        if kinds[i] is ResultKind.TEXT and s.task is not Task.REGION_TO_CATEGORY
    ]
    boxed = [i for i, kind in enumerate(kinds) if kind is ResultKind.BOXES]
    mean_ap = mean_ap50 = float("nan")
    constant = False
    if boxed:
        truth = _ground_truth(samples, boxed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant scores are reported in the result
            detections = evaluate_detections(
                truth, {f"sample {i}": results[i] for i in boxed}, class_agnostic=class_agnostic
            )
        mean_ap, mean_ap50, constant = detections.map, detections.map50, detections.constant_scores
    grounded = [i for i in boxed if samples[i].task is not Task.OD]
    hits = [
        len(results[i]) > 0 and bool((box_iou(results[i].boxes[:1], samples[i].boxes) >= 0.5).any())
        for i in grounded
    ]
    regions = [i for i, s in enumerate(samples) if s.task is Task.REGION_TO_CATEGORY]
    right = [
        LOC_TOKEN.sub("", results[i].text).strip().casefold() == samples[i].labels[0].casefold()
        for i in regions
    ]
    accepted = [samples[i].answers or (samples[i].target,) for i in texts]
    said = [results[i].text for i in texts]
    return SampleEvaluation(
        map=mean_ap,
        map50=mean_ap50,
        constant_scores=constant,
        grounding_accuracy=_mean([float(hit) for hit in hits]),
        region_accuracy=_mean([float(ok) for ok in right]),
        results=results,
        exact_match=_mean([float(exact_match(p, a)) for p, a in zip(said, accepted, strict=True)]),
        anls=_mean([anls(p, a) for p, a in zip(said, accepted, strict=True)]),
        cer=_mean([character_error_rate(p, a[0]) for p, a in zip(said, accepted, strict=True)]),
    )


def _answers(
    florence: Any,
    samples: list[Any],
    num_beams: int,
    batch_size: int,
    progress: bool | None,
    generate_kwargs: dict[str, Any],
) -> list[Any]:
    """The model's answer to every sample, one batched ``run`` per task (boxes with scores)."""
    from ..model.inference import run

    results: list[Any] = [None] * len(samples)
    by_task: dict[Any, list[int]] = {}
    for index, sample in enumerate(samples):
        by_task.setdefault(sample.task, []).append(index)
    for task, indices in by_task.items():
        chosen = [samples[i] for i in indices]
        answers = run(
            florence,
            [s.image for s in chosen],
            task,
            text=[s.text for s in chosen] if chosen[0].text is not None else None,
            region=[s.region for s in chosen] if chosen[0].region is not None else None,
            scores=task_spec(task).result is ResultKind.BOXES,
            num_beams=num_beams,
            batch_size=batch_size,
            progress=progress,
            **generate_kwargs,
        )
        for i, answer in zip(indices, answers, strict=True):
            results[i] = answer
    return results


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _ground_truth(samples: list[Any], indices: list[int]) -> dict[str, Any]:
    """The samples' labelled boxes as a COCO dataset, one COCO image (``"sample i"``) each.

    Each sample is its own image because one photo can give several samples (one per category
    for grounding), each with only its own boxes to find.
    """
    category = coco_categories(sorted({label for i in indices for label in samples[i].labels}))
    images, annotations = [], []
    for i in indices:
        width, height = samples[i].image_size
        images.append({"id": i + 1, "file_name": f"sample {i}", "width": width, "height": height})
        for label, box in zip(samples[i].labels, samples[i].boxes, strict=True):
            bbox = xyxy_to_xywh(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": category[label],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": number, "name": name} for name, number in category.items()]
    return {"images": images, "categories": categories, "annotations": annotations}
