"""An offline stand-in for Florence-2: a tiny model of the real classes, and forced decoding.

``build_tiny_model`` writes, deterministically and without any download, a directory that
``load_model`` reads like a real checkpoint: a ``Florence2ForConditionalGeneration`` with random
weights and a few thousand parameters per layer, a byte-level BPE tokenizer trained here on a
small corpus plus every Florence-2 special token (the 1000 ``<loc_N>`` tokens included), and a
``Florence2Processor``. Its answers are noise: use it to exercise code, never to judge output.

``force_answers`` makes the real ``generate()`` produce a known Florence-2 answer, so a test can
check image → prompt → generate → parse → pixel coordinates end to end.

Run ``python -m florence_helpers.testing DIR`` to write the tiny model to ``DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .boundary.outputs import OutputError
from .model.convert import (
    FLORENCE_SPECIAL_TOKENS,
    IMAGE_TOKEN,
    MICROSOFT_GENERATION_SETTINGS,
    POST_PROCESSOR_CONFIG,
)
from .model.convert_output import write_model_folder

# Prompts the processor writes, and words that answers in the tests and notebooks use.
_CORPUS = [
    "What is the text in the image?",
    "What is the text in the image, with regions?",
    "What does the image describe?",
    "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "Locate the objects with category name in the image.",
    "Locate the objects in the image, with their descriptions.",
    "Locate the region proposals in the image.",
    "Locate the phrases in the caption:",
    "Locate in the image with mask",
    "What is the polygon mask of region",
    "What is the region?",
    "What does the region describe?",
    "What text is in the region?",
    "A green car parked in front of a yellow building.",
    "A woman in a space suit holding a flag. A cat sitting on a wooden table.",
    "person car door wheel dog cat bird coffee cup rocket astronaut flag",
    "Florence notebooks: learn to read text, find objects and draw masks. 0123456789",
]


_TINY_IMAGE_SIDE = 128  # pixels the processor resizes to; the vision tower downsamples by 32


# Random weights almost never pick ``</s>``, so an untrained answer would run to
# ``max_new_tokens`` (1024 by default: seconds per call, minutes per notebook). The tiny model's
# generation config makes the end of the answer ever likelier after this many tokens
# (transformers' ``exponential_decay_length_penalty``): noise ends a few tokens later, while
# shorter answers (every target the tests and notebooks train on is under 50 tokens) and forced
# answers of any length are left alone.
TINY_ANSWER_LENGTH = 64
_EOS_GROWTH_PER_TOKEN = 1.1


def build_tiny_tokenizer(*, florence_tokens: bool = True) -> Any:
    """A BART-style byte-level BPE tokenizer trained on a small corpus, with Florence-2's tokens.

    Ids follow BART's layout: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the learned
    vocabulary, ``<mask>``, then Florence-2's special tokens and ``<image>`` last.
    ``florence_tokens=False`` stops after ``<mask>``: the tokenizer as the original
    remote-code checkpoints store it (their processor adds the rest at run time).
    """
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _CORPUS,
        vocab_size=512,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        show_progress=False,
    )
    bpe.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    if not florence_tokens:
        return RobertaTokenizer(tokenizer_object=bpe._tokenizer)
    bpe.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in FLORENCE_SPECIAL_TOKENS]
    )
    bpe.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    return RobertaTokenizer(
        tokenizer_object=bpe._tokenizer,
        image_token=IMAGE_TOKEN,
        extra_special_tokens=FLORENCE_SPECIAL_TOKENS,
    )


def build_processor(image_side: int = 768) -> Any:
    """A ``Florence2Processor`` with the tiny tokenizer and images resized to ``image_side``.

    Real checkpoints use 768 (577 image tokens: one per 32x32 patch plus one); the tiny model
    uses 128. Normalisation and resampling follow the real checkpoints.
    """
    from transformers import CLIPImageProcessorPil, Florence2Processor

    image_processor = CLIPImageProcessorPil(
        size={"height": image_side, "width": image_side},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    image_processor.image_seq_length = 1 + (image_side // 32) ** 2
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(),
        post_processor_config=POST_PROCESSOR_CONFIG,
    )


def build_random_model(
    processor: Any,
    *,
    vision: dict[str, Any],
    text: dict[str, Any],
    vocab_size: int | None = None,
    seed: int = 0,
) -> Any:
    """A ``Florence2ForConditionalGeneration`` with random weights, in eval mode.

    Args:
        processor: Its processor (gives the image token id and, by default, the vocabulary size).
        vision: ``Florence2VisionConfig`` fields (depths, embed_dim, ...).
        text: ``BartConfig`` fields (d_model, layers, heads, ...).
        vocab_size: Vocabulary size; defaults to the tokenizer's.
        seed: Seed for the weights; the global torch RNG is left as it was.
    """
    from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration

    tokenizer = processor.tokenizer
    text_config = BartConfig(
        vocab_size=vocab_size or len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        **text,
    )
    config = Florence2Config(
        vision_config={"drop_path_rate": 0.0, **vision},
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return Florence2ForConditionalGeneration(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)


def build_tiny_model(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a tiny random-weight Florence-2 (model, tokenizer, processor) to ``path``.

    The same seed gives byte-identical files. Building takes a few seconds on a CPU. Untrained
    answers end soon after :data:`TINY_ANSWER_LENGTH` tokens (see the generation config), so
    running a task takes a fraction of a second instead of writing 1024 tokens of noise.

    Args:
        path: Folder to create (or to replace whole, if it holds an earlier model).
        seed: Seed for the random weights.

    Returns:
        ``path`` as a :class:`~pathlib.Path`, ready for ``load_model(path)``.

    Example:
        >>> tiny = build_tiny_model("/tmp/tiny-florence2")  # doctest: +SKIP
        >>> florence = load_model(tiny)  # doctest: +SKIP
    """

    out = Path(path)
    processor = build_processor(_TINY_IMAGE_SIDE)
    model = build_random_model(
        processor,
        vision={
            "depths": [1, 1, 1, 1],
            "embed_dim": [8, 16, 16, 32],
            "num_heads": [1, 2, 2, 4],
            "num_groups": [1, 2, 2, 4],
            "window_size": 2,
            "projection_dim": 128,
        },
        text={
            "d_model": 128,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 256,
            "decoder_ffn_dim": 256,
            # Sized so that fine-tuning tests can teach it a few images in seconds: with BART's
            # default init (std 0.02) the tied output layer cannot make any token likely, and
            # dropout would keep a model this small from memorising them.
            "init_std": 0.1,
            "dropout": 0.0,
        },
        seed=seed,
    )
    # Decode as Microsoft's checkpoints do, so every test runs under the real settings.
    for name, value in MICROSOFT_GENERATION_SETTINGS.items():
        setattr(model.generation_config, name, value)
    model.generation_config.exponential_decay_length_penalty = (
        TINY_ANSWER_LENGTH,
        _EOS_GROWTH_PER_TOKEN,
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / "README.md").write_text(
            "Tiny random-weight Florence-2 built by florence_helpers.testing.build_tiny_model.\n"
            "Its answers are noise. It exists to test code offline.\n"
        )

    with _no_progress_bars():
        return write_model_folder(out, write)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off while a tiny model is written, as they were after."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


_TINY_SAM_SIDE = 128


def build_tiny_sam(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a tiny random-weight SAM 2 (``Sam2Model``, 0.5 M parameters, 128-pixel input)
    with a ``Sam2Processor`` configuration to ``path``; the same seed gives the same files.

    Its masks are noise; it exists to test the plumbing offline (box frames, mask sizes,
    order). The sizes are those of transformers' own SAM 2 model tests.

    Example:
        >>> sam = load_sam(build_tiny_sam("/tmp/tiny-sam2"))  # doctest: +SKIP
    """
    from transformers import Sam2Model

    side = _TINY_SAM_SIDE
    config = _tiny_sam_config(side)
    torch.manual_seed(seed)
    model = Sam2Model(config).eval()
    settings = {
        "image_processor_type": "Sam2ImageProcessor",
        "processor_class": "Sam2Processor",
        "size": {"height": side, "width": side},
        "mask_size": {"height": 256, "width": 256},
        "do_resize": True,
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
    }

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
        processor = {"processor_class": "Sam2Processor", "target_size": side}
        (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
        (folder / "README.md").write_text(
            "Tiny random-weight SAM 2 built by florence_helpers.testing.build_tiny_sam.\n"
            "Its masks are noise. It exists to test code offline.\n"
        )

    with _no_progress_bars():
        return write_model_folder(Path(path), write)


def _tiny_sam_config(side: int) -> Any:
    """The sizes of transformers' own SAM 2 model tests."""
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    backbone = Sam2HieraDetConfig(
        hidden_size=12,
        image_size=side,
        patch_stride=4,
        patch_kernel_size=7,
        patch_padding=3,
        blocks_per_stage=[1, 2, 7, 2],
        embed_dim_per_stage=[12, 24, 48, 96],
    )
    return Sam2Config(
        vision_config=Sam2VisionConfig(
            backbone_config=backbone,
            backbone_channel_list=[96, 48, 24, 12],
            backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
            fpn_hidden_size=32,
        ),
        prompt_encoder_config=Sam2PromptEncoderConfig(
            image_size=side, patch_size=16, mask_input_channels=8, hidden_size=32
        ),
        mask_decoder_config=Sam2MaskDecoderConfig(
            hidden_size=32,
            hidden_act="relu",
            mlp_dim=64,
            num_attention_heads=4,
            iou_head_hidden_dim=32,
        ),
    )


class ForcedAnswer(LogitsProcessor):
    """A logits processor that makes ``generate()`` write given token sequences.

    At every step each sequence's next token is forced (all other logits set to -inf);
    once a sequence is exhausted, EOS is forced. Works with greedy and beam search and with
    batches (one sequence per batch item; beams of an item follow their item's sequence).
    """

    def __init__(self, token_ids: Sequence[Sequence[int]], eos_token_id: int) -> None:
        self.token_ids = [list(ids) for ids in token_ids]
        self.eos_token_id = eos_token_id

    def select_rows(self, rows: Sequence[int]) -> ForcedAnswer:
        """The same forcing for a subset of the batch (``run_tasks`` decodes in groups)."""
        return ForcedAnswer([self.token_ids[i] for i in rows], self.eos_token_id)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        rows = input_ids.shape[0]
        per_item = rows // len(self.token_ids)
        step = input_ids.shape[1] - 1  # position 0 holds the decoder start token
        forced = torch.full_like(scores, float("-inf"))
        for row in range(rows):
            ids = self.token_ids[row // per_item]
            forced[row, ids[step] if step < len(ids) else self.eos_token_id] = 0.0
        return forced


def answer_token_ids(processor: Any, answer: str) -> list[int]:
    """Token ids of a Florence-2 answer, from ``<s>`` to ``</s>`` inclusive.

    ``answer`` is written in Florence-2's output grammar, e.g.
    ``"car<loc_52><loc_333><loc_932><loc_774>"``; a leading ``</s><s>`` or trailing ``</s>``
    is accepted and not doubled.
    """
    tokenizer = processor.tokenizer
    body = answer.removeprefix("</s>").removeprefix("<s>").removesuffix("</s>")
    ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


def force_answers(processor: Any, answers: str | Sequence[str]) -> Any:
    """A ``logits_processor`` for ``generate()`` (or ``run``) that forces the given answers.

    Args:
        processor: The model's processor (its tokenizer encodes the answers).
        answers: One answer, or one per image of the batch, in Florence-2's output grammar.

    Returns:
        A ``LogitsProcessorList`` to pass as ``logits_processor=``.

    Example:
        >>> forced = force_answers(florence.processor, "cat<loc_100><loc_200><loc_300><loc_400>")
        ... # doctest: +SKIP
        >>> run(florence, image, "OD", logits_processor=forced).labels  # doctest: +SKIP
        ['cat']
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    ids = [answer_token_ids(processor, a) for a in answers]
    return LogitsProcessorList([ForcedAnswer(ids, processor.tokenizer.eos_token_id)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m florence_helpers.testing",
        description="Write a tiny random-weight Florence-2 for offline tests (answers are noise).",
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = build_tiny_model(args.directory, seed=args.seed)
    except (OutputError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps({"tiny_model": str(out)}))


if __name__ == "__main__":
    main()
