"""Run a Florence-2 task on one image or a batch of images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import numpy as np
import torch
from tqdm.auto import tqdm

from .images import ImageSource, load_image
from .model import FlorenceModel
from .prompts import Region, TaskInputError, build_prompt
from .results import AnyResult, parse_answer
from .scores import attach_scores, scored_ids, token_logprobs
from .tasks import Task, TaskSpec, get_task


@overload
def run(
    florence: FlorenceModel,
    images: ImageSource,
    task: str | Task | TaskSpec,
    text: str | None = None,
    **kwargs: Any,
) -> AnyResult: ...


@overload
def run(
    florence: FlorenceModel,
    images: list[ImageSource],
    task: str | Task | TaskSpec,
    text: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> list[AnyResult]: ...


def run(
    florence: FlorenceModel,
    images: ImageSource | list[ImageSource],
    task: str | Task | TaskSpec,
    text: str | Sequence[str] | None = None,
    *,
    region: Region | Sequence[Region] | None = None,
    num_beams: int = 3,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    progress: bool | None = None,
    scores: bool = False,
    **generate_kwargs: Any,
) -> AnyResult | list[AnyResult]:
    """Run one Florence-2 task on an image, or on a list of images in padded batches.

    Every input is checked before the model runs: unknown task, text given to a task that
    takes none, missing text or region, a region outside its image, an unreadable image.

    Args:
        florence: What :func:`load_model` returned.
        images: One image (path, URL, bytes, PIL image, numpy array) or a list of them.
        task: ``"OD"``, ``"<OD>"`` or :class:`Task`.
        text: The text for grounding, open-vocabulary detection and referring segmentation;
            one string for all images or one per image.
        region: A pixel box ``(x1, y1, x2, y2)`` for the ``REGION_TO_*`` tasks; one for all
            images or one per image.
        num_beams: Beam search width (3 as in Microsoft's examples; 1 is greedy and faster).
        max_new_tokens: Longest answer, in tokens. An answer cut off here is still parsed:
            the result holds what parsed cleanly and ``truncated`` is True.
        batch_size: Images per ``generate`` call.
        progress: Show a progress bar over batches; by default only when there are several.
        scores: Attach confidences computed from the model's token probabilities: one per
            box, polygon instance or OCR line (``result.scores``), and a sequence score plus
            per-word scores for text answers. See :mod:`florence_helpers.scores`.
        **generate_kwargs: Passed on to ``model.generate`` (e.g. ``logits_processor``).

    Returns:
        A typed result for one image, or a list of results in the order of ``images``.

    Example:
        >>> florence = load_model()  # doctest: +SKIP
        >>> run(florence, "images/astronaut.jpg", "CAPTION").text  # doctest: +SKIP
        'A woman in a space suit holding a flag.'
    """
    spec = get_task(task)
    single = not isinstance(images, (list, tuple))
    sources = [images] if single else list(images)
    texts = _per_image(text, len(sources), "text", is_item=lambda v: isinstance(v, str))
    regions = _per_image(region, len(sources), "region", is_item=_is_box)
    loaded = [load_image(source) for source in sources]
    prompts = [
        build_prompt(spec, image.size, text=t, region=r)
        for image, t, r in zip(loaded, texts, regions, strict=True)
    ]

    results: list[AnyResult] = []
    starts = range(0, len(loaded), max(1, batch_size))
    show = progress if progress is not None else len(starts) > 1
    for start in tqdm(starts, desc=spec.name, unit="batch", disable=not show):
        batch = loaded[start : start + batch_size]
        results += _run_batch(
            florence,
            batch,
            prompts[start : start + batch_size],
            spec,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            with_scores=scores,
            **generate_kwargs,
        )
    return results[0] if single else results


def _run_batch(
    florence: FlorenceModel,
    images: list,
    prompts: list[str],
    spec: TaskSpec,
    with_scores: bool = False,
    **generate_kwargs: Any,
) -> list[AnyResult]:
    processor, model = florence.processor, florence.model
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding="longest")
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if with_scores:
        generate_kwargs.update(return_dict_in_generate=True, output_logits=True)
    with torch.inference_mode():
        outputs = model.generate(**inputs, do_sample=False, **generate_kwargs)
        sequences = outputs.sequences if with_scores else outputs
        logprobs = token_logprobs(model, outputs).float().cpu().numpy() if with_scores else None
    eos_id = model.generation_config.eos_token_id
    eos = set(eos_id if isinstance(eos_id, list) else [eos_id])
    results = []
    for index, (row, image) in enumerate(zip(sequences.tolist(), images, strict=True)):
        # Position 0 is the decoder start token; an answer without EOS after it was cut off.
        length = scored_ids(row, eos)
        answer = row[: length + 1]
        raw = processor.decode(answer, skip_special_tokens=False)
        truncated = answer[-1] not in eos or length == 0
        result = parse_answer(processor, raw, spec, image.size, truncated=truncated)
        if logprobs is not None:
            result = attach_scores(result, processor, answer[1:], logprobs[index, :length])
        results.append(result)
    return results


def _per_image(value: Any, count: int, name: str, is_item: Any) -> list[Any]:
    """Spread one value over all images, or check that a list has one per image."""
    if value is None or is_item(value):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise TaskInputError(
            f"Got {len(values)} values for `{name}` but {count} images: pass one {name} for "
            f"all images or exactly one per image."
        )
    return values


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, Sequence | torch.Tensor | np.ndarray)
        and not isinstance(value, str)
        and len(value) == 4
        and all(isinstance(v, int | float) or hasattr(v, "__float__") for v in value)
    )
