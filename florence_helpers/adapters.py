"""LoRA adapters and saving: add one, save it, load it back, merge it, save a whole model.

An adapter (peft's LoRA) adds small trainable low-rank matrices beside chosen weights and
leaves the rest of the model as it was; :func:`~florence_helpers.finetune.train` then trains
only those. A saved adapter is a few megabytes and goes back onto the base checkpoint it was
trained from; merged, it gives a plain Florence-2 model as fast as the original.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .model import FlorenceModel, is_peft

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

    folder = Path(path).expanduser()
    weights = _check_adapter_folder(folder)
    try:
        with _quiet_peft():
            model = PeftModel.from_pretrained(florence.model, str(folder), is_trainable=trainable)
    except Exception as error:  # noqa: BLE001 - named for the user below
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "size mismatch" in str(error):
            raise AdapterError(
                f"The adapter in {folder} does not fit this model: {first}. It was trained on "
                "another base checkpoint (or, for a remote-code one, needs `python -m "
                "florence_helpers convert` first)."
            ) from None
        raise AdapterError(f"Could not load the adapter in {folder}: {first}") from error
    _check_all_weights_used(model, weights, folder)
    return dataclasses.replace(florence, model=model.eval())


class AdapterError(ValueError):
    """Raised for a folder that does not hold a LoRA adapter this model can take."""


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as a dict.

    Raises:
        FileNotFoundError: There is none.
        AdapterError: It is not JSON, or not a JSON object.
    """
    import json

    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"No LoRA adapter in {folder}: adapter_config.json is missing.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{config_path} is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise AdapterError(
            f"{config_path} holds a JSON {type(config).__name__}, not an adapter configuration."
        )
    return config


def _check_adapter_folder(folder: Path) -> Path:
    """Check the adapter's files before peft reads them; the weight file's path."""
    config_path = folder / "adapter_config.json"
    config = read_adapter_config(folder)
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterError(
            f"{config_path} describes a {kind!r} adapter; this package loads LoRA adapters "
            "(peft_type 'LORA')."
        )
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{config_path}: the rank r must be a whole number of at least 1.")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise AdapterError(
        f"{folder} has an adapter_config.json but no weights (adapter_model.safetensors)."
    )


def _check_all_weights_used(model: Any, weights: Path, folder: Path) -> None:
    """Refuse an adapter whose saved weights found no module to go to: peft drops them."""
    from peft.utils import get_peft_model_state_dict

    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(weights, "pt") as handle:
            saved = set(handle.keys())
    else:
        saved = set(torch.load(weights, map_location="cpu", weights_only=True))
    loaded = set(get_peft_model_state_dict(model))
    unused = sorted(saved - loaded)
    if unused:
        raise AdapterError(
            f"{len(unused)} weights of the adapter in {folder} match no module of this model "
            f"and would be dropped, e.g. {', '.join(unused[:4])}. The adapter was made for "
            "another model layout: a remote-code Florence-2 adapter needs `python -m "
            "florence_helpers convert` first."
        )


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


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Hide a deprecation notice peft triggers in transformers; nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        yield
