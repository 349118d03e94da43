"""Run a Florence-2 task on one image or a batch of images."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any, overload

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutput

from ..boundary.images import ImageSource, load_image
from ..language.prompts import Region, TaskInputError, build_prompt
from ..language.regions import RegionError
from ..language.results import AnyResult, parse_answer
from ..language.tasks import AnswerSize, ResultKind, Task, TaskSpec, custom_task, task_spec
from .decoding import for_rows, generate
from .held_images import load_images, materialized
from .loading import FlorenceModel, embed_prompts
from .prefetch import prefetched
from .scores import attach_scores, scored_ids


@overload
def run(
    florence: FlorenceModel,
    images: ImageSource,
    task: str | Task | TaskSpec | None = None,
    text: str | None = None,
    **kwargs: Any,
) -> AnyResult: ...


@overload
def run(
    florence: FlorenceModel,
    images: list[ImageSource],
    task: str | Task | TaskSpec | None = None,
    text: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> list[AnyResult]: ...


def run(
    florence: FlorenceModel,
    images: ImageSource | list[ImageSource],
    task: str | Task | TaskSpec | None = None,
    text: str | Sequence[str] | None = None,
    *,
    prompt: str | None = None,
    parse: str | ResultKind = "text",
    region: Region | Sequence[Region] | None = None,
    num_beams: int = 3,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    progress: bool | None = None,
    scores: bool = False,
    fast_beams: bool = True,
    **generate_kwargs: Any,
) -> AnyResult | list[AnyResult]:
    """Run one Florence-2 task on an image, or on a list of images in padded batches.

    Every input is checked before the model runs: unknown task, text given to a task that
    takes none, missing text or region, a region outside its image, an unreadable image. A
    long list is not held decoded all at once: past 100 megapixels, images from files or
    bytes are decoded again when their batch comes (:mod:`~florence_helpers.model.held_images`).

    Args:
        florence: What :func:`load_model` returned.
        images: One image (path, URL, bytes, PIL image, numpy array) or a list of them.
        task: ``"OD"``, ``"<OD>"``, :class:`Task`, or a :func:`custom_task`.
        text: The text for grounding, open-vocabulary detection and referring segmentation;
            one string for all images or one per image.
        prompt: Instead of ``task``: a prompt of your own, sent as written (e.g.
            ``"<DocVQA>What is the total?"`` for a checkpoint fine-tuned on it).
        parse: How to read the answer to ``prompt``: ``"text"``, ``"boxes"``,
            ``"polygons"`` or ``"ocr"``, with the built-in tasks' grammar.
        region: A pixel box ``(x1, y1, x2, y2)`` for the ``REGION_TO_*`` tasks; one for all
            images or one per image.
        num_beams: Beam search width (3 as in Microsoft's examples; 1 is greedy and faster).
        max_new_tokens: Longest answer, in tokens. An answer cut off here is still parsed:
            the result holds what parsed cleanly and ``truncated`` is True (also for an answer
            that ends exactly at the limit: the checkpoint's forced EOS makes the two look
            the same).
        batch_size: Images per ``generate`` call.
        progress: Show a progress bar over batches; by default only when there are several.
        scores: Attach confidences computed from the model's token probabilities: one per
            box, polygon instance or OCR line (``result.scores``), and a sequence score plus
            per-word scores for text answers. See :mod:`florence_helpers.model.scores`.
        fast_beams: Beam search with the exact shortcuts of :mod:`florence_helpers.model.decoding`
            (same answers, faster); False runs plain ``model.generate``.
        **generate_kwargs: Passed on to ``model.generate`` (e.g. ``logits_processor``).

    Safe to call from several threads on one model.

    Returns:
        A typed result for one image, or a list of results in the order of ``images``.

    Example:
        >>> florence = load_model()  # doctest: +SKIP
        >>> run(florence, "images/astronaut.jpg", "CAPTION").text  # doctest: +SKIP
        'A woman in a space suit holding a flag.'
    """
    spec = _chosen_task(task, prompt, parse)
    check_generation_settings(num_beams, max_new_tokens, batch_size)
    single = not isinstance(images, (list, tuple))
    sources = [images] if single else list(images)
    texts = _per_image(text, len(sources), "text", is_item=lambda v: isinstance(v, str))
    regions = _per_image(region, len(sources), "region", is_item=_is_box)
    loaded = load_images(sources)  # every image checked now, a bounded number held
    prompts = [
        build_prompt(spec, image.size, text=t, region=r)
        for image, t, r in zip(loaded, texts, regions, strict=True)
    ]
    lengths = check_prompt_lengths(florence, prompts, max_new_tokens)
    size = batch_size
    order = list(range(len(loaded)))
    if len(loaded) > size:
        # Batch prompts of similar length together so padding stays small.
        order.sort(key=lambda i: lengths[i])
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    generate_kwargs.update(num_beams=num_beams, max_new_tokens=max_new_tokens)

    def prepare(indices: list[int]) -> Any:
        pictures = materialized([loaded[i] for i in indices])
        return _preprocess(florence, pictures, [prompts[i] for i in indices])

    results: list[AnyResult | None] = [None] * len(loaded)
    show = progress if progress is not None else len(batches) > 1
    with tqdm(total=len(loaded), desc=spec.name, unit="img", disable=not show) as bar:
        for indices, inputs in zip(batches, prefetched(prepare, batches), strict=True):
            sequences, logprobs = generate(
                florence, inputs, scores, fast_beams=fast_beams, **generate_kwargs
            )
            sizes = [loaded[i].size for i in indices]
            for i, result in zip(
                indices,
                _parse(florence, sequences, logprobs, [spec] * len(indices), sizes, max_new_tokens),
                strict=True,
            ):
                result.query = describe_query(texts[i], regions[i])
                results[i] = result
            bar.update(len(indices))
    return results[0] if single else results  # type: ignore[return-value]


def _chosen_task(
    task: str | Task | TaskSpec | None, prompt: str | None, parse: str | ResultKind
) -> TaskSpec:
    """The task to run: a known or custom one, or a prompt of the caller's own."""
    if (task is None) == (prompt is None):
        raise TaskInputError(
            "Give a task (e.g. 'CAPTION' or a custom_task) or a prompt=..., not "
            + ("both." if task is not None else "neither.")
        )
    if prompt is not None:
        return custom_task(prompt, result=parse)
    return task_spec(task)


TaskRequest = str | Task | TaskSpec | tuple[str | Task | TaskSpec, str | Region]
"""A task alone (``"OD"``), or with its text (``("OPEN_VOCABULARY_DETECTION", "a cat")``) or
its region (``("REGION_TO_CATEGORY", (10, 20, 300, 400))``)."""


def run_tasks(
    florence: FlorenceModel,
    image: ImageSource,
    tasks: Sequence[TaskRequest],
    *,
    num_beams: int = 3,
    max_new_tokens: int = 1024,
    scores: bool = False,
    fast_beams: bool = True,
    **generate_kwargs: Any,
) -> list[AnyResult]:
    """Run several tasks on one image, encoding the image only once.

    The vision encoder is a large part of a Florence-2 call's cost (docs/speed.md has the
    figures), so running 15 tasks the naive way encodes the same pixels 15 times. Here the
    image features are computed once, the text encoder reads all task prompts in one padded
    batch, and one ``generate`` call per answer size (short, medium, long)
    decodes the answers, so short answers do not wait for long ones. With greedy decoding the
    answers are token-identical to running each task alone.

    Args:
        florence: What :func:`load_model` returned.
        image: The image.
        tasks: Tasks, each alone or paired with its text or region.
        num_beams, max_new_tokens, scores, fast_beams: As for :func:`run`.
        **generate_kwargs: Passed on to ``model.generate``.

    Returns:
        One result per task, in order.

    Example:
        >>> caption, boxes, flag = run_tasks(florence, "images/astronaut.jpg", [
        ...     "CAPTION", "OD", ("OPEN_VOCABULARY_DETECTION", "a flag")])  # doctest: +SKIP
    """
    check_generation_settings(num_beams, max_new_tokens)
    picture = load_image(image)
    specs, prompts, queries = _task_prompts(picture.size, tasks)
    if not specs:
        return []
    check_prompt_lengths(florence, prompts, max_new_tokens)
    states, mask = _encode_once(florence, picture, prompts)
    generate_kwargs.update(num_beams=num_beams, max_new_tokens=max_new_tokens)
    results: list[AnyResult | None] = [None] * len(specs)
    # One generate call per answer size: a batch runs until its longest answer ends, so short
    # answers should not share a batch with 200-token polygons.
    for size in AnswerSize:
        rows = [i for i, spec in enumerate(specs) if spec.answer_size is size]
        if not rows:
            continue
        index = torch.tensor(rows, device=states.device)
        group_mask = mask[index]
        width = int(group_mask.sum(dim=1).max())  # drop padding no row of this group needs
        inputs = {
            "encoder_outputs": BaseModelOutput(last_hidden_state=states[index, :width]),
            "attention_mask": group_mask[:, :width],
        }
        kwargs = for_rows(generate_kwargs, rows)
        sequences, logprobs = generate(florence, inputs, scores, fast_beams=fast_beams, **kwargs)
        group_specs, sizes = [specs[i] for i in rows], [picture.size] * len(rows)
        parsed = _parse(florence, sequences, logprobs, group_specs, sizes, max_new_tokens)
        for i, result in zip(rows, parsed, strict=True):
            result.query = queries[i]
            results[i] = result
    return results  # type: ignore[return-value]


def _task_prompts(
    size: tuple[int, int], tasks: Sequence[TaskRequest]
) -> tuple[list[TaskSpec], list[str], list[str | None]]:
    """Each task's spec, prompt and query (its text or region, for the result)."""
    specs, prompts, queries = [], [], []
    for request in tasks:
        task, extra = request if isinstance(request, tuple) else (request, None)
        spec = task_spec(task)
        text = extra if isinstance(extra, str) else None
        region = extra if extra is not None and not isinstance(extra, str) else None
        prompts.append(build_prompt(spec, size, text=text, region=region))
        specs.append(spec)
        queries.append(describe_query(text, region))
    return specs, prompts, queries


def _encode_once(florence: FlorenceModel, picture: Any, prompts: list[str]) -> tuple[Any, Any]:
    """The text encoder's states for every prompt beside one encoding of the image."""
    model = florence.model
    # The processor pairs every prompt with the image; one copy of the pixels is enough.
    batch = _preprocess(florence, [picture] * len(prompts), prompts)
    with torch.inference_mode():
        features = model.get_image_features(batch["pixel_values"][:1]).pooler_output
        ids, mask = batch["input_ids"], batch["attention_mask"]
        embeds = embed_prompts(model, ids, features)
        states = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return states, mask


MAX_NUM_BEAMS = 16
"""The widest beam search run: Microsoft's examples use 3, and each beam costs memory for every
token of every image (a width of 20,000 took gigabytes in seconds)."""
MAX_BATCH_SIZE = 256
"""The most images decoded in one ``generate`` call."""


def check_generation_settings(num_beams: Any, max_new_tokens: Any, batch_size: Any = 1) -> None:
    """Refuse beam widths, token limits and batch sizes that are not whole numbers of at least
    1, beams past :data:`MAX_NUM_BEAMS` and batches past :data:`MAX_BATCH_SIZE` (the token
    limit is checked against the model by :func:`check_prompt_lengths`).

    Raises:
        TaskInputError: Naming the setting and the value it got.
    """
    for name, value, most in (
        ("num_beams", num_beams, MAX_NUM_BEAMS),
        ("max_new_tokens", max_new_tokens, None),
        ("batch_size", batch_size, MAX_BATCH_SIZE),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise TaskInputError(f"{name} must be a whole number of at least 1, got {value!r}.")
        if most is not None and value > most:
            raise TaskInputError(f"{name} must be at most {most}, got {value!r}.")


def check_prompt_lengths(
    florence: FlorenceModel, prompts: Sequence[str], max_new_tokens: int
) -> list[int]:
    """Each prompt's length in tokens, image tokens included, checked against the model.

    The text encoder reads the image tokens and the prompt in one sequence, and the decoder
    writes at most as many tokens as it has positions: past either limit transformers fails
    deep inside with an index error.

    Raises:
        TaskInputError: A prompt too long for the text encoder, or ``max_new_tokens`` beyond
            the decoder's positions; the message gives the limit.
    """
    tokenizer = florence.processor.tokenizer
    limit = _positions(florence)
    image_tokens = getattr(florence.processor, "num_image_tokens", 0) or getattr(
        florence.processor.image_processor, "image_seq_length", 0
    )
    if max_new_tokens > limit:
        raise TaskInputError(
            f"max_new_tokens={max_new_tokens} is more than this checkpoint's decoder can write: "
            f"it has {limit} positions. Use at most {limit}."
        )
    room = limit - image_tokens
    for prompt in prompts:  # a text that cannot fit is refused before it is tokenised
        if len(prompt) > room * _longest_token(tokenizer):
            raise TaskInputError(
                f"The prompt is too long: {len(prompt):,} characters cannot fit in the {room} "
                f"tokens of text beside the image's {image_tokens}: this checkpoint's text "
                f"encoder reads at most {limit}. Shorten the text (it begins {prompt[:60]!r})."
            )
    construct = getattr(florence.processor, "_construct_prompts", None)
    written = construct(list(prompts)) if construct is not None else list(prompts)
    lengths = []
    for prompt, text in zip(prompts, written, strict=True):
        # padding="longest", as the processor calls it: a fast tokenizer's padding is one
        # setting shared by every thread, and a call without it would switch it off for another
        # thread's batch (a single text is never padded).
        length = len(tokenizer(text, padding="longest")["input_ids"]) + image_tokens
        if length > limit:
            raise TaskInputError(
                f"The prompt is too long: {length - image_tokens} tokens of text and "
                f"{image_tokens} of the image, but this checkpoint's text encoder reads at "
                f"most {limit}. Shorten the text to under {limit - image_tokens} tokens "
                f"(it begins {prompt[:60]!r})."
            )
        lengths.append(length)
    return lengths


_LONGEST_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _longest_token(tokenizer: Any) -> int:
    """The most characters one token stands for (its vocabulary's longest entry): a text
    longer than this many characters per token cannot fit."""
    try:
        return _LONGEST_TOKEN[tokenizer]
    except (KeyError, TypeError):
        pass
    vocabulary = tokenizer.get_vocab()
    longest = max((len(token) for token in vocabulary), default=1)
    with contextlib.suppress(TypeError):
        _LONGEST_TOKEN[tokenizer] = longest
    return longest


def _positions(florence: FlorenceModel) -> int:
    config = getattr(florence.model, "config", None)
    text = getattr(config, "text_config", config)
    return int(getattr(text, "max_position_embeddings", 1024))


def _preprocess(florence: FlorenceModel, images: list, prompts: list[str]) -> Any:
    model = florence.model
    inputs = florence.processor(text=prompts, images=images, return_tensors="pt", padding="longest")
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def _parse(
    florence: FlorenceModel,
    sequences: torch.Tensor,
    logprobs: np.ndarray | None,
    specs: list[TaskSpec],
    sizes: list[tuple[int, int]],
    max_new_tokens: int,
) -> list[AnyResult]:
    processor = florence.processor
    eos_id = florence.model.generation_config.eos_token_id
    eos = set(eos_id if isinstance(eos_id, list) else [eos_id])
    results = []
    for index, (row, spec, size) in enumerate(zip(sequences.tolist(), specs, sizes, strict=True)):
        # Position 0 is the decoder start token; an answer without EOS after it was cut off,
        # and so was one that used every token it was allowed: with Microsoft's
        # forced_eos_token_id the last of them is always EOS.
        length = scored_ids(row, eos)
        answer = row[: length + 1]
        raw = processor.decode(answer, skip_special_tokens=False)
        truncated = answer[-1] not in eos or length == 0 or length >= max_new_tokens
        result = parse_answer(processor, raw, spec, size, truncated=truncated)
        if logprobs is not None:
            result = attach_scores(result, processor, answer[1:], logprobs[index, :length], spec)
        results.append(result)
    return results


def describe_query(text: str | None, region: Region | None) -> str | None:
    """What a task was asked besides the image, as a result records it (``Result.query``)."""
    if text is not None and str(text).strip():
        return str(text).strip()
    if region is not None:
        return "(" + ", ".join(f"{float(v):g}" for v in region) + ")"
    return None


def _per_image(value: Any, count: int, name: str, is_item: Any) -> list[Any]:
    """Spread one value over all images, or check that a list has one per image."""
    if value is None or is_item(value):
        return [value] * count
    if name == "region" and _is_numbers(value):
        raise RegionError(
            f"A region is four numbers (x1, y1, x2, y2) in pixels; got {len(value)}: "
            f"{list(value)!r}."
        )
    values = list(value)
    if len(values) != count:
        raise TaskInputError(
            f"Got {len(values)} values for `{name}` but {count} images: pass one {name} for "
            f"all images or exactly one per image."
        )
    return values


def _is_numbers(value: Any) -> bool:
    """A flat sequence of numbers (a malformed box, not a list of boxes)."""
    return (
        isinstance(value, Sequence | torch.Tensor | np.ndarray)
        and not isinstance(value, str)
        and len(value) > 0
        and all(isinstance(v, int | float | np.number) for v in value)
    )


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, Sequence | torch.Tensor | np.ndarray)
        and not isinstance(value, str)
        and len(value) == 4
        and all(isinstance(v, int | float) or hasattr(v, "__float__") for v in value)
    )
