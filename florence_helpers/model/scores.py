"""Confidence scores for Florence-2 answers, computed from the model's own token probabilities.

The native transformers processor parses no scores. Here, generation records the log-probability
the model gave each token it emitted, before any logits processor (repetition rules, forced
tokens) touched it: the numbers ``compute_transition_scores`` computes from
``output_logits=True``, gathered step by step (:class:`StepLogprobs`) instead of keeping every
step's whole vocabulary for every beam.

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

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..language.grammar import DROPPED_TOKENS, Span, instance_spans
from ..language.regions import LOC_TOKEN
from ..language.results import AnyResult, TextResult
from ..language.tasks import TaskSpec


class StepLogprobs:
    """Each generated token's log-probability, kept step by step in memory that does not grow
    with the vocabulary.

    ``generate(output_logits=True)`` keeps every step's logits for every beam: rows x steps x
    vocabulary floats (1.7 GB for one image at 8 beams and 1024 tokens with Florence-2's 51k
    tokens). This keeps, per step and row, only the few tokens the search can still choose
    from (the highest processed scores) with their log-probability under the raw logits,
    the distribution before any logits processor (repetition rules, forced tokens) touched
    it, as ``compute_transition_scores(..., normalize_logits=True)`` gives it. The softmax
    runs in float32 whatever the model's dtype: in bf16 it would round a probability of 0.99
    to 1.0.

    Use it as the last logits processor while :meth:`watching` the model, then call
    :meth:`transition_logprobs` with the sequences and beam indices ``generate`` returned.
    """

    def __init__(self, num_beams: int) -> None:
        # Beam search picks each row's next tokens among its top max(2, 1 + EOS ids) x beams
        # processed scores; twice that leaves room for ties at the boundary.
        self.keep = 4 * max(num_beams, 1) + 4
        self._raw: torch.Tensor | None = None
        self._tokens: list[torch.Tensor] = []
        self._logprobs: list[torch.Tensor] = []

    @contextlib.contextmanager
    def watching(self, model: Any) -> Iterator[None]:
        """Read the output layer's logits at every decoding step while the block runs."""

        thread = threading.get_ident()

        def keep_last_position(module: Any, inputs: Any, output: torch.Tensor) -> None:
            if threading.get_ident() == thread:  # a shared model also runs other threads' calls
                self._raw = output[:, -1, :]

        handle = model.get_output_embeddings().register_forward_hook(keep_last_position)
        try:
            yield
        finally:
            handle.remove()
            self._raw = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._raw is None or self._raw.shape[0] != scores.shape[0]:
            raise RuntimeError("StepLogprobs saw no logits for this step: use it in watching().")
        raw = torch.log_softmax(self._raw.float(), dim=-1)
        top = scores.topk(min(self.keep, scores.shape[-1]), dim=-1).indices
        self._tokens.append(top)
        self._logprobs.append(raw.gather(-1, top))
        self._raw = None
        return scores

    def transition_logprobs(
        self, sequences: torch.Tensor, beam_indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log-probability of each generated token, shape ``(rows, steps)``, laid out as
        ``compute_transition_scores`` lays it out: column ``j`` belongs to the ``j``-th of the
        last ``steps`` tokens of ``sequences``; positions past a beam's end hold 0."""
        tokens, values = torch.stack(self._tokens, 1), torch.stack(self._logprobs, 1)
        if beam_indices is None:
            beam_indices = torch.arange(sequences.shape[0]).view(-1, 1).expand(-1, len(tokens[0]))
        beam_indices = beam_indices.to(tokens.device)
        ended = beam_indices < 0
        steps = int((~ended).sum(-1).max())
        rows, ended = beam_indices[:, :steps].clamp(min=0), ended[:, :steps]
        chosen = sequences[:, sequences.shape[-1] - steps :].to(tokens.device)
        step = torch.arange(steps, device=tokens.device)
        candidates, logprobs = tokens[rows, step], values[rows, step]
        hit = candidates == chosen[..., None]
        found = torch.where(hit, logprobs, torch.zeros_like(logprobs)).sum(-1)
        found[~hit.any(-1)] = float("nan")  # never expected: a token outside the candidates
        found[ended] = 0.0
        return found


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
