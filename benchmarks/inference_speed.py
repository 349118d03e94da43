"""Inference speed of florence_helpers against the seed notebooks' loop, on this machine.

    python benchmarks/inference_speed.py            # Florence-2-base architecture, CPU
    python benchmarks/inference_speed.py --large    # also Florence-2-large (slow on a CPU)
    python benchmarks/inference_speed.py --architectures tiny   # every section in seconds (tests)
    python benchmarks/inference_speed.py --device cuda --dtype bf16 [--compile]
        [--architectures base,large] [--batches 1,8,64,256]   # the device report (a GPU)

No weights are downloaded: the full-size architecture is built with random weights, and every
answer is forced to a fixed, realistic number of tokens, so each run does exactly the work a
real checkpoint would do on a busy street photo. All ratios are measured in this one run.

Each model is measured in fp32 and in the dtype ``load_model(dtype="auto")`` picks on this
machine (bf16 on processors with native bf16, else fp32 again).

Sections:
  1. per-answer times, fp32 and auto side by side: a 14-token caption and an 80-token OD
     answer at 3 beams, image encoding included, medians of interleaved rounds; beside them
     the same weights in OpenVINO (f32 and its default precision), measured in the same run
     when ``openvino`` is installed (the ``bench`` extra) and it computes what torch does
  2. all 15 tasks on one 768x768 image: the seed-style loop (fp32) vs run_tasks (both dtypes)
  3. per-stage costs in the auto dtype: preprocessing, encoders, ms per decoded token
  4. throughput (images/s) against batch size for <CAPTION> and <OD>, auto dtype
  5. the vision encoder's GFLOP/s against the matmul rate of its own linear layers' shapes in
     the same dtype (median of several timed rounds)
  6. peak memory
  7. the speed goals of issue #29 against this run's figures (absolute ones on AMX machines)

With ``--device`` (or ``--device-report``) it prints the device report instead, for a GPU:
one caption at batch 1 (latency), images/s for ``<CAPTION>`` (14 tokens) and ``<OD>`` (80) at
each batch size, greedy and 3 beams, all 15 tasks with ``run_tasks`` against the seed's loop on
the same device, and the peak device memory of each, against the GPU goals of issue #28. The
``tiny`` architecture runs the same code in seconds on a CPU (the tests use it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from florence_helpers import TASKS, FlorenceModel, Task, build_prompt, run
from florence_helpers.model import decoding
from florence_helpers.model.devices import cpu_has_native_bf16, resolve_dtype
from florence_helpers.model.inference import run_tasks
from florence_helpers.model.kernels import (
    cpuinfo_field,
    onednn_beats_mkl,
    use_onednn_linears,
    use_plain_linears,
)
from florence_helpers.model.loading import vision_tower
from florence_helpers.testing import ForcedAnswer, build_processor, build_random_model

try:  # run as a script: benchmarks/ is on the path
    import openvino_runtime
except ImportError:  # imported as benchmarks.inference_speed (the tests)
    from benchmarks import openvino_runtime

# Answer length in tokens (from <s> to </s>) per task, as Florence-2 writes them for a
# 1600x1066 street photo like the seed sample's; polygons and dense captions are the longest.
ANSWER_TOKENS = {
    Task.CAPTION: 14,
    Task.DETAILED_CAPTION: 40,
    Task.MORE_DETAILED_CAPTION: 90,
    Task.OCR: 30,
    Task.OCR_WITH_REGION: 120,
    Task.OD: 80,
    Task.DENSE_REGION_CAPTION: 160,
    Task.REGION_PROPOSAL: 70,
    Task.CAPTION_TO_PHRASE_GROUNDING: 30,
    Task.OPEN_VOCABULARY_DETECTION: 14,
    Task.REFERRING_EXPRESSION_SEGMENTATION: 200,
    Task.REGION_TO_SEGMENTATION: 180,
    Task.REGION_TO_CATEGORY: 8,
    Task.REGION_TO_DESCRIPTION: 14,
    Task.REGION_TO_OCR: 10,
}
# Goals on a 2-core CPU with AMX (issue #29); elsewhere only the ratios apply.
AMX_GOALS = {Task.CAPTION: 0.8, Task.OD: 1.6, "decoder step ms": 12.0}
TEXT = "a red car parked on the street"
REGION = (200, 150, 500, 600)

ARCHITECTURES = {
    "base": {
        "vision": {
            "embed_dim": [128, 256, 512, 1024],
            "num_heads": [4, 8, 16, 32],
            "num_groups": [4, 8, 16, 32],
            "projection_dim": 768,
        },
        "text": {
            "d_model": 768,
            "encoder_layers": 6,
            "decoder_layers": 6,
            "encoder_attention_heads": 12,
            "decoder_attention_heads": 12,
            "encoder_ffn_dim": 3072,
            "decoder_ffn_dim": 3072,
        },
    },
    "large": {
        "vision": {
            "embed_dim": [256, 512, 1024, 2048],
            "num_heads": [8, 16, 32, 64],
            "num_groups": [8, 16, 32, 64],
            "projection_dim": 1024,
        },
        "text": {
            "d_model": 1024,
            "encoder_layers": 12,
            "decoder_layers": 12,
            "encoder_attention_heads": 16,
            "decoder_attention_heads": 16,
            "encoder_ffn_dim": 4096,
            "decoder_ffn_dim": 4096,
        },
    },
}
# A stand-in with the same code paths, for testing this script in seconds.
ARCHITECTURES["tiny"] = {
    "vision": {
        "embed_dim": [8, 16, 16, 32],
        "num_heads": [1, 2, 2, 4],
        "num_groups": [1, 2, 2, 4],
        "projection_dim": 32,
        "depths": [1, 1, 1, 1],
    },
    "text": {
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
    },
}
VOCAB = 51328  # Florence-2's vocabulary with <image>, padded to a multiple of 64
# Goals on one H200, base architecture, bf16, 3 beams (issue #28).
GPU_GOALS = {"caption images/s": 500.0, "caption latency ms": 80.0, "15 tasks s": 1.0}


def build(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FlorenceModel:
    """The architecture with random weights and the 768-pixel processor, on ``device``."""
    spec = ARCHITECTURES[name]
    processor = build_processor(768)
    vision = {"depths": [1, 1, 9, 1], "window_size": 12, **spec["vision"]}
    model = build_random_model(processor, vision=vision, text=spec["text"], vocab_size=VOCAB)
    model.config._attn_implementation = "sdpa"
    if torch.device(device).type == "cpu" and onednn_beats_mkl():
        use_onednn_linears(model)  # as load_model does on this CPU
    model = model.to(device=device, dtype=dtype).eval()
    return FlorenceModel(model=model, processor=processor, model_id=f"random {name}")


@contextlib.contextmanager
def plain_linears(model: torch.nn.Module) -> Iterator[None]:
    """Within this block, linear layers run as in plain transformers (the seed notebooks)."""
    switched = use_plain_linears(model)
    try:
        yield
    finally:
        if switched:
            use_onednn_linears(model)


def forced(florence: FlorenceModel, lengths: list[int]) -> Any:
    """Force each row's answer to exactly ``lengths[i]`` tokens (<s>, locations, </s>)."""
    tokenizer = florence.processor.tokenizer
    first_loc = tokenizer.convert_tokens_to_ids("<loc_0>")
    rng = np.random.default_rng(0)
    rows = [
        [
            tokenizer.bos_token_id,
            *(first_loc + rng.integers(0, 1000, n - 2)).tolist(),
            tokenizer.eos_token_id,
        ]
        for n in lengths
    ]
    from transformers import LogitsProcessorList

    return LogitsProcessorList([ForcedAnswer(rows, tokenizer.eos_token_id)])


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakMemory:
        self.peak = self.start = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls, in seconds (a GPU's queued work included)."""
    best = float("inf")
    for _ in range(repeat):
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def median_time(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Median wall time of ``repeat`` calls, in seconds."""
    times = [timed(fn) for _ in range(repeat)]
    return float(np.median(times))


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class DeviceMemory:
    """Peak memory of the block: the GPU's allocations on CUDA, the process's RSS on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> DeviceMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._cpu = PeakMemory().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._cpu.__exit__(*exc)
            self.peak = self._cpu.peak


def requests() -> list[tuple[Task, str | tuple | None]]:
    out = []
    for spec in TASKS.values():
        extra = (
            TEXT if spec.input.value == "text" else REGION if spec.input.value == "region" else None
        )
        out.append((spec.task, extra))
    return out


def processor_name() -> str:
    """The CPU's model name as the system reports it."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def in_dtype(florence: FlorenceModel, dtype: torch.dtype) -> FlorenceModel:
    """The same weights in ``dtype`` (a copy unless it already is)."""
    if florence.dtype == dtype:
        return florence
    model = copy.deepcopy(florence.model).to(dtype)
    return FlorenceModel(model=model, processor=florence.processor, model_id=florence.model_id)


def forced_tokens(florence: FlorenceModel, length: int) -> list[int]:
    """The token ids ``forced(florence, [length])`` makes ``generate`` write."""
    return forced(florence, [length])[0].token_ids[0]


def section_per_answer(
    models: dict[str, FlorenceModel],
    image: Image.Image,
    figures: dict[str, float],
    rounds: int = 3,
    converted: dict[str, Any] | None = None,
) -> None:
    """Seconds per answer for each model and OpenVINO's ``f32`` and ``default`` conversions of
    the fp32 one (``converted``, if already made: ``{"f32": ..., "default": ...}``)."""
    print("\n## 1. Per answer, one image, 3 beams, image encoding included")
    runtimes: dict[str, Callable[[Task], Any]] = {}
    for name, florence in models.items():
        runtimes[name] = functools.partial(_torch_answer, florence, image)
    fp32 = models["fp32"]
    if openvino_runtime.available():
        converted = dict(converted or {})
        for precision in ("f32", "default"):
            if precision in converted:
                continue
            start = time.perf_counter()
            converted[precision] = openvino_runtime.OpenVINOFlorence(fp32, precision)
            print(
                f"OpenVINO {openvino_runtime.version()}, {precision} "
                f"(runs in {converted[precision].precision}): converted and compiled "
                f"in {time.perf_counter() - start:.0f} s"
            )
        same = openvino_runtime.check_tokens(fp32, converted["f32"], image)
        print(
            f"OpenVINO f32 = torch fp32 (logits to 1e-3, greedy tokens): {'yes' if same else 'NO'}"
        )
        if same:
            for precision, model in converted.items():
                label = "OpenVINO f32" if precision == "f32" else "OpenVINO default"
                runtimes[label] = functools.partial(_openvino_answer, model, fp32, image)
    else:
        print("OpenVINO is not installed (pip install -e '.[bench]'): no comparison column")
    print(f"{'':<28}" + "".join(f"{name:>18}" for name in runtimes))
    for task in (Task.CAPTION, Task.OD):
        times: dict[str, list[float]] = {name: [] for name in runtimes}
        for answer in runtimes.values():
            answer(task)  # warm-up
        for _ in range(rounds):  # interleaved, so a slow moment hits every runtime alike
            for name, answer in runtimes.items():
                times[name].append(timed(functools.partial(answer, task)))
        label = f"{task.value} ({ANSWER_TOKENS[task]} tokens)"
        row = ""
        for name, samples in times.items():
            figures[f"{name} {task.name}"] = float(np.median(samples))
            row += f"{np.median(samples):>16.2f} s"
        print(f"{label:<28}{row}")
    print(f"medians of {rounds} interleaved rounds; OpenVINO answers forced to the same tokens")


def _torch_answer(florence: FlorenceModel, image: Image.Image, task: Task) -> Any:
    return run(
        florence,
        image,
        task,
        num_beams=3,
        progress=False,
        logits_processor=forced(florence, [ANSWER_TOKENS[task]]),
    )


def _openvino_answer(
    converted: Any, florence: FlorenceModel, image: Image.Image, task: Task
) -> list[int]:
    tokens = forced_tokens(florence, ANSWER_TOKENS[task])
    answer = converted.answer(image, task, forced=tokens, num_beams=3)
    if answer != tokens:
        raise RuntimeError("OpenVINO did not write the forced answer")
    return answer


def seed_loop(florence: FlorenceModel, image: Image.Image, tasks: int | None = None) -> None:
    """What the seed notebooks do: one full call per task, the image re-encoded each time."""
    processor, model = florence.processor, florence.model
    for task, extra in requests()[:tasks]:
        prompt = build_prompt(
            task,
            image.size,
            text=extra if isinstance(extra, str) else None,
            region=extra if isinstance(extra, tuple) else None,
        )
        inputs = processor(text=prompt, images=image, return_tensors="pt").to(model.device)
        ids = model.generate(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"].to(model.dtype),
            max_new_tokens=1024,
            num_beams=3,
            do_sample=False,
            logits_processor=forced(florence, [ANSWER_TOKENS[task]]),
        )
        text = processor.batch_decode(ids, skip_special_tokens=False)[0]
        processor.post_process_generation(text, task=task.value, image_size=image.size)


def fast_path(florence: FlorenceModel, image: Image.Image, fast_beams: bool = True) -> None:
    """All 15 tasks with run_tasks: the image encoded once, answers decoded in a few batches."""
    tasks = requests()
    run_tasks(
        florence,
        image,
        [(t, e) if e is not None else t for t, e in tasks],
        num_beams=3,
        fast_beams=fast_beams,
        logits_processor=forced(florence, [ANSWER_TOKENS[task] for task, _ in tasks]),
    )


def section_all_tasks(
    models: dict[str, FlorenceModel], image: Image.Image, memory: dict, figures: dict[str, float]
) -> None:
    print("\n## 2. All 15 tasks on one 768x768 image (3 beams, answers of realistic length)")
    lengths = [ANSWER_TOKENS[task] for task, _ in requests()]
    florence = models["fp32"]

    with torch.inference_mode(), plain_linears(florence.model), PeakMemory() as seed_memory:
        seed = timed(functools.partial(seed_loop, florence, image))
    memory["seed loop, 15 tasks"] = seed_memory.peak
    print(
        f"seed-style loop, fp32:    {seed:6.1f} s   ({sum(lengths)} answer tokens, "
        "15 encodings, plain transformers' linear layers)"
    )
    plain_beams = timed(functools.partial(fast_path, florence, image, fast_beams=False))
    for name, each in models.items():
        with PeakMemory() as fast_memory:
            fast = timed(functools.partial(fast_path, each, image))
        memory[f"run_tasks, 15 tasks, {name}"] = fast_memory.peak
        print(f"run_tasks, {name + ':':<14} {fast:6.1f} s   ({seed / fast:.1f}x the seed loop)")
        if name == "fp32":
            print(f"  fast_beams=False, fp32: {plain_beams:6.1f} s   (plain generate)")
    figures["15 tasks vs seed loop"] = seed / fast


def section_stages(florence: FlorenceModel, image: Image.Image, figures: dict[str, float]) -> None:
    print(f"\n## 3. Per-stage costs (one image, batch 1, {florence.dtype})")
    processor, model = florence.processor, florence.model
    prompt = build_prompt("OD", image.size)
    preprocess = timed(lambda: processor(text=prompt, images=image, return_tensors="pt"), 3)
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(florence.dtype)
    with torch.inference_mode():
        vision = timed(lambda: model.get_image_features(pixel_values), 2)
        features = model.get_image_features(pixel_values).pooler_output
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        embeds[inputs["input_ids"] == model.config.image_token_id] = features.reshape(
            -1, features.shape[-1]
        )
        encoder = model.get_encoder()
        text = timed(
            lambda: encoder(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]), 3
        )
        encoded = encoder(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        per_token = {}
        for beams in (1, 3):
            # The difference between a long and a short answer is the cost of decoding alone.
            long, short = (
                timed(
                    functools.partial(
                        run_generate, florence, encoded, inputs["attention_mask"], beams, n
                    )
                )
                for n in (66, 2)
            )
            per_token[beams] = (long - short) / 64
    tokens = inputs["input_ids"].shape[1]
    figures["decoder step ms"] = per_token[3] * 1000
    print(f"preprocessing (resize, normalise, tokenise): {preprocess * 1000:8.1f} ms")
    print(f"vision encoder (DaViT):                      {vision * 1000:8.1f} ms")
    print(f"text encoder ({tokens} tokens):                  {text * 1000:8.1f} ms")
    print(f"decoding, greedy:                            {per_token[1] * 1000:8.1f} ms per token")
    print(f"decoding, 3 beams:                           {per_token[3] * 1000:8.1f} ms per token")


def run_generate(
    florence: FlorenceModel, encoded: Any, mask: torch.Tensor, beams: int, tokens: int
) -> Any:
    """Decode one answer of exactly ``tokens`` tokens from precomputed encoder outputs.

    Through the decoding path ``run`` uses (the beam cache and shared cross-attention).
    """
    inputs = {
        # A shallow copy: generate() expands encoder outputs for the beams in place, so reusing
        # one object would triple its batch at every call.
        "encoder_outputs": copy.copy(encoded),
        "attention_mask": mask,
    }
    return decoding.generate(
        florence,
        inputs,
        num_beams=beams,
        max_new_tokens=1024,
        logits_processor=forced(florence, [tokens]),
    )[0]


def batch_call(
    florence: FlorenceModel, images: list[Image.Image], task: Task, **kwargs: Any
) -> Callable[[], Any]:
    """``run`` on ``images`` as one batch, every answer forced to the task's realistic length."""
    return functools.partial(
        run,
        florence,
        images,
        task,
        batch_size=len(images),
        progress=False,
        logits_processor=forced(florence, [ANSWER_TOKENS[task]] * len(images)),
        **kwargs,
    )


def section_throughput(florence: FlorenceModel, batches: list[int]) -> None:
    print(f"\n## 4. Throughput against batch size (run(), 3 beams, {florence.dtype})")
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (768, 768, 3), dtype=np.uint8))
        for _ in range(max(batches))
    ]
    print(f"{'task':<10}" + "".join(f"{f'batch {b}':>12}" for b in batches))
    for task in (Task.CAPTION, Task.OD):
        row = []
        for size in batches:
            call = batch_call(florence, images[:size], task)
            row.append(size / timed(call))
        print(f"{task.name:<10}" + "".join(f"{v:>8.2f} i/s" for v in row))


def section_flops(
    models: dict[str, FlorenceModel], image: Image.Image, figures: dict[str, float]
) -> None:
    print("\n## 5. Vision encoder against the matmul rate of its own shapes, same dtype")
    inputs = models["fp32"].processor(text="<OD>", images=image, return_tensors="pt")
    counter = FlopCounterMode(display=False)  # it counts aten's linear, not oneDNN's
    with torch.inference_mode(), plain_linears(models["fp32"].model), counter:
        models["fp32"].model.get_image_features(inputs["pixel_values"])
    flops = counter.get_total_flops()
    shapes = linear_shapes(models["fp32"], inputs["pixel_values"])
    print(
        f"{flops / 1e9:.0f} GFLOP per 768x768 image, "
        f"{sum(2 * m * k * n for m, k, n in shapes) / flops:.0%} of it in "
        f"{len(shapes)} linear layers"
    )
    last = list(models)[-1]
    for name, florence in models.items():
        own = matmul_rate_of(shapes, florence.dtype, linear_kernel(florence))
        square = matmul_rate(florence.dtype)
        pixel_values = inputs["pixel_values"].to(florence.dtype)
        print(
            f"{name}: matmul rate of the encoder's linear shapes {own:6.1f} GFLOP/s "
            f"(median of 5 rounds; a 2048x2048 matmul: {square:6.1f})"
        )
        encode = functools.partial(florence.model.get_image_features, pixel_values)
        with torch.inference_mode():
            encode()
            rows = [("eager", median_time(encode, 3))]
            if name == last:  # compile the dtype load_model would use
                start = time.perf_counter()
                vision_tower(florence.model).compile()  # what load_model(compile=True) does
                encode()
                print(f"  (compilation took {time.perf_counter() - start:.0f} s)")
                rows.append(("compiled", median_time(encode, 3)))
        for label, seconds in rows:
            share = flops / seconds / 1e9 / own
            figures[f"vision {name} {label} share"] = share
            print(
                f"  vision encoder, {label + ':':<9} {seconds:5.2f} s, "
                f"{flops / seconds / 1e9:6.1f} GFLOP/s = {share:4.0%} of its shapes' matmul rate"
            )


def linear_shapes(
    florence: FlorenceModel, pixel_values: torch.Tensor
) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every linear layer the vision encoder runs on one image."""
    shapes = []

    def record(module: torch.nn.Linear, args: tuple) -> None:
        shapes.append(
            (args[0].numel() // module.in_features, module.in_features, module.out_features)
        )

    hooks = [
        module.register_forward_pre_hook(record)
        for module in vision_tower(florence.model).modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        with torch.inference_mode():
            florence.model.get_image_features(pixel_values.to(florence.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def linear_kernel(florence: FlorenceModel) -> Callable[..., torch.Tensor]:
    """The kernel ``florence``'s linear layers run on: oneDNN's where load_model switched them
    (fp32 on AMD processors), else ``nn.functional.linear``."""
    switched = any("forward" in vars(m) for m in florence.model.modules())
    if switched and florence.dtype == torch.float32:
        return lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return torch.nn.functional.linear


def matmul_rate_of(
    shapes: list[tuple[int, int, int]],
    dtype: torch.dtype,
    linear: Callable[..., torch.Tensor] = torch.nn.functional.linear,
    rounds: int = 5,
) -> float:
    """GFLOP/s of the linear products ``shapes`` in ``dtype``: median of ``rounds`` timed rounds.

    The rate swings by up to 3x within seconds on some processors (AMX), so one timing of one
    square product says little about the layers a model really runs.
    """
    operands = {
        shape: (
            torch.randn(shape[0], shape[1], dtype=dtype),
            torch.randn(shape[2], shape[1], dtype=dtype),
        )
        for shape in set(shapes)
    }
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def products() -> None:
        for shape in shapes:
            linear(*operands[shape])

    with torch.inference_mode():
        products()
        return flops / median_time(products, rounds) / 1e9


def matmul_rate(dtype: torch.dtype, n: int = 2048) -> float:
    """GFLOP/s of a plain n x n matrix product in ``dtype``, median of 5."""
    a, b = (torch.randn(n, n, dtype=dtype) for _ in range(2))
    product = functools.partial(torch.matmul, a, b)
    product()
    return 2 * n**3 / median_time(product, 5) / 1e9


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty elsewhere)."""
    return set(cpuinfo_field("flags").split())


def section_goals(figures: dict[str, float], auto: str, amx: bool) -> None:
    """Every goal of issue #29 against this run's figures (absolute ones on AMX only)."""
    print(f"\n## 7. Goals ({'AMX: absolute goals and ratios' if amx else 'no AMX: ratios only'})")

    def verdict(label: str, value: float | None, goal: float, sense: str, unit: str = "") -> None:
        if value is None:
            print(f"  {label}: not measured (goal {sense} {goal:g}{unit})")
            return
        met = value <= goal if sense == "<=" else value >= goal
        result = "PASS" if met else "FAIL"
        print(f"  {label}: {value:.3g}{unit} (goal {sense} {goal:.3g}{unit}): {result}")

    verdict(
        "vision encoder, eager, share of its shapes' matmul rate",
        figures.get(f"vision {auto} eager share"),
        0.5,
        ">=",
    )
    for task in (Task.CAPTION, Task.OD):
        mine = figures.get(f"{auto} {task.name}")
        other = figures.get(f"OpenVINO default {task.name}")
        if other:
            verdict(f"{task.name}, {auto}, vs half OpenVINO's default", mine, other / 2, "<=", " s")
        else:
            print(f"  {task.name}: no OpenVINO figure to compare with")
        if amx:
            verdict(f"{task.name}, {auto}, absolute (AMX)", mine, AMX_GOALS[task], "<=", " s")
        other32 = figures.get(f"OpenVINO f32 {task.name}")
        if other32:
            fp32 = figures.get(f"fp32 {task.name}")
            verdict(f"{task.name}, fp32, vs OpenVINO f32", fp32, other32, "<=", " s")
    step = figures.get("decoder step ms")
    if amx:
        verdict("3-beam decoder step (AMX)", step, AMX_GOALS["decoder step ms"], "<=", " ms")
    else:
        shown = f"{step:.1f} ms" if step is not None else "not measured"
        print(f"  3-beam decoder step: {shown} (the 12 ms goal is for AMX machines)")
    verdict(
        "all 15 tasks, run_tasks vs the fp32 seed loop",
        figures.get("15 tasks vs seed loop"),
        8.0,
        ">=",
        "x",
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return processor_name()


def device_report(args: argparse.Namespace) -> dict[str, Any]:
    """The device report: latency, throughput against batch size, 15 tasks, peak memory."""
    import transformers

    from florence_helpers.model.loading import compile_for_speed

    device = torch.device(args.device or "cuda")
    dtype = resolve_dtype(args.dtype, device)
    batches = [int(b) for b in args.batches.split(",")]
    print(
        f"# Florence-2 device report: {device_name(device)}\n"
        f"torch {torch.__version__}, transformers {transformers.__version__}, {dtype}, "
        f"{'compiled (static cache, vision encoder compiled)' if args.compile else 'eager'}"
        + (
            "\nsmoke run (--quick): one timing per figure"
            + ("" if args.compile else ", without warm-up")
            + ": not figures to quote"
            if args.quick
            else ""
        )
    )
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 255, (768, 768, 3), dtype=np.uint8))
        for _ in range(max(batches))
    ]
    figures: dict[str, Any] = {}
    for name in (args.architectures or "base,large").split(","):
        florence = build(name, device, dtype)
        if args.compile:
            compile_for_speed(florence.model)
        print(f"\n## Florence-2-{name} architecture, random weights")
        # A smoke run (--quick) warms up only what compiles on its first call.
        warm = args.compile or not args.quick
        figures[name] = {
            "latency": _latency(florence, images[0], rounds=1 if args.quick else 5, warm=warm),
            "throughput": _throughput(florence, images, batches, warm=warm),
            "tasks": _tasks_on_device(
                florence, images[0], seed_tasks=2 if args.quick else None, warm=warm
            ),
        }
        _verdicts(name, figures[name], dtype)
        del florence
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return figures


def _latency(
    florence: FlorenceModel, image: Image.Image, rounds: int = 5, warm: bool = True
) -> dict[str, float]:
    """One <CAPTION> of 14 tokens at batch 1, image encoding included: median of ``rounds``
    (after one warm-up call, unless ``warm`` is false)."""
    out = {}
    for beams in (1, 3):
        call = functools.partial(
            run,
            florence,
            image,
            Task.CAPTION,
            num_beams=beams,
            progress=False,
            logits_processor=forced(florence, [ANSWER_TOKENS[Task.CAPTION]]),
        )
        if warm:
            call()  # warm-up (and compilation)
        out[f"{beams} beam(s)"] = median_time(call, rounds) * 1000
        print(f"one caption at batch 1, {beams} beam(s): {out[f'{beams} beam(s)']:8.1f} ms")
    return out


def _throughput(
    florence: FlorenceModel, images: list[Image.Image], batches: list[int], warm: bool = True
) -> dict[str, dict[str, float]]:
    """images/s (and peak memory) per task, beams and batch size, preprocessing included
    (each after a warm-up call, unless ``warm`` is false)."""
    table: dict[str, dict[str, float]] = {}
    print(f"{'images/s':<18}" + "".join(f"{f'batch {b}':>13}" for b in batches))
    for task in (Task.CAPTION, Task.OD):
        for beams in (1, 3):
            row, memory = {}, {}
            for size in batches:
                call = batch_call(florence, images[:size], task, num_beams=beams)
                if warm:
                    call()  # warm-up: a new batch size may compile again
                with DeviceMemory(florence.device) as used:
                    row[size] = size / timed(call)
                memory[size] = used.peak / 2**30
            label = f"{task.name}, {beams} beam(s)"
            table[label] = row
            table[f"{label}, peak GiB"] = memory
            print(f"{label:<18}" + "".join(f"{row[b]:>13.1f}" for b in batches))
            print(f"{'  peak GiB':<18}" + "".join(f"{memory[b]:>13.2f}" for b in batches))
    return table


def _tasks_on_device(
    florence: FlorenceModel, image: Image.Image, seed_tasks: int | None = None, warm: bool = True
) -> dict[str, float]:
    """All 15 tasks: run_tasks against the seed's loop (its first ``seed_tasks`` only, if given),
    run_tasks after a warm-up call unless ``warm`` is false."""
    with torch.inference_mode():
        if warm:
            fast_path(florence, image)
        with DeviceMemory(florence.device) as fast_memory:
            fast = timed(functools.partial(fast_path, florence, image))
        with DeviceMemory(florence.device) as seed_memory:
            seed = timed(functools.partial(seed_loop, florence, image, seed_tasks))
    if seed_tasks is not None:  # a smoke run: the loop's first tasks only, no ratio
        print(
            f"15 tasks: run_tasks {fast:.2f} s ({fast_memory.peak / 2**30:.2f} GiB), seed loop "
            f"over its first {seed_tasks} tasks only (--quick) {seed:.2f} s"
        )
        return {"run_tasks s": fast, "seed loop s": float("nan")}
    print(
        f"15 tasks: run_tasks {fast:.2f} s ({fast_memory.peak / 2**30:.2f} GiB), seed loop "
        f"{seed:.2f} s ({seed_memory.peak / 2**30:.2f} GiB): {seed / fast:.1f}x"
    )
    return {"run_tasks s": fast, "seed loop s": seed}


def _verdicts(name: str, figures: dict[str, Any], dtype: torch.dtype) -> None:
    """The GPU goals of issue #28, for the base architecture."""
    if name != "base":
        return
    best = max(figures["throughput"]["CAPTION, 3 beam(s)"].values())
    checks = [
        ("caption images/s at the best batch, 3 beams", best, ">=", GPU_GOALS["caption images/s"]),
        (
            "one caption at batch 1, 3 beams, ms",
            figures["latency"]["3 beam(s)"],
            "<=",
            GPU_GOALS["caption latency ms"],
        ),
        (
            "all 15 tasks, run_tasks, s",
            figures["tasks"]["run_tasks s"],
            "<=",
            GPU_GOALS["15 tasks s"],
        ),
    ]
    print(f"\ngoals (one H200, base, bf16, 3 beams; this run: {dtype}):")
    for label, value, sense, goal in checks:
        met = value >= goal if sense == ">=" else value <= goal
        print(f"  {label}: {value:.2f} (goal {sense} {goal:g}): {'PASS' if met else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", action="store_true", help="also run the large architecture")
    parser.add_argument("--batches", default=None, help="batch sizes for the throughput table")
    parser.add_argument("--device", help="run the device report on this device (e.g. cuda)")
    parser.add_argument(
        "--device-report", action="store_true", help="the device report on --device (or cuda)"
    )
    parser.add_argument("--dtype", default="auto", help="the device report's dtype (auto, bf16…)")
    parser.add_argument("--compile", action="store_true", help="as load_model(compile=True)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="device report as a smoke run: one timing per figure, no warm-up unless "
        "compiled, the seed loop cut short",
    )
    parser.add_argument(
        "--architectures",
        help="base, large or tiny, comma-separated (default: base; base,large on a GPU)",
    )
    args = parser.parse_args()
    if args.device or args.device_report:
        args.batches = args.batches or "1,8,64,256"
        device_report(args)
        return
    args.batches = args.batches or "1,2"
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    auto = resolve_dtype("auto", torch.device("cpu"))
    print(
        f"# Florence-2 inference speed: {processor_name()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, CPU\n"
        f"native bf16: {'yes' if cpu_has_native_bf16() else 'no'}, "
        f"AMX: {'yes' if 'amx_bf16' in cpu_flags() else 'no'}, so "
        f"load_model(dtype='auto') picks {auto} here; fp32 linear layers run on "
        f"{'oneDNN (faster than MKL on this CPU)' if onednn_beats_mkl() else 'MKL'}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (768, 768, 3), dtype=np.uint8))
    names = args.architectures or ("base,large" if args.large else "base")
    for name in names.split(","):
        print(f"\n# Florence-2-{name} architecture, random weights")
        memory: dict[str, int] = {}
        with PeakMemory() as build_memory:
            florence = build(name)
        memory["model built (fp32)"] = build_memory.peak
        models = {"fp32": florence}
        if auto != torch.float32:
            models["auto (bf16)" if auto == torch.bfloat16 else "auto"] = in_dtype(florence, auto)
        fastest = list(models.values())[-1]
        figures: dict[str, float] = {}
        section_per_answer(models, image, figures)
        section_all_tasks(models, image, memory, figures)
        section_stages(fastest, image, figures)
        section_throughput(fastest, [int(b) for b in args.batches.split(",")])
        section_flops(models, image, figures)  # compiles the vision encoder: keep it last
        print("\n## 6. Peak memory (resident, whole process)")
        for label, peak in memory.items():
            print(f"{label:<32} {peak / 2**30:6.2f} GiB")
        section_goals(figures, list(models)[-1], "amx_bf16" in cpu_flags())


if __name__ == "__main__":
    main()
