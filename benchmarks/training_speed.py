"""Training-step speed of florence_helpers.training.train, on this machine.

    python benchmarks/training_speed.py              # Florence-2-base architecture, batch 2
    python benchmarks/training_speed.py --batch 4 --steps 5
    python benchmarks/training_speed.py --settings cached,LoRA   # a subset
    python benchmarks/training_speed.py --device cuda --settings LoRA --batch 16 \
        [--architecture large]    # ms per LoRA step on a GPU, with its peak memory

No weights are downloaded: the full-size Florence-2-base architecture is built with random
weights, and every target answer has a fixed length (a detection answer for about a dozen
objects), so each step does the work a real checkpoint would. Each setting runs in a fresh
process: one warm-up step, then ``--steps`` timed steps, all through ``train()`` itself. Peak
memory is that process's largest resident set size (model, optimizer state, activations).

Settings:
  cached     vision tower frozen, its features computed once per image (cache_image_features)
  LoRA       as cached, training a rank-8 LoRA adapter instead of every text weight
  frozen     vision tower frozen (requires_grad_(False)), run on every step
  trainable  vision tower trained too

Each setting runs twice: in float32 (``mixed_precision=False``) and with train()'s default,
which autocasts to bf16 on processors with native bf16 (and stays float32 elsewhere) and to
bf16 or fp16 on CUDA; the trainable weights are float32 either way. On CUDA the peak memory is
the GPU's (``torch.cuda.max_memory_allocated``). ``--architecture tiny`` runs the same code in
seconds (the tests use it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from inference_speed import build, processor_name

from florence_helpers import FlorenceModel, Task
from florence_helpers.model.adapters import add_lora, trainable_parameters
from florence_helpers.model.devices import cpu_has_native_bf16
from florence_helpers.training.coco import read_coco
from florence_helpers.training.config import TrainingConfig
from florence_helpers.training.finetune import train
from florence_helpers.training.sample_data import make_shapes_dataset
from florence_helpers.training.samples import TrainingSample

SETTINGS = ("cached", "LoRA", "frozen", "trainable")
PRECISIONS = {"fp32": False, "default": None}  # TrainingConfig.mixed_precision
TARGET_OBJECTS = 12  # objects per target answer: 12 x (label + 4 location tokens) ~ 75 tokens


def samples(count: int, folder: Path) -> list[TrainingSample]:
    """``count`` samples on generated images, each with a fixed-length detection target."""
    dataset = read_coco(make_shapes_dataset(folder, num_images=count, image_size=(768, 768)))
    rng = np.random.default_rng(0)
    fixed = []
    for sample in dataset:
        locations = rng.integers(0, 1000, (TARGET_OBJECTS, 4))
        target = "".join(
            "object" + "".join(f"<loc_{b}>" for b in box) for box in locations.tolist()
        )
        fixed.append(dataclasses.replace(sample, task=Task.OD, prompt="<OD>", target=target))
    return fixed


def measure(
    florence: FlorenceModel, data: list[TrainingSample], config: TrainingConfig, steps: int
) -> tuple[float, float]:
    """Seconds per training step and one-off set-up seconds (image encoding, optimizer)."""
    one_epoch = dataclasses.replace(config, epochs=1)
    train(florence, data[: config.batch_size], one_epoch, progress=False)  # warm-up
    start = time.perf_counter()
    history = train(florence, data[: config.batch_size * steps], one_epoch, progress=False)
    total = time.perf_counter() - start
    return history.seconds / steps, total - history.seconds


def run_setting(
    name: str, precision: str, batch: int, steps: int, device: str, architecture: str
) -> dict[str, float]:
    """Time one setting in this process and return its figures."""
    config = TrainingConfig(
        batch_size=batch, learning_rate=1e-5, mixed_precision=PRECISIONS[precision]
    )
    if name in ("cached", "LoRA"):
        config = dataclasses.replace(config, cache_image_features=True)
    elif name == "trainable":
        config = dataclasses.replace(config, freeze_vision=False)
    with tempfile.TemporaryDirectory() as folder:
        data = samples(batch * steps, Path(folder))
        florence = build(architecture, device)
        if name == "LoRA":
            florence = add_lora(florence)
        if florence.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, setup = measure(florence, data, config, steps)
    if florence.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": seconds,
        "setup": setup,
        "trainable": trainable_parameters(florence.model)[0],
        "peak": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="samples per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated subset of the settings"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--architecture", default="base", help="base, large, or tiny (tests)")
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting:  # a child process: measure one setting, print its figures as JSON
        figures = run_setting(
            args.setting, args.precision, args.batch, args.steps, args.device, args.architecture
        )
        print(json.dumps(figures))
        return

    if args.device == "cuda":
        autocast = True  # train() autocasts to bf16 (fp16 where the GPU lacks bf16) on CUDA
        default = "autocast"
        machine = torch.cuda.get_device_name(0)
    else:
        autocast = cpu_has_native_bf16()  # what TrainingConfig(mixed_precision=None) follows
        default = "bf16 autocast" if autocast else "fp32"
        machine = processor_name()
    print(
        f"machine: {machine}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; native bf16 CPU: {'yes' if cpu_has_native_bf16() else 'no'}, "
        f"so train()'s default on {args.device} is {default}"
    )
    print(
        f"Florence-2-{args.architecture} architecture, random weights, float32 weights on "
        f"{args.device}; batch {args.batch}, targets of ~{TARGET_OBJECTS * 6} tokens, "
        f"{args.steps} timed steps\n"
    )
    rows = {}
    for name in args.settings.split(","):
        for precision in PRECISIONS if autocast else ["fp32"]:
            command = [sys.executable, __file__, "--setting", name, "--precision", precision]
            command += ["--batch", str(args.batch), "--steps", str(args.steps)]
            command += ["--device", args.device, "--architecture", args.architecture]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            label = f"{name}, {precision if precision == 'fp32' else default}"
            rows[label] = json.loads(child.stdout.strip().splitlines()[-1])

    slowest = max(row["seconds"] for row in rows.values())
    print(
        f"{'setting':26} {'ms/step':>9} {'samples/s':>10} {'vs slowest':>11} "
        f"{'peak GiB':>9} {'trained params':>15} {'one-off s':>10}"
    )
    for label, row in rows.items():
        print(
            f"{label:26} {row['seconds'] * 1000:9.0f} {args.batch / row['seconds']:10.2f} "
            f"{slowest / row['seconds']:10.1f}x {row['peak'] / 2**30:9.1f} "
            f"{row['trainable'] / 1e6:14.1f}M {row['setup']:10.1f}"
        )
    print("one-off s: encoding the images once for the cache, plus building the optimizer.")


if __name__ == "__main__":
    main()
