"""Training-step speed of florence_helpers.finetune.train, on this machine.

    python benchmarks/training_speed.py              # Florence-2-base architecture, batch 2
    python benchmarks/training_speed.py --batch 4 --steps 5

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from inference_speed import build

from florence_helpers import FlorenceModel, Task
from florence_helpers.adapters import add_lora, trainable_parameters
from florence_helpers.finetune import TrainingConfig, train
from florence_helpers.sample_data import make_shapes_dataset
from florence_helpers.training_data import TrainingSample, read_coco

SETTINGS = ("cached", "LoRA", "frozen", "trainable")
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


def run_setting(name: str, batch: int, steps: int) -> dict[str, float]:
    """Time one setting in this process and return its figures."""
    config = TrainingConfig(batch_size=batch, learning_rate=1e-5)
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
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting:  # a child process: measure one setting, print its figures as JSON
        print(json.dumps(run_setting(args.setting, args.batch, args.steps)))
        return

    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print(
        f"Florence-2-base architecture, random weights, fp32 on CPU; batch {args.batch}, "
        f"targets of ~{TARGET_OBJECTS * 6} tokens, {args.steps} timed steps per setting\n"
    )
    rows = {}
    for name in SETTINGS:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--setting",
                name,
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows[name] = json.loads(child.stdout.strip().splitlines()[-1])

    slowest = rows["trainable"]["seconds"]
    print(
        f"{'setting':10} {'s/step':>8} {'samples/s':>10} {'vs trainable':>13} "
        f"{'peak GiB':>9} {'trained params':>15} {'one-off s':>10}"
    )
    for name, row in rows.items():
        print(
            f"{name:10} {row['seconds']:8.2f} {args.batch / row['seconds']:10.2f} "
            f"{slowest / row['seconds']:12.1f}x {row['peak'] / 2**30:9.1f} "
            f"{row['trainable'] / 1e6:14.1f}M {row['setup']:10.1f}"
        )
    ratio = slowest / rows["cached"]["seconds"]
    print(
        f"\nfrozen + cached vs trainable: {ratio:.1f}x per step "
        f"(goal >= 3x: {'met' if ratio >= 3 else 'NOT met'})"
    )
    print("one-off s: encoding the images once for the cache, plus building the optimizer.")


if __name__ == "__main__":
    main()
