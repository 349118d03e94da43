"""Training-step speed of florence_helpers.finetune.train, on this machine.

    python benchmarks/training_speed.py              # Florence-2-base architecture, batch 2
    python benchmarks/training_speed.py --batch 4 --steps 5
    python benchmarks/training_speed.py --settings cached,LoRA   # a subset

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
which autocasts to bf16 on processors with native bf16 (and stays float32 elsewhere); the
trainable weights are float32 either way.
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
from florence_helpers.adapters import add_lora, trainable_parameters
from florence_helpers.finetune import TrainingConfig, train
from florence_helpers.model import cpu_has_native_bf16
from florence_helpers.sample_data import make_shapes_dataset
from florence_helpers.training_data import TrainingSample, read_coco

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


def run_setting(name: str, precision: str, batch: int, steps: int) -> dict[str, float]:
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
        florence = build("base")
        if name == "LoRA":
            florence = add_lora(florence)
        seconds, setup = measure(florence, data, config, steps)
    return {
        "seconds": seconds,
        "setup": setup,
        "trainable": trainable_parameters(florence.model)[0],
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="samples per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated subset of the settings"
    )
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting:  # a child process: measure one setting, print its figures as JSON
        print(json.dumps(run_setting(args.setting, args.precision, args.batch, args.steps)))
        return

    autocast = cpu_has_native_bf16()  # what TrainingConfig(mixed_precision=None) follows
    default = "bf16 autocast" if autocast else "fp32"
    print(
        f"machine: {processor_name()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; native bf16: {'yes' if cpu_has_native_bf16() else 'no'}, "
        f"so train()'s default here is {default}"
    )
    print(
        f"Florence-2-base architecture, random weights, float32 weights on CPU; batch "
        f"{args.batch}, targets of ~{TARGET_OBJECTS * 6} tokens, {args.steps} timed steps\n"
    )
    rows = {}
    for name in args.settings.split(","):
        for precision in PRECISIONS if autocast else ["fp32"]:
            command = [sys.executable, __file__, "--setting", name, "--precision", precision]
            command += ["--batch", str(args.batch), "--steps", str(args.steps)]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            label = f"{name}, {precision if precision == 'fp32' else default}"
            rows[label] = json.loads(child.stdout.strip().splitlines()[-1])

    slowest = max(row["seconds"] for row in rows.values())
    print(
        f"{'setting':26} {'s/step':>8} {'samples/s':>10} {'vs slowest':>11} "
        f"{'peak GiB':>9} {'trained params':>15} {'one-off s':>10}"
    )
    for label, row in rows.items():
        print(
            f"{label:26} {row['seconds']:8.2f} {args.batch / row['seconds']:10.2f} "
            f"{slowest / row['seconds']:10.1f}x {row['peak'] / 2**30:9.1f} "
            f"{row['trainable'] / 1e6:14.1f}M {row['setup']:10.1f}"
        )
    print("one-off s: encoding the images once for the cache, plus building the optimizer.")


if __name__ == "__main__":
    main()
