"""Samples made into model inputs: prompts and pixels, target ids as ``labels`` with padding
masked as -100 (the loss ignores it), and the image encoder frozen for training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..boundary.images import load_image
from ..model.loading import vision_tower
from .samples import TrainingSample


def target_labels(processor: Any, targets: Sequence[str]) -> torch.Tensor:
    """Token ids of the answers, padded, with padding set to -100 so the loss skips it.

    Each row is ``<s> answer </s>``; the model learns to write it after its start token.

    Example:
        >>> labels = target_labels(processor, ["cat<loc_1><loc_2><loc_3><loc_4>"])  # doctest: +SKIP
    """
    encoded = processor.tokenizer(
        list(targets), padding="longest", return_tensors="pt", return_attention_mask=True
    )
    return encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)


def collate(
    processor: Any, samples: Sequence[TrainingSample], images: Sequence[Any] | None = None
) -> dict[str, torch.Tensor]:
    """Model inputs for a batch of samples: pixels, prompt ids, attention mask and labels.

    Args:
        processor: The model's processor.
        samples: Training samples.
        images: The samples' images if already loaded; otherwise they are read from disk.

    Returns:
        ``pixel_values``, ``input_ids``, ``attention_mask`` and ``labels`` (padding -100),
        ready for ``model(**batch).loss``.
    """
    pictures = list(images) if images is not None else [load_image(s.image) for s in samples]
    inputs = processor(
        text=[s.prompt for s in samples], images=pictures, return_tensors="pt", padding="longest"
    )
    batch = dict(inputs)
    batch["labels"] = target_labels(processor, [s.target for s in samples])
    return batch


def freeze_vision_tower(model: Any) -> int:
    """Stop gradients to the image encoder and put it in eval mode. Returns parameters frozen."""
    tower = vision_tower(model)
    tower.requires_grad_(False)
    tower.eval()
    return sum(p.numel() for p in tower.parameters())
