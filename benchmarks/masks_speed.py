"""Seconds per image for masks from words: Florence-2 finds the boxes, SAM 2 draws the masks.

    python benchmarks/masks_speed.py                     # Florence-2-base + SAM 2.1 tiny, small
    python benchmarks/masks_speed.py --architectures tiny   # the same code in seconds (tests)

No weights are downloaded: the full-size architectures are built with random weights (SAM 2.1
Hiera tiny and small: the stage depths and global-attention blocks of Meta's configurations),
and Florence-2's OD answer is forced to a fixed number of tokens holding a fixed number of
boxes, so each run does the work real checkpoints would on a street photo. All figures are
measured in this one run, on a 1600x1066 image, fp32 (``load_sam`` picks fp32 on CPUs),
medians of ``--rounds`` rounds:

  1. Florence-2 OD (image encoding and an 80-token answer at 3 beams)
  2. SAM 2: the image encoder, then the masks for the boxes (prompt encoder, mask decoder,
     masks resized to the image), each alone
  3. ``segment`` end to end: the two together, as a user calls it

Video tracking is not built yet, so no per-frame figure is measured.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from florence_helpers import BoxesResult, Task
from florence_helpers.masks import SamModel, segment
from florence_helpers.masks.prompts import predict_masks
from florence_helpers.testing import _tiny_sam_config, force_answers

try:  # run as a script: benchmarks/ is on the path
    import inference_speed
except ImportError:  # imported as benchmarks.masks_speed (the tests)
    from benchmarks import inference_speed

SAM_STAGES = {  # Hiera blocks per stage and global-attention blocks, from SAM 2.1's configs
    "tiny": ([1, 2, 7, 2], [5, 7, 9]),
    "small": ([1, 2, 11, 2], [7, 10, 13]),
}
BOXES = 5
ANSWER_TOKENS = 80  # an OD answer for a street photo, from <s> to </s>
IMAGE_SIZE = (1600, 1066)


def build_sam(name: str) -> SamModel:
    """SAM 2.1 ``name`` (tiny, small) with random weights, or the test suite's tiny one."""
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2Model, Sam2VisionConfig

    torch.manual_seed(0)
    if name == "test":
        config = _tiny_sam_config(128)
    else:
        blocks, global_blocks = SAM_STAGES[name]
        backbone = Sam2HieraDetConfig(
            blocks_per_stage=blocks, global_attention_blocks=global_blocks
        )
        config = Sam2Config(vision_config=Sam2VisionConfig(backbone_config=backbone))
    return SamModel(Sam2Model(config).eval(), None, f"random SAM 2.1 {name}")


def od_answer(processor, boxes: int, tokens: int) -> str:
    """An OD answer of ``boxes`` boxes padded with label words to about ``tokens`` tokens."""
    parts = []
    for k in range(boxes):
        x, y = 100 + 150 * k, 200 + 60 * k
        parts.append(f"car<loc_{x}><loc_{y}><loc_{x + 120}><loc_{y + 300}>")
    answer = "".join(parts)
    while len(processor.tokenizer(answer).input_ids) < tokens:
        answer = "red " + answer
    return answer


def median_seconds(call: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", default="base", help="base (default) or tiny")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tiny = args.architectures == "tiny"
    florence = inference_speed.build("tiny" if tiny else "base")
    sams = {"test": build_sam("test")} if tiny else {n: build_sam(n) for n in SAM_STAGES}
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), np.uint8))
    tokens = 20 if tiny else ANSWER_TOKENS
    answer = od_answer(florence.processor, BOXES, tokens)
    forced = {"num_beams": 3, "logits_processor": force_answers(florence.processor, answer)}
    found = segment(florence, next(iter(sams.values())), image, task="OD", **forced)
    assert len(found) == BOXES, f"the forced answer gave {len(found)} boxes"
    boxes = BoxesResult(Task.OD, image.size, raw="", boxes=found.boxes, labels=found.labels)
    print(f"# Masks from words: seconds per {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image, {BOXES} boxes")
    print(f"processor: {inference_speed.cpuinfo_field('model name') or platform.processor()}, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; fp32")  # fmt: skip
    from florence_helpers import run

    florence_s = median_seconds(lambda: run(florence, image, "OD", **forced), args.rounds)
    print(f"Florence-2 {'tiny' if tiny else 'base'} OD (3 beams, {tokens} tokens): "
          f"{florence_s:.2f} s")  # fmt: skip
    for name, sam in sams.items():
        print(_sam_line(name, sam, florence, image, boxes, forced, args.rounds))


def _sam_line(
    name: str, sam: SamModel, florence, image: Image.Image, boxes, forced: dict, rounds: int
) -> str:
    """One SAM 2 size's figures: the image encoder, encoder + masks, and segment()."""
    pixels = torch.zeros(1, 3, sam.input_size, sam.input_size)
    with torch.inference_mode():
        encode_s = median_seconds(lambda: sam.model.get_image_embeddings(pixels), rounds)
    masks_s = median_seconds(lambda: predict_masks(sam, image, boxes.boxes), rounds)
    total_s = median_seconds(lambda: segment(florence, sam, image, task="OD", **forced), rounds)
    parameters = sum(p.numel() for p in sam.model.parameters()) / 1e6
    return (
        f"SAM 2.1 {name} ({parameters:.1f} M parameters): image encoder {encode_s:.2f} s; "
        f"encoder + {BOXES} masks at image size {masks_s:.2f} s; segment() end to end "
        f"{total_s:.2f} s"
    )


if __name__ == "__main__":
    main()
