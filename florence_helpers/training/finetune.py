"""Fine-tune Florence-2 on your own boxes: batches, a training loop, LoRA adapters, checkpoints.

The loop is plain PyTorch so that every step is visible:

1. :func:`collate` turns samples into model inputs. Target token ids become ``labels``, with
   padding replaced by -100 so the loss ignores it (a common bug is training on padding).
2. :func:`freeze_vision_tower` calls ``requires_grad_(False)`` on the image encoder (setting an
   attribute such as ``param.is_trainable`` does nothing). :func:`train` does this by default;
   with ``cache_image_features=True`` it also encodes each image once and reuses the features
   every epoch, which removes the most expensive part of a step.
3. :func:`~florence_helpers.model.adapters.add_lora` wraps the model with a peft LoRA adapter;
   without it :func:`train` updates
   every unfrozen weight (full fine-tuning).
4. :func:`train` runs AdamW with linear warm-up and decay, gradient accumulation, clipping,
   mixed precision (on CUDA by default, on CPU when asked), a tqdm bar and a loss history,
   and can write an atomic checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..language.prompts import TaskInputError
from ..model.inference import check_prompt_lengths
from ..model.loading import FlorenceModel, base_model, vision_tower
from ..model.prefetch import prefetched
from .config import TrainingConfig, TrainingHistory
from .samples import TrainingSample
from .steps import (
    _accumulation,
    _batch_preparer,
    _Checkpoint,
    _epoch_plan,
    _forward,
    _optimizer_and_schedule,
    _optimizer_step,
    _Precision,
    _trainable_parameters,
)


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

    With a LoRA model (:func:`~florence_helpers.training.add_lora`) only the adapter trains;
    otherwise every weight outside the frozen vision tower does. The model is left in eval
    mode.

    Args:
        florence: The model to train (load it in float32 for full fine-tuning).
        samples: Training samples, e.g. from :func:`~florence_helpers.training.read_coco`.
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
    model = florence.model
    params = _trainable_parameters(model, config, samples)
    validation = list(validation) if validation is not None else None
    _check_lengths(florence, [*samples, *(validation or [])])
    steps_per_epoch = math.ceil(math.ceil(len(samples) / config.batch_size) / _accumulation(config))
    total_steps = steps_per_epoch * config.epochs
    optimizer, scheduler = _optimizer_and_schedule(params, config, total_steps)
    precision = _Precision.choose(config.mixed_precision, florence.device)
    checkpoint = _Checkpoint.at(config.checkpoint_dir, len(samples))
    with checkpoint.held():  # one training process per checkpoint_dir
        done, history = checkpoint.restore(model, optimizer, scheduler, precision.scaler, resume)
        if not done:
            torch.manual_seed(config.seed)  # dropout masks; a resumed run restores the saved state
        prepare = held_out = None
        if done < total_steps:  # preparing may encode every image: only when there is work
            prepare, held_out = _prepared(
                florence, samples, validation, config, precision, progress
            )
        else:
            warnings.warn(
                f"Nothing was trained: the checkpoint in {config.checkpoint_dir} already finished "
                f"these {total_steps} steps, and its weights and history were restored. Pass "
                "resume=False to train again, or choose another checkpoint_dir.",
                stacklevel=2,
            )
        run = _Run(model, params, optimizer, scheduler, precision, config, checkpoint, history)
        model.train()
        if config.freeze_vision:
            vision_tower(model).eval()
        bar = tqdm(
            total=total_steps, initial=done, desc="training", unit="step", disable=not progress
        )
        try:
            for epoch in range(done // steps_per_epoch, config.epochs):
                steps = _epoch_plan(samples, config, epoch)
                # a resumed epoch skips its done steps
                steps = steps[done - epoch * steps_per_epoch :]
                done = run.steps(steps, prepare, done, epoch, bar)
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


def _prepared(
    florence: FlorenceModel,
    samples: list[TrainingSample],
    validation: Sequence[TrainingSample] | None,
    config: TrainingConfig,
    precision: _Precision,
    progress: bool,
) -> tuple[Any, list[dict[str, torch.Tensor]] | None]:
    """The function that makes a batch's inputs, and the validation batches (made once)."""
    prepare = _batch_preparer(florence, samples, config, precision, progress)
    held_out = None
    if validation:
        held_out = _validation_batches(florence, list(validation), config, precision, progress)
    return prepare, held_out


@dataclass
class _Run:
    """One training run's moving parts, for :meth:`steps`."""

    model: Any
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    precision: _Precision
    config: TrainingConfig
    checkpoint: _Checkpoint
    history: TrainingHistory
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.seconds_before = self.history.seconds

    def steps(self, steps: list, prepare: Any, done: int, epoch: int, bar: Any) -> int:
        """Run the optimisation steps of one epoch (each a list of batches); the steps done."""
        history, config = self.history, self.config
        batches = prefetched(prepare, [batch for step in steps for batch in step])
        for step in steps:
            inputs = [next(batches) for _ in step]
            history.learning_rates.append(self.scheduler.get_last_lr()[0])
            loss = _optimizer_step(
                self.model, self.params, inputs, self.optimizer, self.precision, config, done
            )
            self.scheduler.step()
            done += 1
            history.losses.append(loss)
            history.samples_seen += sum(len(batch["labels"]) for batch in inputs)
            history.seconds = self.seconds_before + time.perf_counter() - self.started
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                state = (self.optimizer, self.scheduler, self.precision.scaler, done, history)
                self.checkpoint.save(self.model, *state)
        return done


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


def _check_lengths(florence: FlorenceModel, samples: Sequence[TrainingSample]) -> None:
    """Refuse prompts longer than the encoder reads and targets longer than the decoder
    writes (training and validation samples both: past either, torch fails deep inside with
    an index error, after an epoch for a validation sample), naming a few of them."""
    for sample in samples:
        try:
            check_prompt_lengths(florence, [sample.prompt], 1)
        except TaskInputError as error:
            raise ValueError(f"Sample {sample.sample_id}: {error}") from None
    limit = base_model(florence.model).config.text_config.max_position_embeddings
    tokenizer = florence.processor.tokenizer
    too_long = [s.sample_id for s in samples if len(tokenizer(s.target)["input_ids"]) > limit]
    if too_long:
        raise ValueError(
            f"{len(too_long)} target(s) are longer than the {limit} tokens the decoder can "
            f"write, e.g. {', '.join(too_long[:3])}. Split those images' objects over several "
            "samples (for example one OPEN_VOCABULARY_DETECTION sample per category)."
        )
