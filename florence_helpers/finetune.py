"""Fine-tune Florence-2 on your own boxes: batches, a training loop, LoRA adapters, checkpoints.

The loop is plain PyTorch so that every step is visible:

1. :func:`collate` turns samples into model inputs. Target token ids become ``labels``, with
   padding replaced by -100 so the loss ignores it (a common bug is training on padding).
2. :func:`freeze_vision_tower` calls ``requires_grad_(False)`` on the image encoder (setting an
   attribute such as ``param.is_trainable`` does nothing). :func:`train` does this by default;
   with ``cache_image_features=True`` it also encodes each image once and reuses the features
   every epoch, which removes the most expensive part of a step.
3. :func:`add_lora` wraps the model with a peft LoRA adapter; without it :func:`train` updates
   every unfrozen weight (full fine-tuning).
4. :func:`train` runs AdamW with linear warm-up and decay, gradient accumulation, clipping,
   mixed precision (on CUDA by default, on CPU when asked), a tqdm bar and a loss history,
   and can write an atomic checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import load_image
from .model import FlorenceModel, base_model, cuda_half_dtype, embed_prompts, is_peft, vision_tower
from .training_data import TrainingSample

LORA_TARGET_MODULES = (
    r".*language_model\.(encoder|decoder)\.layers\.\d+\.(self_attn|encoder_attn)\."
    r"(q_proj|k_proj|v_proj|out_proj)"
    r"|.*language_model\.(encoder|decoder)\.layers\.\d+\.(fc1|fc2)"
)
"""Where :func:`add_lora` puts adapters (a regular expression over module names):

* ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``: the attention projections of every text
  encoder and decoder layer, including the decoder's cross-attention to the image tokens;
* ``fc1``, ``fc2``: the feed-forward layers of those blocks.

Left out: the vision tower and its projection (they stay frozen), and ``lm_head``, whose weight
is shared with the input embeddings: merging an adapter into it would change both.
"""

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
            large (on the model's device).
        mixed_precision: Autocast the forward pass to half precision while the trainable
            weights stay float32: bf16 (or fp16 with loss scaling where the GPU lacks bf16) on
            CUDA, bf16 on CPU. ``None``: on CUDA only; ``True`` also on CPU, where it pays
            only on processors with native bf16 (AVX512-BF16 or AMX).
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
        seconds: Wall-clock training time (over all resumed runs).
        samples_seen: Samples processed (over all resumed runs).
    """

    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
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
        """Draw the loss per optimizer step (and per epoch) on ``ax``; returns the axes."""
        import matplotlib.pyplot as plt

        ax = ax if ax is not None else plt.subplots(figsize=(6, 3.5))[1]
        steps = range(1, len(self.losses) + 1)
        ax.plot(steps, self.losses, lw=1, alpha=0.6, label="step")
        if len(self.losses) > len(self.epoch_losses) > 0:  # several steps per epoch
            per_epoch = len(self.losses) / len(self.epoch_losses)
            ends = [round(per_epoch * (i + 1)) for i in range(len(self.epoch_losses))]
            ax.plot(ends, self.epoch_losses, "o-", label="epoch mean")
        ax.set(xlabel="optimizer step", ylabel="loss", yscale="log", title="Training loss")
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


def add_lora(
    florence: FlorenceModel,
    *,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: str | Sequence[str] = LORA_TARGET_MODULES,
    seed: int | None = 0,
) -> FlorenceModel:
    """Wrap the model with a fresh LoRA adapter (peft); only the adapter will train.

    Args:
        florence: The model to adapt. Its weights are not changed.
        rank: Rank of each low-rank update.
        alpha: Scale of the update (``alpha / rank`` multiplies it).
        dropout: Dropout on the adapter's input.
        target_modules: Modules that get an adapter; see :data:`LORA_TARGET_MODULES`.
        seed: Seed for the adapter's random initial weights, so that a training run with a
            given ``TrainingConfig.seed`` repeats exactly (``None``: torch's global RNG).
            The global RNG is left as it was.

    Returns:
        A :class:`FlorenceModel` whose ``model`` is a ``peft.PeftModel``; ``run`` and
        ``train`` accept it as they are.

    Example:
        >>> lora = add_lora(load_model(), rank=8)  # doctest: +SKIP
        >>> lora.model.print_trainable_parameters()  # doctest: +SKIP
        trainable params: 1,769,472 || all params: 272,573,184 || trainable%: 0.6492
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
    )
    with _quiet_peft(), torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = get_peft_model(florence.model, config)
    return dataclasses.replace(florence, model=model.eval())


def save_adapter(florence: FlorenceModel, path: str | Path) -> Path:
    """Write the LoRA adapter (a few MB) and the processor to ``path``."""
    if not is_peft(florence.model):
        raise TypeError("This model has no LoRA adapter: save it with save_model instead.")
    out = Path(path)
    florence.model.save_pretrained(out)
    florence.processor.save_pretrained(out)
    return out


def load_adapter(
    florence: FlorenceModel, path: str | Path, *, trainable: bool = False
) -> FlorenceModel:
    """Put a saved LoRA adapter on a base model (the one it was trained from).

    Args:
        florence: The base model, e.g. ``load_model("florence-community/Florence-2-base")``.
        path: A directory written by :func:`save_adapter`.
        trainable: Keep training the adapter (otherwise it is loaded for inference).
    """
    from peft import PeftModel

    if not (Path(path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"No LoRA adapter in {path}: adapter_config.json is missing.")
    with _quiet_peft():
        model = PeftModel.from_pretrained(florence.model, path, is_trainable=trainable)
    return dataclasses.replace(florence, model=model.eval())


def merge_adapter(florence: FlorenceModel) -> FlorenceModel:
    """Fold the LoRA update into the base weights: a plain Florence-2 model, as fast as before."""
    if not is_peft(florence.model):
        raise TypeError("This model has no LoRA adapter to merge.")
    return dataclasses.replace(florence, model=florence.model.merge_and_unload().eval())


def save_model(florence: FlorenceModel, path: str | Path) -> Path:
    """Write a full (or merged) model with its processor; ``load_model(path)`` reads it back."""
    if is_peft(florence.model):
        raise TypeError("Merge the adapter first (merge_adapter), or save it with save_adapter.")
    out = Path(path)
    florence.model.save_pretrained(out)
    florence.processor.save_pretrained(out)
    return out


def trainable_parameters(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def train(
    florence: FlorenceModel,
    samples: Sequence[TrainingSample],
    config: TrainingConfig | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
) -> TrainingHistory:
    """Fine-tune ``florence.model`` in place on ``samples``.

    With a LoRA model (:func:`add_lora`) only the adapter trains; otherwise every weight
    outside the frozen vision tower does. The model is left in eval mode.

    Args:
        florence: The model to train (load it in float32 for full fine-tuning).
        samples: Training samples, e.g. from :func:`~florence_helpers.training_data.read_coco`.
        config: Settings; see :class:`TrainingConfig`.
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
    if not samples:
        raise ValueError("No training samples.")
    model, processor = florence.model, florence.processor
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

    limit = base_model(model).config.text_config.max_position_embeddings
    too_long = [
        s.sample_id for s in samples if len(processor.tokenizer(s.target)["input_ids"]) > limit
    ]
    if too_long:
        raise ValueError(
            f"{len(too_long)} target(s) are longer than the {limit} tokens the decoder can "
            f"write, e.g. {', '.join(too_long[:3])}. Split those images' objects over several "
            "samples (for example one OPEN_VOCABULARY_DETECTION sample per category)."
        )

    device = florence.device
    autocast_dtype = _autocast_dtype(config.mixed_precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
    batches_per_epoch = math.ceil(len(samples) / config.batch_size)
    accumulation = max(1, config.gradient_accumulation)
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = round(total_steps * config.warmup_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _warmup_then_decay(step, warmup, total_steps)
    )
    history = TrainingHistory()
    done_steps = 0
    checkpoint = Path(config.checkpoint_dir) / _CHECKPOINT if config.checkpoint_dir else None
    if checkpoint is not None and resume and checkpoint.is_file():
        done_steps, history = _load_checkpoint(
            checkpoint, model, optimizer, scheduler, scaler, len(samples)
        )

    unfinished = done_steps < total_steps
    features = (
        _encode_images(model, processor, samples, device, progress)
        if config.cache_image_features and unfinished
        else None
    )
    prompt_ids = _prompt_ids(processor, samples) if features is not None else None
    if not done_steps:
        torch.manual_seed(config.seed)  # dropout masks; a resumed run restores the saved state
    model.train()
    if config.freeze_vision:
        vision_tower(model).eval()

    def prepare(batch: list[TrainingSample]) -> dict[str, torch.Tensor]:
        if features is None:
            return collate(processor, batch)
        return _cached_batch(processor, batch, prompt_ids, features)

    def save_checkpoint() -> None:
        if checkpoint is not None:
            _save_checkpoint(
                checkpoint, model, optimizer, scheduler, scaler, done_steps, history, len(samples)
            )

    bar = tqdm(
        total=total_steps, initial=done_steps, desc="training", unit="step", disable=not progress
    )
    started = time.perf_counter()
    seconds_before = history.seconds
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            for epoch in range(done_steps // steps_per_epoch, config.epochs):
                groups = _epoch_plan(samples, config.batch_size, accumulation, config.seed + epoch)
                first = done_steps - epoch * steps_per_epoch  # steps of this epoch already done
                epoch_losses = history.losses[len(history.losses) - first :] if first else []

                batches = _prefetched(pool, prepare, [b for group in groups[first:] for b in group])
                for group in groups[first:]:
                    prepared = [next(batches) for _ in group]
                    # Average over every target token of the step, not per batch, so that
                    # accumulating two batches of 2 gives the same gradient as one batch of 4.
                    tokens = sum(int((inputs["labels"] != -100).sum()) for inputs in prepared)
                    group_loss = 0.0
                    for inputs in prepared:
                        inputs = {k: v.to(device) for k, v in inputs.items()}
                        with torch.autocast(
                            device.type,
                            dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None,
                        ):
                            loss = _forward(model, inputs, num_items_in_batch=tokens).loss
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"The loss became {loss.item()} at step {done_steps + 1}: "
                                "lower the learning rate."
                            )
                        scaler.scale(loss).backward()
                        group_loss += loss.item()
                        history.samples_seen += len(inputs["labels"])
                    if config.max_grad_norm is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    history.learning_rates.append(scheduler.get_last_lr()[0])
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    done_steps += 1
                    history.losses.append(group_loss)
                    epoch_losses.append(group_loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{group_loss:.4f}", epoch=epoch + 1)
                    history.seconds = seconds_before + time.perf_counter() - started
                    if config.checkpoint_every and done_steps % config.checkpoint_every == 0:
                        save_checkpoint()
                history.epoch_losses.append(sum(epoch_losses) / len(epoch_losses))
                history.seconds = seconds_before + time.perf_counter() - started
                save_checkpoint()
    finally:
        bar.close()
        model.eval()
    return history


def _epoch_plan(
    samples: Sequence[TrainingSample], batch_size: int, accumulation: int, seed: int
) -> list[list[list[TrainingSample]]]:
    """One epoch in a seeded shuffled order: optimizer steps, each a list of batches."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [
        [samples[i] for i in order[start : start + batch_size]]
        for start in range(0, len(order), batch_size)
    ]
    return [batches[g : g + accumulation] for g in range(0, len(batches), accumulation)]


def _prefetched(pool: ThreadPoolExecutor, prepare: Any, batches: list[Any]) -> Iterator[Any]:
    """``prepare(batch)`` for each batch, the next one prepared on ``pool`` meanwhile."""
    upcoming = pool.submit(prepare, batches[0]) if batches else None
    for index in range(len(batches)):
        current = upcoming.result()
        if index + 1 < len(batches):
            upcoming = pool.submit(prepare, batches[index + 1])
        yield current


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Hide a deprecation notice peft triggers in transformers; nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        yield


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
    if device.type == "cpu" and mixed_precision:
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


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(
    path: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    step: int,
    history: TrainingHistory,
    num_samples: int,
) -> None:
    """Write the checkpoint to a temporary file, then rename it: a crash leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "num_samples": num_samples,
        "weights": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "history": dataclasses.asdict(history),
        "rng": torch.get_rng_state(),
    }
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _load_checkpoint(
    path: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    num_samples: int,
) -> tuple[int, TrainingHistory]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    found = {n: tuple(t.shape) for n, t in state["weights"].items()}
    if expected != found or state["num_samples"] != num_samples:
        raise ValueError(
            f"The checkpoint {path} was written for a different model, adapter or data set "
            "(its trainable weights or sample count differ). Use another checkpoint_dir, "
            "or pass resume=False to start over."
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
