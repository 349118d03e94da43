"""Confidence scores for Florence-2 answers, computed from the model's own token probabilities.

The native transformers processor parses no scores. Here, generation keeps the raw logits of
every step (``output_logits=True``); ``compute_transition_scores`` (with the beam indices under
beam search) turns them into the log-probability the model gave each token it emitted, before
any logits processor (repetition rules, forced tokens) touched them.

Each parsed instance (a box, a polygon instance, an OCR line) is traced back to the tokens it
was parsed from, by running the native parser's own patterns over the decoded text with
character offsets: its label (or text) tokens and its location tokens. Its score is the
geometric mean of those tokens' probabilities, ``exp(mean(log p))``:

- it lies in 0..1 and reads as "the typical probability of this instance's tokens";
- it does not shrink with the number of tokens, so a long label or a polygon with many points
  is not penalised against a short one (a product of probabilities would be);
- it matches the recipe the original remote code used for Florence-2-large (a mean of the
  instance's token log-probabilities), but works for every checkpoint and decoding mode.

Text answers get a sequence score the same way over all answer tokens (``logprob`` is the mean
log-probability, ``score`` its exponential) and per-word scores, where a word's score is the
product of its tokens' probabilities: the probability the model gave that whole word.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..language.grammar import DROPPED_TOKENS, Span, instance_spans
from ..language.regions import LOC_TOKEN
from ..language.results import AnyResult, TextResult
from ..language.tasks import TaskSpec


def token_logprobs(model: Any, outputs: Any) -> torch.Tensor:
    """Log-probability of each generated token, shape ``(rows, steps)``.

    Column ``j`` belongs to ``outputs.sequences[:, j + 1]`` (position 0 is the decoder start
    token). Needs ``generate(..., return_dict_in_generate=True, output_logits=True)``. The
    softmax runs in float32 whatever the model's dtype (transformers 5 already hands the
    logits over in float32; ``.float()`` keeps it so): in bf16 it would round a probability of
    0.99 to 1.0 and lose the differences between confident answers.
    """
    return model.compute_transition_scores(
        outputs.sequences,
        tuple(step.float() for step in outputs.logits),
        getattr(outputs, "beam_indices", None),
        normalize_logits=True,
    )


def decode_with_offsets(tokenizer: Any, token_ids: list[int]) -> tuple[str, list[Span]]:
    """Decode like ``tokenizer.decode`` and give each token its character span in the text.

    Added tokens (``<loc_N>``, ``<s>``, ...) are written verbatim; each run of ordinary tokens
    is decoded as a whole, so multi-byte characters split across tokens come out right.
    """
    atomic = set(tokenizer.added_tokens_decoder)
    tokens = tokenizer.convert_ids_to_tokens(token_ids)
    text, spans = "", []
    run: list[str] = []

    def flush() -> None:
        nonlocal text
        start = len(text)
        decoded = tokenizer.convert_tokens_to_string(run) if run else ""
        previous = 0
        for k in range(1, len(run) + 1):
            end = len(tokenizer.convert_tokens_to_string(run[:k])) if k < len(run) else len(decoded)
            end = min(max(end, previous), len(decoded))
            spans.append((start + previous, start + end))
            previous = end
        text += decoded
        run.clear()

    for token_id, token in zip(token_ids, tokens, strict=True):
        if token_id in atomic:
            flush()
            spans.append((len(text), len(text) + len(token)))
            text += token
        else:
            run.append(token)
    flush()
    return text, spans


def _clean(text: str, spans: list[Span], tokens: list[str]) -> tuple[str, list[Span | None]]:
    """Drop ``<s>``, ``</s>`` and ``<pad>`` (as the native parser does) and shift the spans."""
    cleaned, new_spans = "", []
    for (start, end), token in zip(spans, tokens, strict=True):
        if token in DROPPED_TOKENS:
            new_spans.append(None)
            continue
        new_spans.append((len(cleaned), len(cleaned) + end - start))
        cleaned += text[start:end]
    return cleaned, new_spans


def _overlapping(spans: list[Span | None], wanted: list[Span]) -> list[int]:
    return [
        index
        for index, span in enumerate(spans)
        if span is not None
        and span[1] > span[0]
        and any(span[0] < end and span[1] > start for start, end in wanted)
    ]


def attach_scores(
    result: AnyResult,
    processor: Any,
    token_ids: list[int],
    logprobs: np.ndarray,
    spec: TaskSpec | None = None,
) -> AnyResult:
    """Return ``result`` with confidences from the per-token log-probabilities.

    Args:
        result: What :func:`parse_answer` made of this generation.
        processor: The model's processor.
        token_ids: The generated ids after the decoder start token, up to and including EOS.
        logprobs: One log-probability per id in ``token_ids``.
        spec: The task that was run (needed for a custom task; else read from the result).

    Returns:
        A copy with ``scores`` (spatial results) or ``score``, ``logprob`` and
        ``word_scores`` (text results).
    """
    tokenizer = processor.tokenizer
    logprobs = np.asarray(logprobs, dtype=np.float64)
    text, spans = decode_with_offsets(tokenizer, token_ids)
    tokens = tokenizer.convert_ids_to_tokens(token_ids)
    cleaned, clean_spans = _clean(text, spans, tokens)

    if isinstance(result, TextResult):
        answer = [
            i
            for i, (span, token) in enumerate(zip(clean_spans, tokens, strict=True))
            if span is not None and not token.startswith("<loc_")
        ]
        return _score_text(result, cleaned, clean_spans, answer, logprobs)

    banned = set(getattr(processor.post_processor, "banned_grounding_tokens", set()))
    instances = instance_spans(spec or result.task, cleaned, banned)
    scores = [_geometric_mean(logprobs[_overlapping(clean_spans, inst)]) for inst in instances]
    if len(scores) != len(result):
        raise RuntimeError(
            f"Found {len(scores)} scored instances but the parser returned {len(result)} for "
            f"{result.task}; please report this answer: {result.raw!r}"
        )
    return replace(result, scores=np.asarray(scores, dtype=np.float32))


def _geometric_mean(logprobs: np.ndarray) -> float:
    return float(np.exp(logprobs.mean())) if len(logprobs) else float("nan")


def _score_text(
    result: TextResult,
    text: str,
    spans: list[Span | None],
    answer: list[int],
    logprobs: np.ndarray,
) -> TextResult:
    if not answer:
        return replace(result, score=None, logprob=None, word_scores=[])
    mean = float(logprobs[answer].mean())
    in_answer = set(answer)
    words = []
    # Location tokens become blanks of the same length, so offsets stay valid.
    for match in re.finditer(r"\S+", LOC_TOKEN.sub(lambda m: " " * len(m.group()), text)):
        indices = [i for i in _overlapping(spans, [match.span()]) if i in in_answer]
        if indices:
            words.append((match.group(), float(np.exp(logprobs[indices].sum()))))
    return replace(result, score=float(np.exp(mean)), logprob=mean, word_scores=words)


def scored_ids(row: list[int], eos_ids: set[int]) -> int:
    """How many generated ids (after the decoder start token) belong to the answer, EOS included."""
    for index, token in enumerate(row[1:]):
        if token in eos_ids:
            return index + 1
    return len(row) - 1


def _require_scores(result: Any) -> np.ndarray:
    if getattr(result, "scores", None) is None:
        raise ValueError(
            f"This {type(result).__name__} has no scores: run the task with scores=True."
        )
    return np.asarray(result.scores)


def filter_by_score(result: Any, min_score: float) -> Any:
    """Keep the instances whose score is at least ``min_score``.

    Example:
        >>> confident = filter_by_score(run(florence, image, "OD", scores=True), 0.5)
        ... # doctest: +SKIP
    """
    return result[_require_scores(result) >= min_score]


def sort_by_score(result: Any) -> Any:
    """The instances from the most to the least confident."""
    return result[np.argsort(-_require_scores(result), kind="stable")]


def top_k(result: Any, k: int) -> Any:
    """The ``k`` most confident instances (fewer if there are fewer)."""
    return sort_by_score(result)[: max(k, 0)]
