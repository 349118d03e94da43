"""Decoding: ``model.generate`` with two exact shortcuts for beam search, safe to share.

Everything in the package that leans on transformers' generation internals lives here, so
that a transformers upgrade has one place to check. :func:`generate` is what
:func:`~florence_helpers.run` and :func:`~florence_helpers.run_tasks` call. With
``fast_beams=True`` and ``num_beams > 1`` it adds two shortcuts that change no result:

1. :func:`beam_cache`: beam search reorders the KV cache at every step, but the beams of one
   item share their encoder states, so the cross-attention half of the cache needs no
   reordering. transformers copies it anyway (most of a CPU step at 3 beams).
2. A registered attention function (:data:`SHARED_KV_ATTENTION`) that, for the decoder's
   cross-attention, reads each item's keys and values once with the item's beams as query
   positions, instead of once per beam. Everything else it hands to transformers' SDPA.

What they rely on in transformers (5.x), and the tests that guard it:

- ``EncoderDecoderCache`` with ``self_attention_cache`` and ``reorder_cache(beam_idx)``, called
  by beam search; ``generate`` takes a cache passed as ``past_key_values``.
- BART-style attention modules look their attention function up by
  ``config._attn_implementation`` at every forward, through ``AttentionInterface``, and their
  mask function through ``AttentionMaskInterface``; cross-attention modules are the decoder
  layers' ``encoder_attn``.
- Beam rows are laid out item-major (the beams of item 0, then of item 1, ...).

``tests/test_run.py`` and ``tests/test_run_tasks.py`` compare the fast path with plain
``generate`` token by token (greedy, beams, padded prompts, scores);
``tests/test_decoding.py`` runs it from several threads at once and checks that a model's
attention implementation is what it was before.

Thread safety: the attention implementation is a setting of the model's shared text config.
While at least one beam search is running, the config names :data:`SHARED_KV_ATTENTION`; the
first call switches it and the last one restores what was there. The number of beams lives in
a context variable, so each thread's call sees only its own, and a call without one (greedy,
training, another thread's encoder pass) gets plain SDPA from the same function.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .loading import FlorenceModel
from .scores import StepLogprobs

SHARED_KV_ATTENTION = "florence_shared_kv_sdpa"
"""The name under which the shared cross-attention function is registered with transformers."""


_BEAMS: contextvars.ContextVar[int] = contextvars.ContextVar("florence_beams", default=1)


_SWITCH_LOCK = threading.Lock()


# id(text config) -> [calls using the shared attention, the implementation to restore]
_SWITCHED: dict[int, list[Any]] = {}


def generate(
    florence: FlorenceModel,
    inputs: Any,
    with_scores: bool = False,
    *,
    fast_beams: bool = True,
    **generate_kwargs: Any,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """Greedy or beam-search ``generate``; the sequences and, with scores, token log-probs.

    Args:
        florence: The model.
        inputs: Model inputs (``input_ids``/``pixel_values`` or ``encoder_outputs``) with
            their ``attention_mask``.
        with_scores: Also return each generated token's log-probability (fp32, one row per
            input, positions after the start token).
        fast_beams: Use the two exact beam-search shortcuts of this module; False runs plain
            ``model.generate`` (same answers, slower).
        **generate_kwargs: Passed on to ``model.generate`` (``num_beams``, ``max_new_tokens``,
            ``logits_processor``, ...).
    """
    model = florence.model
    static = model.generation_config.cache_implementation is not None
    beams = generate_kwargs.get("num_beams", 1)
    fast = fast_beams and beams > 1 and not static
    if fast:
        generate_kwargs.setdefault("past_key_values", beam_cache())
    # A static cache is compiled by transformers, and a compiled forward ignores a hook added
    # later: there the logits are kept whole (output_logits) and scored after.
    searched = beams if "num_beams" in generate_kwargs else model.generation_config.num_beams
    recorder = StepLogprobs(searched or 1) if with_scores and not static else None
    watching = recorder.watching(model) if recorder else contextlib.nullcontext()
    if with_scores:
        from transformers import LogitsProcessorList

        given = list(generate_kwargs.get("logits_processor") or [])
        generate_kwargs.update(
            return_dict_in_generate=True,
            output_logits=recorder is None,
            logits_processor=LogitsProcessorList(given + ([recorder] if recorder else [])),
        )
    sharing = sharing_cross_attention(model, beams) if fast else contextlib.nullcontext()
    with torch.inference_mode(), sharing, watching:
        outputs = model.generate(**inputs, do_sample=False, **generate_kwargs)
    if not with_scores:
        return outputs, None
    beam_indices = getattr(outputs, "beam_indices", None)
    if recorder is None:
        logprobs = model.compute_transition_scores(
            outputs.sequences,
            tuple(step.float() for step in outputs.logits),
            beam_indices,
            normalize_logits=True,
        )
    else:
        logprobs = recorder.transition_logprobs(outputs.sequences, beam_indices)
    return outputs.sequences, logprobs.float().cpu().numpy()


def for_rows(generate_kwargs: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The generate arguments for a subset of the batch rows.

    Logits processors that keep one state per row (like the tests' forced answers) provide
    ``select_rows(rows)``; they are replaced by their selection.
    """
    processors = generate_kwargs.get("logits_processor")
    if not processors or not any(hasattr(p, "select_rows") for p in processors):
        return dict(generate_kwargs)
    from transformers import LogitsProcessorList

    selected = [p.select_rows(rows) if hasattr(p, "select_rows") else p for p in processors]
    return {**generate_kwargs, "logits_processor": LogitsProcessorList(selected)}


def beam_cache() -> Any:
    """An encoder-decoder KV cache whose beam reordering leaves the cross-attention part alone.

    The beams of one item share their encoder states, so their cross-attention keys and values
    are identical and need no reordering; skipping that copy changes no result.
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    class SharedCrossAttentionCache(EncoderDecoderCache):
        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.self_attention_cache.reorder_cache(beam_idx)

    return SharedCrossAttentionCache(DynamicCache(), DynamicCache())


@contextlib.contextmanager
def sharing_cross_attention(model: Any, beams: int) -> Iterator[None]:
    """Within this block, this thread's decoding steps read cross-attention keys once per item.

    Only models whose text config uses ``"sdpa"`` take the shortcut; any other implementation
    (eager, flash attention) is left alone. Safe to enter from several threads at once.
    """
    config = _text_config(model)
    key = id(config)
    with _SWITCH_LOCK:
        entry = _SWITCHED.get(key)
        if entry is None and beams > 1 and config._attn_implementation == "sdpa":
            _register()
            for module in model.modules():
                if hasattr(module, "encoder_attn"):
                    module.encoder_attn._florence_cross_attention = True
            entry = _SWITCHED[key] = [0, config._attn_implementation]
            config._attn_implementation = SHARED_KV_ATTENTION
        if entry is not None and beams > 1:
            entry[0] += 1
        else:
            entry = None
    if entry is None:
        yield
        return
    token = _BEAMS.set(beams)
    try:
        yield
    finally:
        _BEAMS.reset(token)
        with _SWITCH_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                config._attn_implementation = entry[1]
                del _SWITCHED[key]


def _text_config(model: Any) -> Any:
    config = model.config
    return getattr(config, "text_config", config)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SHARED_KV_ATTENTION, _shared_kv_attention)
    # Without a mask function of its own, an attention name gets no padding mask at all.
    AttentionMaskInterface.register(SHARED_KV_ATTENTION, sdpa_mask)


def _shared_kv_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA, except that a beam-search step's cross-attention reads each item's keys once.

    The beams of an item attend to identical encoder keys and values; reading them once per
    item, with the beams as that item's query positions, gives the same result from a third of
    the memory reads at 3 beams.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    beams = _BEAMS.get()
    rows, heads, steps, dim = query.shape
    if (
        beams == 1
        or steps != 1
        or rows % beams
        or key.shape[0] != rows
        or not getattr(module, "_florence_cross_attention", False)
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    items = rows // beams
    grouped = query.reshape(items, beams, heads, dim).transpose(1, 2)
    mask = attention_mask[::beams] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key[::beams], value[::beams], attn_mask=mask, scale=kwargs.get("scaling")
    )
    # (items, heads, beams, dim) -> (rows, 1, heads, dim), the layout SDPA's wrapper returns.
    return out.permute(0, 2, 1, 3).reshape(rows, 1, heads, dim), None
