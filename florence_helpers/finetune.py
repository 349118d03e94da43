"""Fine-tune Florence-2 on your own boxes: batches, a training loop, LoRA adapters, checkpoints.

The loop is plain PyTorch so that every step is visible:

1. :func:`collate` turns samples into model inputs. Target token ids become ``labels``, with
   padding replaced by -100 so the loss ignores it (a common bug is training on padding).
2. :func:`freeze_vision_tower` calls ``requires_grad_(False)`` on the image encoder (setting an
   attribute such as ``param.is_trainable`` does nothing). :func:`train` does this by default;
   with ``cache_image_features=True`` it also encodes each image once and reuses the features
   every epoch, which removes the most expensive part of a step.
3. :func:`~florence_helpers.adapters.add_lora` wraps the model with a peft LoRA adapter;
   without it :func:`train` updates
   every unfrozen weight (full fine-tuning).
4. :func:`train` runs AdamW with linear warm-up and decay, gradient accumulation, clipping,
   mixed precision (on CUDA by default, on CPU when asked), a tqdm bar and a loss history,
   and can write an atomic checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import load_image
from .model import (
    FlorenceModel,
    base_model,
    cpu_has_native_bf16,
    cuda_half_dtype,
    embed_prompts,
    vision_tower,
)
from .prefetch import prefetched
from .training_data import TrainingSample

_CHECKPOINT = "checkpoint.pt"


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
        if len(self.losses) > epochs > 0:  # several steps per epoch
            ax.plot(ends, self.epoch_losses, "o-", label="training, epoch mean")
        if self.validation_losses:
            shown = ends[: len(self.validation_losses)]
            ax.plot(shown, self.validation_losses, "s--", label="validation, after each epoch")
        title = "Training and validation loss" if self.validation_losses else "Training loss"
        ax.set(xlabel="optimizer step", ylabel="loss (log scale)", yscale="log", title=title)
        ax.legend()
        ax.figure.tight_layout()
        return ax


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


def train(
    florence: FlorenceModel,
    samples: Sequence[TrainingSample],
    config: TrainingConfig | None = None,
    *,
    validation: Sequence[TrainingSample] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainingHistory:
    """Fine-tune ``florence.model`` in place on ``samples``.

    With a LoRA model (:func:`~florence_helpers.adapters.add_lora`) only the adapter trains;
    otherwise every weight outside the frozen vision tower does. The model is left in eval
    mode.

    Args:
        florence: The model to train (load it in float32 for full fine-tuning).
        samples: Training samples, e.g. from :func:`~florence_helpers.training_data.read_coco`.
        config: Settings; see :class:`TrainingConfig`.
        validation: Samples held out from training: their loss is measured after every
            epoch (``history.validation_losses``, drawn by ``history.plot()``). When it stops
            falling while the training loss still falls, the model is memorising.
        resume: When ``config.checkpoint_dir`` holds a checkpoint, continue from it.
        progress: Show a tqdm bar with the running loss.

    Returns:
        The :class:`TrainingHistory`.

    Example:
        >>> lora = add_lora(load_model())  # doctest: +SKIP
        >>> history = train(lora, read_coco("shapes/annotations.json"))  # doctest: +SKIP
        >>> history.plot()  # doctest: +SKIP
    """
    config = config or TrainingConfig()
    samples = list(samples)
    model, device = florence.model, florence.device
    params = _trainable_parameters(model, config, samples)
    _check_target_lengths(florence, samples)
    steps_per_epoch = math.ceil(math.ceil(len(samples) / config.batch_size) / _accumulation(config))
    total_steps = steps_per_epoch * config.epochs
    optimizer, scheduler = _optimizer_and_schedule(params, config, total_steps)
    precision = _Precision.choose(config.mixed_precision, device)
    checkpoint = _Checkpoint.at(config.checkpoint_dir, len(samples))
    done, history = checkpoint.restore(model, optimizer, scheduler, precision.scaler, resume)
    if not done:
        torch.manual_seed(config.seed)  # dropout masks; a resumed run restores the saved state
    prepare = held_out = None
    if done < total_steps:
        prepare = _batch_preparer(florence, samples, config, precision, progress)
        if validation:
            held_out = _validation_batches(florence, list(validation), config, precision, progress)
    else:
        warnings.warn(
            f"Nothing was trained: the checkpoint in {config.checkpoint_dir} already finished "
            f"these {total_steps} steps, and its weights and history were restored. Pass "
            "resume=False to train again, or choose another checkpoint_dir.",
            stacklevel=2,
        )
    started, seconds_before = time.perf_counter(), history.seconds
    model.train()
    if config.freeze_vision:
        vision_tower(model).eval()
    bar = tqdm(total=total_steps, initial=done, desc="training", unit="step", disable=not progress)
    try:
        for epoch in range(done // steps_per_epoch, config.epochs):
            steps = _epoch_plan(samples, config, epoch)
            steps = steps[done - epoch * steps_per_epoch :]  # a resumed epoch skips its done steps
            batches = prefetched(prepare, [batch for step in steps for batch in step])
            for step in steps:
                inputs = [next(batches) for _ in step]
                history.learning_rates.append(scheduler.get_last_lr()[0])
                loss = _optimizer_step(model, params, inputs, optimizer, precision, config, done)
                scheduler.step()
                done += 1
                history.losses.append(loss)
                history.samples_seen += sum(len(batch["labels"]) for batch in inputs)
                history.seconds = seconds_before + time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
                if config.checkpoint_every and done % config.checkpoint_every == 0:
                    checkpoint.save(model, optimizer, scheduler, precision.scaler, done, history)
            epoch_steps = history.losses[-steps_per_epoch:]
            history.epoch_losses.append(sum(epoch_steps) / len(epoch_steps))
            if held_out is not None:
                history.validation_losses.append(
                    validation_loss(model, held_out, precision, config.freeze_vision)
                )
            checkpoint.save(model, optimizer, scheduler, precision.scaler, done, history)
    finally:
        bar.close()
        model.eval()
    return history


def _validation_batches(
    florence: FlorenceModel,
    samples: list[TrainingSample],
    config: TrainingConfig,
    precision: _Precision,
    progress: bool,
) -> list[dict[str, torch.Tensor]]:
    """The validation samples as model inputs, in fixed batches, prepared once."""
    prepare = _batch_preparer(florence, samples, config, precision, progress)
    size = config.batch_size
    return [prepare(samples[i : i + size]) for i in range(0, len(samples), size)]


@torch.no_grad()
def validation_loss(
    model: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    precision: _Precision | None = None,
    freeze_vision: bool = True,
) -> float:
    """The mean loss over every target token of ``batches``, in eval mode (no dropout).

    The model goes back to training mode afterwards (its vision tower stays in eval mode
    when frozen).
    """
    model.eval()
    total = tokens = 0.0
    try:
        for inputs in batches:
            device = precision.device if precision is not None else model.device
            inputs = {k: v.to(device) for k, v in inputs.items()}
            count = int((inputs["labels"] != -100).sum())
            context = precision.autocast() if precision is not None else contextlib.nullcontext()
            with context:
                loss = _forward(model, inputs).loss
            total += float(loss) * count
            tokens += count
    finally:
        model.train()
        if freeze_vision:
            vision_tower(model).eval()
    return total / tokens if tokens else float("nan")


def _trainable_parameters(
    model: Any, config: TrainingConfig, samples: Sequence[TrainingSample]
) -> list[torch.nn.Parameter]:
    """Freeze what the settings say and return the float32 parameters left to train."""
    if not samples:
        raise ValueError("No training samples.")
    if config.freeze_vision:
        freeze_vision_tower(model)
    elif config.cache_image_features:
        raise ValueError(
            "cache_image_features needs freeze_vision=True: a trained encoder's "
            "features change every step."
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("Nothing to train: every parameter is frozen.")
    low = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if low:
        raise ValueError(
            f"Trainable weights are {', '.join(low)}: load the model with dtype='float32' to "
            "train it (TrainingConfig.mixed_precision applies half precision during training)."
        )
    return params


def _check_target_lengths(florence: FlorenceModel, samples: Sequence[TrainingSample]) -> None:
    """Refuse targets longer than the decoder can write, naming a few of them."""
    limit = base_model(florence.model).config.text_config.max_position_embeddings
    tokenizer = florence.processor.tokenizer
    too_long = [s.sample_id for s in samples if len(tokenizer(s.target)["input_ids"]) > limit]
    if too_long:
        raise ValueError(
            f"{len(too_long)} target(s) are longer than the {limit} tokens the decoder can "
            f"write, e.g. {', '.join(too_long[:3])}. Split those images' objects over several "
            "samples (for example one OPEN_VOCABULARY_DETECTION sample per category)."
        )


def _accumulation(config: TrainingConfig) -> int:
    return max(1, config.gradient_accumulation)


def _optimizer_and_schedule(
    params: list[torch.nn.Parameter], config: TrainingConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW, and a learning rate that warms up linearly and then decays linearly to 0."""
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = round(total_steps * config.warmup_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _warmup_then_decay(step, warmup, total_steps)
    )
    return optimizer, scheduler


def _batch_preparer(
    florence: FlorenceModel,
    samples: Sequence[TrainingSample],
    config: TrainingConfig,
    precision: _Precision,
    progress: bool,
) -> Any:
    """A function that turns a list of samples into model inputs (from cached features if set)."""
    model, processor = florence.model, florence.processor
    if not config.cache_image_features:
        return functools.partial(collate, processor)
    with precision.autocast():  # the precision the tower would run in during training
        features = _encode_images(model, processor, samples, florence.device, progress)
    prompt_ids = _prompt_ids(processor, samples)
    return lambda batch: _cached_batch(processor, batch, prompt_ids, features)


def _optimizer_step(
    model: Any,
    params: list[torch.nn.Parameter],
    batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    precision: _Precision,
    config: TrainingConfig,
    done: int,
) -> float:
    """Forward and backward over ``batches`` (accumulated), then one optimizer update.

    Returns the step's loss: the mean over every target token of its batches.
    """
    # Average over every target token of the step, not per batch, so that accumulating two
    # batches of 2 gives the same gradient as one batch of 4.
    tokens = sum(int((inputs["labels"] != -100).sum()) for inputs in batches)
    step_loss = 0.0
    for inputs in batches:
        inputs = {k: v.to(precision.device) for k, v in inputs.items()}
        with precision.autocast():
            loss = _forward(model, inputs, num_items_in_batch=tokens).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The loss became {loss.item()} at step {done + 1}: lower the learning rate."
            )
        precision.scaler.scale(loss).backward()
        step_loss += loss.item()
    if config.max_grad_norm is not None:
        precision.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


@dataclass
class _Precision:
    """Autocast settings for the forward pass, and the loss scaler fp16 needs."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @classmethod
    def choose(cls, mixed_precision: bool | None, device: torch.device) -> _Precision:
        dtype = _autocast_dtype(mixed_precision, device)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        return cls(device, dtype, scaler)

    def autocast(self) -> Any:
        return torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        )


@dataclass
class _Checkpoint:
    """Where the run's checkpoint lives (or None), and the data-set size it was written for."""

    path: Path | None
    num_samples: int

    @classmethod
    def at(cls, folder: str | Path | None, num_samples: int) -> _Checkpoint:
        return cls(Path(folder) / _CHECKPOINT if folder else None, num_samples)

    def restore(
        self, model: Any, optimizer: Any, scheduler: Any, scaler: Any, resume: bool
    ) -> tuple[int, TrainingHistory]:
        """Steps done and history so far: from the checkpoint if there is one to resume."""
        if self.path is None or not resume or not self.path.is_file():
            return 0, TrainingHistory()
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        found = {n: tuple(t.shape) for n, t in state["weights"].items()}
        if expected != found or state["num_samples"] != self.num_samples:
            raise ValueError(
                f"The checkpoint {self.path} was written for a different model, adapter or "
                "data set (its trainable weights or sample count differ). Use another "
                "checkpoint_dir, or pass resume=False to start over."
            )
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["weights"].items():
                parameters[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        return int(state["step"]), TrainingHistory(**state["history"])

    def save(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        scaler: Any,
        step: int,
        history: TrainingHistory,
    ) -> None:
        """Write to a temporary file, then rename it: a crash leaves the previous checkpoint."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "num_samples": self.num_samples,
            "weights": {
                n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad
            },
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "history": dataclasses.asdict(history),
            "rng": torch.get_rng_state(),
        }
        partial = self.path.with_name(self.path.name + ".partial")
        with partial.open("wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.path)


def _epoch_plan(
    samples: Sequence[TrainingSample], config: TrainingConfig, epoch: int
) -> list[list[list[TrainingSample]]]:
    """One epoch in a seeded shuffled order: optimizer steps, each a list of batches."""
    generator = torch.Generator().manual_seed(config.seed + epoch)
    order = torch.randperm(len(samples), generator=generator).tolist()
    size, accumulation = config.batch_size, _accumulation(config)
    batches = [
        [samples[i] for i in order[start : start + size]] for start in range(0, len(order), size)
    ]
    return [batches[g : g + accumulation] for g in range(0, len(batches), accumulation)]


def _warmup_then_decay(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear from 0 to 1 over ``warmup`` steps, then linear to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def _autocast_dtype(mixed_precision: bool | None, device: torch.device) -> torch.dtype | None:
    if mixed_precision is False:
        return None
    if device.type == "cuda":
        return cuda_half_dtype()
    if device.type == "cpu" and (mixed_precision or cpu_has_native_bf16()):
        return torch.bfloat16
    return None


@torch.no_grad()
def _encode_images(
    model: Any,
    processor: Any,
    samples: Sequence[TrainingSample],
    device: torch.device,
    progress: bool,
) -> dict[Path, torch.Tensor]:
    """The frozen vision tower's output for every distinct image, computed once."""
    tower = vision_tower(model)
    features: dict[Path, torch.Tensor] = {}
    paths = dict.fromkeys(s.image for s in samples)
    for path in tqdm(paths, desc="encoding images", unit="img", disable=not progress):
        pixels = processor.image_processor(load_image(path), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device, next(tower.parameters()).dtype)
        features[path] = tower(pixels).last_hidden_state[0]
    return features


def _prompt_ids(processor: Any, samples: Sequence[TrainingSample]) -> dict[str, list[int]]:
    """Each prompt's token ids, image tokens included, as the processor writes them.

    The ids do not depend on the pixels, so a blank image stands in for the real one.
    """
    blank = Image.new("RGB", (32, 32))
    ids: dict[str, list[int]] = {}
    for sample in samples:
        if sample.prompt not in ids:
            encoded = processor(text=[sample.prompt], images=[blank], return_tensors="pt")
            ids[sample.prompt] = encoded["input_ids"][0].tolist()
    return ids


def _cached_batch(
    processor: Any,
    samples: Sequence[TrainingSample],
    prompt_ids: dict[str, list[int]],
    features: dict[Path, torch.Tensor],
) -> dict[str, torch.Tensor]:
    padded = processor.tokenizer.pad(
        {"input_ids": [prompt_ids[s.prompt] for s in samples]}, return_tensors="pt"
    )
    return {
        "input_ids": padded["input_ids"],
        "attention_mask": padded["attention_mask"],
        "image_features": torch.stack([features[s.image] for s in samples]),
        "labels": target_labels(processor, [s.target for s in samples]),
    }


def _forward(model: Any, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """The model's forward pass; with cached features, the image tokens are filled in here."""
    if "image_features" not in inputs:
        return model(**inputs, **kwargs)
    inputs = dict(inputs)
    image = base_model(model).model.multi_modal_projector(inputs.pop("image_features"))
    embeds = embed_prompts(model, inputs.pop("input_ids"), image)
    return model(inputs_embeds=embeds, **inputs, **kwargs)
