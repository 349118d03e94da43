"""The parts of one training step: precision (bf16 autocast where native), cached image
features, the optimizer and its schedule, gradient accumulation and checkpoints to resume
from. :func:`~florence_helpers.training.finetune.train` puts them together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..boundary.images import load_image
from ..boundary.inputs import expand_path
from ..boundary.outputs import (
    InUseError,
    OutputError,
    check_outputs,
    one_writer,
    write_atomically,
)
from ..model.devices import cpu_has_native_bf16, cuda_half_dtype
from ..model.loading import FlorenceModel, base_model, embed_prompts, vision_tower
from .batches import collate, freeze_vision_tower, target_labels
from .config import _CHECKPOINT, TrainingConfig, TrainingHistory
from .resume_checks import resumable
from .samples import TrainingSample


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
        """The checkpoint in ``folder``, refused before any training if it could not be
        written there (a file in the way, a folder named like it, no permission).

        Raises:
            OutputError: Naming ``checkpoint_dir`` and what is wrong.
        """
        if not folder:
            return cls(None, num_samples)
        path = expand_path(folder) / _CHECKPOINT
        check_outputs({"checkpoint_dir": path})
        return cls(path, num_samples)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the checkpoint's one-writer lock while training (nothing without a
        checkpoint_dir): a second run on the folder would replace this one's checkpoint.

        Raises:
            OutputError: Another process is training into the same checkpoint_dir.
        """
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with one_writer(self.path):
                yield
        except InUseError as error:
            raise OutputError(
                f"checkpoint_dir {self.path.parent} is in use by another training process "
                f"({error.lock} is locked): a second run would replace its checkpoint. Wait "
                "for it to finish, or choose another checkpoint_dir."
            ) from None

    def restore(
        self, model: Any, optimizer: Any, scheduler: Any, scaler: Any, resume: bool
    ) -> tuple[int, TrainingHistory]:
        """Steps done and history so far: from the checkpoint if there is one to resume."""
        if self.path is None or not self.path.is_file():
            return 0, TrainingHistory()
        state = self._read()  # also without resume: starting over replaces only our own file
        if not resume:
            return 0, TrainingHistory()
        expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        found = {n: tuple(t.shape) for n, t in state["weights"].items()}
        if expected != found or state["num_samples"] != self.num_samples:
            raise ValueError(
                f"The checkpoint {self.path} was written for a different model, adapter or "
                "data set (its trainable weights or sample count differ). Use another "
                "checkpoint_dir, or pass resume=False to start over."
            )
        if not resumable(state, optimizer, scheduler, scaler):
            raise self._foreign()
        parameters = dict(model.named_parameters())
        try:
            with torch.no_grad():
                for name, tensor in state["weights"].items():
                    parameters[name].copy_(tensor)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
        except (TypeError, ValueError, KeyError, RuntimeError) as error:
            raise self._foreign() from error
        return state["step"], TrainingHistory(**state["history"])

    def _foreign(self) -> ValueError:
        return ValueError(
            f"{self.path} is not a training checkpoint this package wrote (it cannot be read "
            "as one). Use another checkpoint_dir, or move the file away."
        )

    def _read(self) -> dict[str, Any]:
        """The checkpoint's contents, checked to be one that :meth:`save` wrote."""
        assert self.path is not None
        try:
            # mmap: the tensors are read when used, so checking a large file costs nothing.
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - torch.load fails in many ways on foreign files
            state = error
        keys = {"step", "num_samples", "weights", "optimizer", "scheduler", "scaler", "history"}
        if not (isinstance(state, dict) and keys <= state.keys() and _as_written(state)):
            raise self._foreign() from (state if isinstance(state, Exception) else None)
        return state

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
        write_atomically(self.path, lambda handle: torch.save(state, handle))


def _as_written(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's values have the types :meth:`_Checkpoint.save` gives them: a
    step count of at least 0 (a negative one asked for a billion epochs), a history of flat
    lists of numbers (nested shared lists are a few bytes that expand exponentially when
    copied), weights as tensors, the random state as bytes."""

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    history = state["history"]
    fields = {f.name for f in dataclasses.fields(TrainingHistory)}
    return (
        whole(state["step"])
        and whole(state["num_samples"])
        and isinstance(state["weights"], dict)
        and all(isinstance(t, torch.Tensor) for t in state["weights"].values())
        and isinstance(state.get("rng"), torch.Tensor)
        and state["rng"].dtype == torch.uint8
        and isinstance(history, dict)
        and history.keys() == fields
        and all(
            isinstance(history[name], list) and all(map(number, history[name]))
            for name in ("losses", "learning_rates", "epoch_losses", "validation_losses")
        )
        and number(history["seconds"])
        and whole(history["samples_seen"])
    )


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


def _forward(
    model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: int | None = None
) -> Any:
    """The model's forward pass and its loss, computed here from the logits.

    The decoder reads the targets shifted right by one (the decoder start token first), and
    the loss is the cross-entropy of each position's logits against the target token itself,
    padding (-100) left out: summed and divided by ``num_items_in_batch`` (the target tokens of
    a whole accumulated step) or, without it, averaged over this batch's target tokens.
    Computed here rather than by the model because transformers 5.0 to 5.12 trained
    Florence-2 against targets shifted twice (transformers#46897, fixed by #46898).

    With cached features, the image tokens are filled in here.
    """
    from transformers.models.bart.modeling_bart import shift_tokens_right

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    text = base_model(model).config.text_config
    inputs["decoder_input_ids"] = shift_tokens_right(
        labels, text.pad_token_id, text.decoder_start_token_id
    )
    if "image_features" in inputs:
        image = base_model(model).model.multi_modal_projector(inputs.pop("image_features"))
        inputs["inputs_embeds"] = embed_prompts(model, inputs.pop("input_ids"), image)
    outputs = model(**inputs, use_cache=False)
    logits = outputs.logits.float()
    summed = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    count = num_items_in_batch or max(int((labels != -100).sum()), 1)
    outputs.loss = summed / count
    return outputs
