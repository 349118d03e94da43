"""What a training run is told (:class:`TrainingConfig`) and what it reports
(:class:`TrainingHistory`: losses per step and epoch, validation losses, a plot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CHECKPOINT = "checkpoint.pt"

_MOST_MARKERS = 40
"""Epoch points drawn with a marker each; past this, lines only."""


@dataclass
class TrainingConfig:
    """Settings for :func:`train`.

    Attributes:
        epochs: Passes over the samples.
        batch_size: Samples per forward pass.
        gradient_accumulation: Forward passes per optimizer step (effective batch =
            ``batch_size * gradient_accumulation``).
        learning_rate: Peak learning rate, reached after warm-up. About 1e-4 to 5e-4 suits
            LoRA, 1e-5 to 5e-5 full fine-tuning.
        weight_decay: AdamW weight decay.
        warmup_fraction: Share of the optimizer steps spent warming up linearly from 0; the
            rest decays linearly to 0.
        max_grad_norm: Gradient clipping norm (``None`` to skip).
        freeze_vision: Keep the vision tower frozen (``requires_grad_(False)``, eval mode).
        cache_image_features: Encode each image once and reuse its features every epoch.
            Needs ``freeze_vision``. Costs memory: about 2.4 MB per image for base, 4.7 MB for
            large (on the model's device); half that under bf16 or fp16 autocast, where the
            images are also encoded in half precision.
        mixed_precision: Autocast the forward pass to half precision while the trainable
            weights stay float32: bf16 (or fp16 with loss scaling where the GPU lacks bf16) on
            CUDA, bf16 on CPU. ``None``: where it is fast (CUDA, and CPUs with native bf16,
            see :func:`~florence_helpers.model.cpu_has_native_bf16`); ``True``: on any CPU
            too (slow without native bf16); ``False``: never (full float32, as on a CPU
            without native bf16).
        seed: Seed for the shuffling and dropout; the same seed gives the same run.
        checkpoint_dir: Where to write ``checkpoint.pt`` (atomically) to resume from.
        checkpoint_every: Also write it every this many optimizer steps (0: at epoch ends only).
    """

    epochs: int = 10
    batch_size: int = 4
    gradient_accumulation: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_grad_norm: float | None = 1.0
    freeze_vision: bool = True
    cache_image_features: bool = False
    mixed_precision: bool | None = None
    seed: int = 0
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 0


@dataclass
class TrainingHistory:
    """What :func:`train` did: the mean loss and learning rate of every optimizer step.

    Attributes:
        losses: Mean training loss of each optimizer step.
        learning_rates: Learning rate used at each optimizer step.
        epoch_losses: Mean loss of each completed epoch.
        validation_losses: With ``train(..., validation=...)``: the loss on the validation
            samples after each completed epoch (the mean over their target tokens, in eval
            mode, so without dropout).
        seconds: Wall-clock training time (over all resumed runs).
        samples_seen: Samples processed (over all resumed runs).
    """

    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    validation_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    samples_seen: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.seconds if self.seconds else float("nan")

    def loss_drop(self, window: int = 5) -> float:
        """How far the loss fell: 1 - (mean of the last ``window`` steps) / (first step)."""
        if not self.losses:
            return float("nan")
        tail = self.losses[-window:]
        return 1.0 - (sum(tail) / len(tail)) / self.losses[0]

    def plot(self, ax: Any = None) -> Any:
        """Draw the loss per optimizer step, per epoch, and on the validation samples after
        each epoch when there are any, on ``ax``; returns the axes."""
        import matplotlib.pyplot as plt

        ax = ax if ax is not None else plt.subplots(figsize=(7, 4))[1]
        steps = range(1, len(self.losses) + 1)
        ax.plot(steps, self.losses, lw=1, alpha=0.5, label="training, each step")
        epochs = len(self.epoch_losses)
        per_epoch = len(self.losses) / epochs if epochs else 0
        ends = [round(per_epoch * (i + 1)) for i in range(epochs)]
        marked = epochs <= _MOST_MARKERS  # hundreds of markers merge into one thick band
        if len(self.losses) > epochs > 0:  # several steps per epoch
            style = "o-" if marked else "-"
            ax.plot(ends, self.epoch_losses, style, label="training, epoch mean")
        if self.validation_losses:
            shown = ends[: len(self.validation_losses)]
            style = "s--" if marked else "--"
            ax.plot(shown, self.validation_losses, style, label="validation, after each epoch")
        title = "Training and validation loss" if self.validation_losses else "Training loss"
        ax.set(xlabel="optimizer step", ylabel="loss (log scale)", yscale="log", title=title)
        ax.legend()
        ax.figure.tight_layout()
        return ax
