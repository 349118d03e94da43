"""LoRA adapters and saving: add one, save it, load it back, merge it, save a whole model.

An adapter (peft's LoRA) adds small trainable low-rank matrices beside chosen weights and
leaves the rest of the model as it was; :func:`~florence_helpers.training.train` then trains only
those. A saved adapter is a few megabytes and goes back onto the base checkpoint it was
trained from; merged, it gives a plain Florence-2 model as fast as the original.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..boundary.inputs import expand_path
from .adapter_files import (
    AdapterError,
    _check_adapter_folder,
    _check_ranks,
    _saved_weight_shapes,
    match_module_patterns,
)
from .convert_output import write_model_folder
from .loading import FlorenceModel, is_peft

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
    """Write the LoRA adapter (a few MB) and the processor to the folder ``path``.

    Save before :func:`merge_adapter`, which folds the LoRA layers into the weights in place.

    The folder is written whole: created, or replaced if it holds an earlier adapter or model
    (never a folder with other files, nor the model's own folder).

    Raises:
        TypeError: The model has no adapter, or it was merged.
        OutputError: ``path`` may not be written or replaced.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not is_peft(florence.model):
        raise TypeError("This model has no LoRA adapter: save it with save_model instead.")
    if not any(isinstance(m, BaseTunerLayer) for m in florence.model.modules()):
        raise TypeError(
            "This model's LoRA layers are gone: merge_adapter folds them into the weights in "
            "place. Save the adapter before merging, or save the merged model with save_model."
        )
    return write_model_folder(path, _saver(florence), inputs=_model_folder(florence))


def load_adapter(
    florence: FlorenceModel, path: str | Path, *, trainable: bool = False
) -> FlorenceModel:
    """Put a saved LoRA adapter on a base model (the one it was trained from).

    The adapter loads whole or not at all: every tensor peft expects for the adapter's
    configuration must be in its weight file (a missing one would silently stay at its
    initial value, zero for ``lora_B``), and every tensor in the file must find its module.

    Args:
        florence: The base model, e.g. ``load_model("florence-community/Florence-2-base")``.
        path: A directory written by :func:`save_adapter`.
        trainable: Keep training the adapter (otherwise it is loaded for inference).

    Raises:
        FileNotFoundError: ``path`` holds no ``adapter_config.json``.
        AdapterError: The adapter's configuration or weight file is damaged (the message
            names the file), tensors are missing from it or match no module (they are
            named), or it was made for another model. ``florence`` is left as it was.
    """
    from peft import PeftConfig, PeftModel

    folder = expand_path(path)
    weights, settings = _check_adapter_folder(folder)
    shapes = _saved_weight_shapes(weights)
    _check_ranks(folder, settings, shapes)
    names = _names_peft_matches(florence.model)
    matches = match_module_patterns(settings, names, folder / "adapter_config.json")
    _check_allocation(
        folder,
        settings,
        shapes,
        dict(zip(names, _targeted(matches, names), strict=True)),
        florence.model,
    )
    saved = set(shapes)
    had_config = "peft_config" in vars(florence.model)
    try:
        with _quiet_peft():
            # The configuration checked above, not the file read again (it may have changed).
            # Every saved tensor replaces its initial value, so none is computed: PiSSA or
            # OLoRA initialisation would rewrite the base weights (and may run for minutes).
            fields = {k: v for k, v in settings.items() if k != "runtime_config"}
            config = PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**fields))
            config.init_lora_weights = False
            model = PeftModel.from_pretrained(
                florence.model, str(folder), is_trainable=trainable, config=config
            )
    except Exception as error:  # noqa: BLE001 - named for the user below
        _remove_lora_layers(florence.model, had_config)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "size mismatch" in str(error):
            raise AdapterError(
                f"The adapter in {folder} does not fit this model: {first}. It was trained on "
                "another base checkpoint (or, for a remote-code one, needs `python -m "
                "florence_helpers convert` first)."
            ) from None
        if isinstance(error, TypeError | ValueError):  # peft's LoraConfig refused a value
            raise AdapterError(
                f"{folder / 'adapter_config.json'} holds a value peft cannot use: {first}"
            ) from None
        raise AdapterError(f"Could not load the adapter in {folder}: {first}") from error
    try:
        _check_all_weights_used(model, saved, weights)
    except AdapterError:
        _remove_lora_layers(florence.model, had_config)
        raise
    folders = (*florence.adapter_folders, str(folder))
    return dataclasses.replace(florence, model=model.eval(), adapter_folders=folders)


def _targeted(matches: dict[str, list[int | None]], names: list[str]) -> list[bool]:
    """Per name, whether the adapter's target_modules take it and exclude_modules do not."""
    targets = matches.get("target_modules") or [None] * len(names)
    excluded = matches.get("exclude_modules") or [None] * len(names)
    return [t is not None and e is None for t, e in zip(targets, excluded, strict=True)]


def _check_allocation(
    folder: Path,
    settings: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    targeted: dict[str, bool],
    model: Any,
) -> None:
    """Refuse, before peft allocates anything, an adapter whose LoRA matrices would take far
    more than its weight file holds: peft makes ``r x (in + out)`` numbers for every module
    its patterns take, so one large tensor and a wide pattern (a 0.4 MB file, rank 400,000 on
    every attention layer) asked for hundreds of gigabytes.

    The estimate takes the largest rank for every module the patterns match; a file holding
    the matrices it describes passes (at least 8 times its numbers, or 64 M, are allowed).
    """
    rank = max([settings.get("r") or 1, *(settings.get("rank_pattern") or {}).values()])
    modules = dict(model.named_modules())
    cost = 0
    for name, taken in targeted.items():
        weight = getattr(modules.get(name), "weight", None)
        if taken and isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            cost += rank * (weight.shape[0] + math.prod(weight.shape[1:]))
    saved = sum(math.prod(shape) for shape in shapes.values())
    if cost > max(_ALLOCATION_PER_SAVED * saved, _ALLOCATION_FLOOR):
        raise AdapterError(
            f"{folder / 'adapter_config.json'} asks for LoRA matrices of about {cost:,} numbers "
            f"(rank {rank} on the modules its patterns take), but its weight file holds "
            f"{saved:,}: the configuration does not belong to these weights."
        )


_ALLOCATION_PER_SAVED = 8
_ALLOCATION_FLOOR = 2**26


def _names_peft_matches(model: Any) -> list[str]:
    """Every name peft matches an adapter's patterns against while loading: the modules, its
    embedding layer names, and the tied weights' keys and modules."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    names = {name for name, _ in model.named_modules()} | set(EMBEDDING_LAYER_NAMES)
    for attribute in ("all_tied_weights_keys", "_tied_weights_keys"):
        tied = getattr(model, attribute, None) or {}
        for key in [*tied, *(tied.values() if isinstance(tied, dict) else [])]:
            if isinstance(key, str):
                names |= {key, key.removesuffix(".weight")}
    return sorted(names)


def _check_all_weights_used(model: Any, saved: set[str], weights: Path) -> None:
    """Refuse an adapter whose weights do not match the modules peft made for it: tensors
    in the file that found no module (peft drops them) or tensors peft expects that the file
    does not hold (they would keep their initial values: zero for ``lora_B``)."""
    from peft.utils import get_peft_model_state_dict

    with warnings.catch_warnings():  # peft's note that it counts lm_head.weight in
        warnings.filterwarnings("ignore", "Setting `save_embedding_layers` to `True`")
        loaded = set(get_peft_model_state_dict(model))
    unused = sorted(saved - loaded)
    if unused:
        raise AdapterError(
            f"{len(unused)} weights of the adapter in {weights.parent} match no module of this "
            f"model and would be dropped, e.g. {', '.join(unused[:4])}. The adapter was made "
            "for another model layout: a remote-code Florence-2 adapter needs `python -m "
            "florence_helpers convert` first."
        )
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    missing = sorted(expected - saved)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f", and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise AdapterError(
            f"{weights} is missing {len(missing)} of the {len(expected)} tensors its "
            f"adapter_config.json calls for: {shown}. Loaded, they would stay at their "
            "initial values (zero for lora_B) and the adapter would not do what it was "
            "trained to do. The file is incomplete: save or download the adapter again."
        )


def _remove_lora_layers(model: Any, had_config: bool) -> None:
    """Undo peft's injection into ``model`` after a refused load: every LoRA layer put in
    place of a module is replaced by that module again (and the ``peft_config`` peft set on
    it is removed, unless it had one before), so the caller's model is as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not had_config:
        vars(model).pop("peft_config", None)

    for _level in range(8):  # nested layers come out one level per pass
        names = [
            name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)
        ]
        if not names:
            return
        for name in names:
            parent_name, _, child = name.rpartition(".")
            try:
                parent = model.get_submodule(parent_name)
                layer = getattr(parent, child)
            except AttributeError:  # inside a layer already taken out
                continue
            if isinstance(layer, BaseTunerLayer):
                setattr(parent, child, layer.get_base_layer())


def merge_adapter(florence: FlorenceModel) -> FlorenceModel:
    """Fold the LoRA update into the base weights: a plain Florence-2 model, as fast as before.

    The folding happens in place (peft's ``merge_and_unload``): ``florence`` itself loses its
    LoRA layers, so save the adapter (:func:`save_adapter`) before merging if you need it.

    The merged model keeps the adapter's identity in ``merged_adapter`` (its fingerprint;
    merged again, the fingerprint of both), so :func:`adapter_fingerprint` still tells it
    from the base checkpoint and from other merges.
    """
    if not is_peft(florence.model):
        raise TypeError("This model has no LoRA adapter to merge.")
    merged = _lora_fingerprint(florence.model)
    if florence.merged_adapter is not None:
        merged = _short_hash(f"{florence.merged_adapter}+{merged}".encode())
    return dataclasses.replace(
        florence, model=florence.model.merge_and_unload().eval(), merged_adapter=merged
    )


def adapter_fingerprint(florence: FlorenceModel) -> str | None:
    """What adapter a model carries, as a short stable identity (for labels and caches).

    Returns:
        None for a plain model; for one with a LoRA adapter, ``"sha256:"`` and 16 hex digits
        of a hash of its weights (names, shapes, dtypes and bytes) and their scaling, the same
        for the same adapter loaded twice and different for any other adapter or the same one
        trained further; for a model an adapter was merged into (:func:`merge_adapter`),
        ``"merged:"`` and that fingerprint; for an adapter on such a model,
        ``"merged:<merged>+<adapter>"``.

    The base checkpoint is not part of it: pair it with ``florence.model_id``.

    Example:
        >>> adapter_fingerprint(load_adapter(load_model(), "my-adapter"))  # doctest: +SKIP
        'sha256:5d41402abc4b2a76'
    """
    merged = None if florence.merged_adapter is None else f"merged:{florence.merged_adapter}"
    if not is_peft(florence.model):
        return merged
    own = _lora_fingerprint(florence.model)
    return own if merged is None else f"{merged}+{own}"


def _lora_fingerprint(model: Any) -> str:
    """``sha256:<16 hex>`` over the active adapters' tensors and each LoRA layer's scaling.

    Names have peft's adapter name removed (``default``), so the same adapter loaded under
    another name has the same fingerprint.
    """
    from peft.utils import get_peft_model_state_dict

    digest = hashlib.sha256()
    names = getattr(model, "active_adapters", None) or [model.active_adapter]
    for adapter in names:
        state = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
        for key in sorted(state):
            tensor = state[key].detach().to("cpu").contiguous()
            digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        for name, module in model.named_modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and adapter in scaling:
                digest.update(f"{name}|scaling={float(scaling[adapter])!r}|".encode())
    return "sha256:" + digest.hexdigest()[:16]


def _short_hash(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def save_model(florence: FlorenceModel, path: str | Path) -> Path:
    """Write a full (or merged) model with its processor; ``load_model(path)`` reads it back.

    The folder is written as :func:`save_adapter` writes one (whole, never over other files).
    """
    if is_peft(florence.model):
        raise TypeError("Merge the adapter first (merge_adapter), or save it with save_adapter.")
    return write_model_folder(path, _saver(florence), inputs=_model_folder(florence))


def _saver(florence: FlorenceModel) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        florence.model.save_pretrained(folder)
        florence.processor.save_pretrained(folder)

    return write


def _model_folder(florence: FlorenceModel) -> list[Path]:
    """The local folders the model and its adapters were loaded from: a save must never
    replace them (a merged model saved over the adapter it came from deleted the adapter)."""
    folders = [expand_path(str(name)) for name in (florence.model_id, *florence.adapter_folders)]
    return [folder for folder in folders if folder.is_dir()]


def trainable_parameters(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Hide a deprecation notice peft triggers in transformers; nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        # load_adapter refuses such an adapter itself, naming the tensors.
        warnings.filterwarnings("ignore", "Found missing adapter keys")
        yield
