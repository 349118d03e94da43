"""The same Florence-2 weights in OpenVINO, for the inference benchmark's comparison column.

OpenVINO is the runtime CPU users reach for, and optimum-intel cannot export the native
Florence-2, so this converts it by hand, from the very ``FlorenceModel`` the benchmark times:

* ``encode``: pixels and prompt tokens -> the text encoder's output (vision tower, projector,
  image features placed before the prompt, BART encoder);
* ``cross``: the encoder output -> every decoder layer's cross-attention keys and values;
* ``step``: one decoder step with its self-attention keys and values passed in and out.

Beam search runs in NumPy around ``step`` (log-softmax, top-k, cache reordered by beam), and
answers are forced the way the benchmark forces torch's, so both runtimes do the same work.
``check_tokens`` compares greedy answers with torch's ``generate``: the comparison column is
only printed when they are identical.

Benchmark-only: ``pip install -e ".[bench]"`` brings ``openvino``; nothing else imports this.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image
from torch import nn

from florence_helpers import FlorenceModel, Task, build_prompt
from florence_helpers.model.kernels import use_plain_linears


def available() -> bool:
    """Whether ``openvino`` can be imported here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    import openvino

    return openvino.__version__.split("-")[0]


class _Encode(nn.Module):
    """Pixels and the prompt's text tokens -> the BART encoder's last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.model

    def forward(self, pixel_values: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        image = self.model.get_image_features(pixel_values).pooler_output
        text = self.model.get_input_embeddings()(text_ids)
        embeds = torch.cat([image.to(text.dtype), text], dim=1)
        return self.model.language_model.encoder(inputs_embeds=embeds).last_hidden_state


class _Cross(nn.Module):
    """The encoder output -> cross-attention keys and values, (layers, 2, B, heads, S, dim)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layers = model.model.language_model.decoder.layers

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        out = []
        for layer in self.layers:
            attn = layer.encoder_attn
            shape = (*encoder_hidden_states.shape[:2], -1, attn.head_dim)
            key = attn.k_proj(encoder_hidden_states).view(shape).transpose(1, 2)
            value = attn.v_proj(encoder_hidden_states).view(shape).transpose(1, 2)
            out.append(torch.stack([key, value]))
        return torch.stack(out)


class _Step(nn.Module):
    """One decoder step: BART's post-norm layers with the caches as plain tensors.

    ``first=True`` makes the step that starts an answer, which has no self-attention cache:
    OpenVINO 2026.4's CPU plugin, in bf16, returns NaN logits on every later call of a model
    once it has run with an empty (zero-length) cache, so the two are compiled apart.
    """

    def __init__(self, model: nn.Module, first: bool = False) -> None:
        super().__init__()
        self.decoder = model.model.language_model.decoder
        self.lm_head = model.lm_head
        self.first = first

    @staticmethod
    def _attend(attn: nn.Module, query_in, key, value) -> torch.Tensor:
        shape = (*query_in.shape[:2], -1, attn.head_dim)
        query = attn.q_proj(query_in).view(shape).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(query, key, value, scale=attn.scaling)
        return attn.out_proj(out.transpose(1, 2).reshape(query_in.shape))

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, 1)
        position: torch.Tensor,  # (1,), the number of tokens already decoded
        cross: torch.Tensor,  # (layers, 2, B, heads, S, dim)
        past: torch.Tensor | None = None,  # (layers, 2, B, heads, T, dim); None when first
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.decoder
        hidden = decoder.embed_tokens(input_ids)
        hidden = hidden + nn.functional.embedding(position + 2, decoder.embed_positions.weight)
        hidden = decoder.layernorm_embedding(hidden)
        new_past = []
        for index, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            shape = (*hidden.shape[:2], -1, attn.head_dim)
            key = attn.k_proj(hidden).view(shape).transpose(1, 2)
            value = attn.v_proj(hidden).view(shape).transpose(1, 2)
            if past is not None:
                key, value = (
                    torch.cat([past[index, 0], key], 2),
                    torch.cat([past[index, 1], value], 2),
                )
            new_past.append(torch.stack([key, value]))
            hidden = layer.self_attn_layer_norm(hidden + self._attend(attn, hidden, key, value))
            attended = self._attend(layer.encoder_attn, hidden, cross[index, 0], cross[index, 1])
            hidden = layer.encoder_attn_layer_norm(hidden + attended)
            ffn = layer.fc2(layer.activation_fn(layer.fc1(hidden)))
            hidden = layer.final_layer_norm(hidden + ffn)
        return self.lm_head(hidden)[:, -1], torch.stack(new_past)


class OpenVINOFlorence:
    """``florence``'s weights compiled by OpenVINO for the CPU.

    Args:
        florence: the model to convert (fp32 weights are converted; OpenVINO picks its own
            inference precision: bf16 by default on processors with native bf16).
        precision: ``"default"`` (OpenVINO's choice) or ``"f32"``.
    """

    def __init__(self, florence: FlorenceModel, precision: str = "default") -> None:
        import openvino as ov

        # A plain fp32 copy to trace: linear layers that load_model switched to oneDNN's
        # kernel (on AMD processors) go back to nn.functional.linear, which OpenVINO reads.
        model = copy.deepcopy(florence.model).float()
        use_plain_linears(model)
        self.processor = florence.processor
        decoder = model.model.language_model.decoder
        self.layers = len(decoder.layers)
        self.heads = decoder.layers[0].self_attn.num_heads
        self.head_dim = decoder.layers[0].self_attn.head_dim
        self.decoder_start = model.generation_config.decoder_start_token_id
        self.eos = model.generation_config.eos_token_id
        config = {} if precision == "default" else {"INFERENCE_PRECISION_HINT": precision}
        image = Image.new("RGB", (64, 64))
        inputs = self._inputs(image, Task.CAPTION)
        core = ov.Core()
        with torch.no_grad():
            encoded = _Encode(model)(inputs["pixel_values"], inputs["text_ids"])
            cross = _Cross(model)(encoded)
            # Traced with three beams and a few tokens decoded: the shapes it will meet.
            cross = cross.repeat_interleave(3, dim=2)
            past = torch.zeros(self.layers, 2, 3, self.heads, 4, self.head_dim)
            ids = torch.zeros(3, 1, dtype=torch.long)
        self.image_tokens = encoded.shape[1] - inputs["text_ids"].shape[1]
        self.encode = core.compile_model(
            ov.convert_model(
                _Encode(model),
                example_input=(inputs["pixel_values"], inputs["text_ids"]),
                input=[("pixel_values", [1, 3, -1, -1]), ("text_ids", [1, -1])],
            ),
            "CPU",
            config,
        )
        self.cross = core.compile_model(
            ov.convert_model(_Cross(model), example_input=(encoded,)), "CPU", config
        )
        self.first_step = core.compile_model(
            ov.convert_model(
                _Step(model, first=True), example_input=(ids, torch.tensor([0]), cross)
            ),
            "CPU",
            config,
        )
        self.step = core.compile_model(
            ov.convert_model(_Step(model), example_input=(ids, torch.tensor([4]), cross, past)),
            "CPU",
            config,
        )
        self.precision = self.step.get_property("INFERENCE_PRECISION_HINT")

    def _inputs(self, image: Image.Image, task: Task) -> dict[str, torch.Tensor]:
        inputs = self.processor(
            text=build_prompt(task, image.size), images=image, return_tensors="pt"
        )
        ids = inputs["input_ids"]
        image_token = self.processor.tokenizer.convert_tokens_to_ids("<image>")
        return {"pixel_values": inputs["pixel_values"], "text_ids": ids[:, ids[0] != image_token]}

    def _cross(self, image: Image.Image, task: Task, rows: int) -> np.ndarray:
        """Encode the image and prompt; the cross-attention keys and values for ``rows`` rows."""
        inputs = self._inputs(image, task)
        encoded = self.encode([inputs["pixel_values"].numpy(), inputs["text_ids"].numpy()])[0]
        return np.repeat(self.cross([encoded])[0], rows, axis=2)

    def _step(
        self, ids: np.ndarray, position: int, cross: np.ndarray, past: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One decoder step: fp32 logits (a copy: the request reuses its output buffers) and the
        grown self-attention cache (the request's own buffer)."""
        step_inputs = [ids, np.array([position], np.int64), cross]
        if past is None:
            logits, past = self.first_step(step_inputs).values()
        else:
            logits, past = self.step([*step_inputs, past]).values()
        return np.array(logits, np.float32), past

    def logits(self, image: Image.Image, task: Task, tokens: list[int]) -> np.ndarray:
        """The next-token logits at each step of ``tokens`` (one row per token, batch 1)."""
        cross = self._cross(image, task, 1)
        rows, past = [], None
        for position, previous in enumerate([self.decoder_start, *tokens[:-1]]):
            logits, past = self._step(np.array([[previous]], np.int64), position, cross, past)
            rows.append(logits[0])
            past = np.array(past)  # it goes back in as an input
        return np.stack(rows)

    def answer(
        self,
        image: Image.Image,
        task: Task,
        forced: list[int] | None = None,
        num_beams: int = 3,
        max_new_tokens: int = 1024,
    ) -> list[int]:
        """Decode one answer: beam search, or the ``forced`` tokens (with beam search's work).

        Returns the answer's tokens without the decoder start token, as ``generate`` does.
        """
        cross = self._cross(image, task, num_beams)
        tokens = np.full((num_beams, 1), self.decoder_start, np.int64)
        scores = np.zeros(num_beams, np.float32)
        scores[1:] = -np.inf  # all beams start identical: keep one
        steps = len(forced) if forced is not None else max_new_tokens
        past = None
        for position in range(steps):
            logits, past = self._step(tokens[:, -1:], position, cross, past)
            logits -= logits.max(axis=1, keepdims=True)
            logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            if forced is not None:
                mask = np.full_like(logprobs, -np.inf)
                mask[:, forced[position]] = 0.0
                logprobs = logprobs + mask
            total = (scores[:, None] + logprobs).ravel()
            best = np.argpartition(-total, num_beams)[:num_beams]
            best = best[np.argsort(-total[best])]
            beam, token = np.divmod(best, logprobs.shape[1])
            scores = total[best]
            past = past[:, :, beam]  # a copy, as it must be
            tokens = np.concatenate([tokens[beam], token[:, None]], axis=1)
            if forced is None and token[0] == self.eos:
                break
        return tokens[0, 1:].tolist()


def check_tokens(
    florence: FlorenceModel, converted: OpenVINOFlorence, image: Image.Image, new_tokens: int = 12
) -> bool:
    """Whether OpenVINO computes what torch does (both fp32).

    Two checks: the next-token logits at every step of a varied forced answer (location tokens
    at random, so positions, the cache and cross-attention all matter) agree to 1e-3 of their
    range, with the same best token; and the greedy, unforced answer is the same tokens as
    ``generate``'s. (Random weights alone tend to repeat one token, which would check little.)
    """
    tokens = [florence.processor.tokenizer.bos_token_id]
    first_loc = florence.processor.tokenizer.convert_tokens_to_ids("<loc_0>")
    tokens += (first_loc + np.random.default_rng(0).integers(0, 1000, new_tokens)).tolist()
    inputs = florence.processor(
        text=build_prompt(Task.OD, image.size), images=image, return_tensors="pt"
    ).to(florence.device)
    start = torch.tensor([[converted.decoder_start, *tokens[:-1]]], device=florence.device)
    with torch.inference_mode():
        expected = florence.model(**inputs, decoder_input_ids=start).logits[0].float().cpu().numpy()
        greedy = florence.model.generate(
            **inputs, num_beams=1, do_sample=False, max_new_tokens=new_tokens
        )[0, 1:].tolist()
    mine = converted.logits(image, Task.OD, tokens)
    scale = np.abs(expected).max()
    close = np.abs(mine - expected).max() <= 1e-3 * scale
    same_best = (mine.argmax(-1) == expected.argmax(-1)).all()
    answer = converted.answer(image, Task.OD, num_beams=1, max_new_tokens=new_tokens)
    return bool(close and same_best and answer[: len(greedy)] == greedy)
