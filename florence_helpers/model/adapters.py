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
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..boundary.inputs import expand_path
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

    The folder is written whole: created, or replaced if it holds an earlier adapter or model
    (never a folder with other files, nor the model's own folder).

    Raises:
        TypeError: The model has no adapter.
        OutputError: ``path`` may not be written or replaced.
    """
    if not is_peft(florence.model):
        raise TypeError("This model has no LoRA adapter: save it with save_model instead.")
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
    weights = _check_adapter_folder(folder)
    shapes = _saved_weight_shapes(weights)
    _check_ranks(folder, shapes)
    saved = set(shapes)
    had_config = "peft_config" in vars(florence.model)
    try:
        with _quiet_peft():
            config = PeftConfig.from_pretrained(str(folder))
            # Every saved tensor replaces its initial value, so none is computed: PiSSA or
            # OLoRA initialisation would rewrite the base weights (and may run for minutes).
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
    except OSError as error:
        raise AdapterError(f"Could not read {config_path}: {error.strerror or error}.") from None
    if not isinstance(config, dict):
        raise AdapterError(
            f"{config_path} holds a JSON {type(config).__name__}, not an adapter configuration."
        )
    _check_config_types(config, config_path)
    return config


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# The fields of adapter_config.json this package and peft read, each with what it may be
# (null is always allowed: peft's default). peft would otherwise fail on these deep inside
# its module matching, or take a string for a list of one-letter module names.
_CONFIG_FIELDS: dict[str, tuple[Any, str]] = {
    "peft_type": (_is_text, "a string"),
    "r": (lambda v: _is_whole(v) and v >= 1, "a whole number of at least 1"),
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number from 0 to below 1"),
    "target_modules": (lambda v: _is_text(v) or _is_texts(v), "a string or a list of strings"),
    "exclude_modules": (lambda v: _is_text(v) or _is_texts(v), "a string or a list of strings"),
    "modules_to_save": (_is_texts, "a list of strings"),
    "layers_pattern": (lambda v: _is_text(v) or _is_texts(v), "a string or a list of strings"),
    "layers_to_transform": (
        lambda v: _is_whole(v) or (isinstance(v, list) and all(_is_whole(i) for i in v)),
        "a whole number or a list of them",
    ),
    "rank_pattern": (
        lambda v: isinstance(v, dict) and all(_is_whole(i) and i >= 1 for i in v.values()),
        "an object of module patterns and ranks (whole numbers of at least 1)",
    ),
    "alpha_pattern": (
        lambda v: isinstance(v, dict) and all(_is_number(i) for i in v.values()),
        "an object of module patterns and alphas (numbers)",
    ),
    "base_model_name_or_path": (_is_text, "a string"),
    "task_type": (_is_text, "a string"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
}


def _check_config_types(config: dict[str, Any], config_path: Path) -> None:
    """Refuse an adapter configuration with a field of the wrong type, naming it."""
    for field, (fits, expected) in _CONFIG_FIELDS.items():
        value = config.get(field)
        if value is not None and not fits(value):
            if field == "r":
                raise AdapterError(
                    f"{config_path}: the rank r must be a whole number of at least 1, got "
                    f"{value!r}."
                )
            raise AdapterError(
                f"{config_path}: {field} is {value!r}, but must be {expected} (or null). The "
                "file is damaged or was edited by hand: save or download the adapter again."
            )


# Fields that make peft copy layers or compute weights while building the adapter: refused.
# (init_lora_weights is not: loading always starts from plain LoRA, see load_adapter.)
_STRUCTURE_FIELDS = ("layer_replication", "megatron_config", "loftq_config")


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
    for field in _STRUCTURE_FIELDS:
        if config.get(field) not in (None, False, [], {}):
            raise AdapterError(
                f"{config_path} sets {field}, which changes the model's structure or weights "
                "while loading; this package loads plain LoRA adapters only."
            )
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise AdapterError(
        f"{folder} has an adapter_config.json but no weights (adapter_model.safetensors)."
    )


_LORA_A = re.compile(r"lora_(?:embedding_)?A(?:\.|$)")
_LORA_B = re.compile(r"lora_(?:embedding_)?B(?:\.|$)")


def _check_ranks(folder: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, before peft allocates anything, a configuration asking for a larger rank than
    the weight file holds: the LoRA matrices are made at the configured rank, so a 40 kB
    folder saying ``r: 1000000`` would ask for gigabytes before failing on a size mismatch.

    The rank of a saved tensor is the first dimension of a ``lora_A`` (or
    ``lora_embedding_A``) matrix and the second of a ``lora_B`` (``lora_embedding_B``); an
    empty tensor (a dimension of 0, no data) counts as damage, not as a rank.
    """
    config = read_adapter_config(folder)
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"{folder / 'adapter_config.json'}: rank_pattern must be an object.")
    asked = [config.get("r"), *pattern.values()]
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in asked):
        raise AdapterError(
            f"{folder / 'adapter_config.json'}: every rank (r, rank_pattern) must be a whole "
            "number of at least 1."
        )
    empty = sorted(name for name, shape in shapes.items() if 0 in shape)
    if empty:
        raise AdapterError(
            f"{folder}: the adapter's weight {empty[0]} is empty (a dimension of size 0): the "
            "weight file is damaged."
        )
    saved = [shape[0] for name, shape in shapes.items() if _LORA_A.search(name) and shape]
    saved += [shape[1] for name, shape in shapes.items() if _LORA_B.search(name) and len(shape) > 1]
    if not saved:
        raise AdapterError(f"{folder}: the adapter's weight file holds no LoRA matrices.")
    if max(asked) > max(saved):
        raise AdapterError(
            f"{folder / 'adapter_config.json'} asks for rank {max(asked)}, but the adapter's "
            f"weights have rank {max(saved)} at most: the configuration does not belong to "
            "these weights."
        )


def _saved_weight_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes in an adapter's weight file, which is checked whole first
    (a safetensors file's shapes are read from its header, nothing is loaded).

    Raises:
        AdapterError: The file is damaged or cut short, or a ``.bin`` is a pickle holding
            more than tensors (it is never unpickled), naming the file.
    """
    from .weight_files import CheckpointError, read_weight_file

    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(weights, "pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except OSError as error:
            raise AdapterError(f"Could not read {weights}: {error.strerror or error}.") from None
        except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
            text = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise AdapterError(
                f"{weights}: this safetensors file is damaged or cut short ({text}). Save or "
                "download the adapter again."
            ) from None
    try:
        return {k: tuple(v.shape) for k, v in read_weight_file(weights).items()}
    except CheckpointError as error:
        raise AdapterError(str(error).replace("the checkpoint", "the adapter")) from None


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
    """The local folder the model was loaded from, which a save must never replace."""
    folder = expand_path(str(florence.model_id))
    return [folder] if folder.is_dir() else []


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
