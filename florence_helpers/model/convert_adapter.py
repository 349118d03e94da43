"""LoRA adapters trained on the remote-code model, converted for the native one: every key
renamed, ``target_modules`` made exact, vocabulary-sized matrices padded to the native
vocabulary.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..boundary.inputs import InputError, expand_path, read_file
from .adapter_files import AdapterError, match_module_patterns
from .checkpoint_files import native_name
from .convert_output import _check_output, _reading, _written_atomically
from .weight_files import CheckpointError, _load_weights


def convert_adapter(
    old: str | os.PathLike, new: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Convert a LoRA adapter trained on the remote-code model for the native model.

    Every key (``base_model.model.<module>.lora_A.weight``) gets its native module path, and
    ``target_modules`` becomes the exact list of native modules the adapter holds weights for:
    a module name such as ``proj`` means more modules in Microsoft's model (it also names the
    patch-embedding convolutions, ``conv`` in the native one), so names are not translated one
    by one. LoRA matrices sized by the vocabulary (``lm_head``, embeddings) are padded with
    zeros to the native vocabulary (one more token, ``<image>``, rounded up to a multiple of
    64), which leaves the adapter's effect on every original token unchanged. Load the result
    with :func:`~florence_helpers.model.adapters.load_adapter` on the converted checkpoint.

    Raises:
        CheckpointError: ``old`` holds no adapter (``adapter_config.json`` and weights), one
            of its files is damaged or holds wrong values (the message names the file), its
            weights are incomplete (a ``lora_A`` without its ``lora_B``), the adapter cannot
            be converted whole (the message says why), or ``new`` exists and is not empty.
        OutputError: ``new`` is a file, or is (or holds) ``old``; checked before anything is
            read.
        OSError: Writing failed (a full disk, a read-only folder); nothing is left behind.
    """
    source = expand_path(old)
    target = expand_path(new)
    _check_output(target, source, overwrite)
    with _reading(source):
        config = _read_adapter_config(source)
        weights = [source / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
        weights = [w for w in weights if w.is_file()]
        if not weights:
            raise CheckpointError(
                f"{source} has an adapter_config.json but no adapter_model.safetensors or .bin."
            )
        if config.get("modules_to_save"):
            raise CheckpointError(
                f"The adapter in {source} also saves whole modules (modules_to_save: "
                f"{config['modules_to_save']}), which this converter does not translate. Merge "
                "it into the remote-code model (peft's merge_and_unload), save that, and "
                "convert the merged checkpoint instead."
            )
        state = _load_weights(weights[:1])
        renamed, modules = _native_adapter_weights(state, weights[0])
        config = _native_adapter_config(config, state, modules, source / "adapter_config.json")
        # Serialised here, so that writing is only writing (a full disk is an OSError).
        contents = {
            weights[0].name: _serialised(renamed, weights[0].suffix),
            "adapter_config.json": json.dumps(config, indent=2).encode("utf-8"),
        }
    with _written_atomically(target, overwrite) as folder:
        for name, data in contents.items():
            (folder / name).write_bytes(data)
        left_out = _copy_extras(source, folder)
    if left_out:
        warnings.warn(
            f"Not copied into {target}: {'; '.join(left_out)}.", UserWarning, stacklevel=2
        )
    return target


_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MAX_EXTRA_BYTES = 64 * 2**20
"""The largest other file (a README, training notes) copied along with an adapter; all of them
together at most four times that."""


def _copy_extras(source: Path, folder: Path) -> list[str]:
    """Copy the adapter folder's other files into the new one: regular files only, never what
    a symbolic link points to (it may be any file of the user's), within
    :data:`MAX_EXTRA_BYTES` each and four times that in all. Folders are not copied.

    Returns:
        The files left out, each with why.
    """
    left_out, budget = [], 4 * MAX_EXTRA_BYTES
    for extra in sorted(source.iterdir()):
        if extra.name in _ADAPTER_FILES or (extra.is_dir() and not extra.is_symlink()):
            continue
        try:
            data = read_file(extra, max_bytes=min(MAX_EXTRA_BYTES, budget), follow_links=False)
        except (OSError, InputError) as error:
            left_out.append(f"{extra.name} ({str(error).split(': ', 1)[-1].rstrip('.')})")
            continue
        budget -= len(data)
        (folder / extra.name).write_bytes(data)
    return left_out


def _serialised(state: Mapping[str, torch.Tensor], suffix: str) -> bytes:
    """Adapter weights as the bytes of a safetensors (or, for ``.bin``, a torch) file."""
    if suffix == ".safetensors":
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in state.items()})
    import io

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


_ADAPTER_PREFIX = "base_model.model."


# What follows a module's path in an adapter key: the LoRA, DoRA and bias tensors peft saves.
_ADAPTER_PART = re.compile(r"\.(lora_[A-Za-z_]+|lora_magnitude_vector)(\.weight|\.bias)?$")
_VOCABULARY_MODULES = re.compile(r"(^|\.)(lm_head|shared|embed_tokens)$")


def native_vocabulary_size(rows: int) -> int:
    """The native model's vocabulary for a remote-code one of ``rows`` tokens.

    The native tokenizer adds ``<image>``, and the embeddings are padded to a multiple of 64,
    as transformers' conversion script does (51,289 tokens become 51,328 rows).
    """
    return -(-(rows + 1) // 64) * 64


def _native_adapter_weights(
    state: Mapping[str, torch.Tensor], source: Path
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Adapter weights under native names (vocabulary-sized ones padded), and the modules
    they belong to (native name -> remote name).

    Raises:
        CheckpointError: A key is not a LoRA weight, or a module's pair of LoRA matrices is
            incomplete or of ranks that differ (the adapter file is damaged or was edited).
    """
    renamed: dict[str, torch.Tensor] = {}
    modules: dict[str, str] = {}
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        part = _ADAPTER_PART.search(key)
        if not key.startswith(_ADAPTER_PREFIX) or part is None:
            raise CheckpointError(
                f"{source}: the adapter weight {key!r} is not a LoRA weight of a module "
                "(expected base_model.model.<module>.lora_A.weight and the like)."
            )
        if tensor.numel() == 0:
            raise CheckpointError(
                f"{source}: the adapter weight {key!r} is empty (shape {tuple(tensor.shape)}): "
                "the adapter file is damaged."
            )
        module = key[len(_ADAPTER_PREFIX) : part.start()]
        if part.group(2) != ".bias":
            parts.setdefault(module, {})[part.group(1)] = (key, tensor)
        native = native_name(module)
        modules[native] = module
        if _VOCABULARY_MODULES.search(module):
            tensor = _pad_vocabulary(tensor, part.group(1))
        renamed[_ADAPTER_PREFIX + native + part.group(0)] = tensor
    if not modules:
        raise CheckpointError(f"{source}: the adapter file holds no LoRA weights.")
    _check_lora_pairs(parts, source)
    return renamed, modules


_LORA_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


def _check_lora_pairs(
    parts: Mapping[str, Mapping[str, tuple[str, torch.Tensor]]], source: Path
) -> None:
    """Every module's ``lora_A`` has its ``lora_B`` (and the other way round), of one rank: a
    missing half would load as zeros, or not at all, and silently change the adapter."""
    missing: list[str] = []
    for held in parts.values():
        for first, second in _LORA_PAIRS:
            if (first in held) == (second in held):
                if first in held:
                    _check_rank(held[first], held[second], source)
                continue
            present, absent = (first, second) if first in held else (second, first)
            missing.append(held[present][0].replace(f".{present}", f".{absent}", 1))
    if missing:
        shown = ", ".join(sorted(missing)[:8]) + (
            f", and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise CheckpointError(
            f"{source} is incomplete: {len(missing)} LoRA weights are missing ({shown}), so "
            "those modules would not be adapted as trained. Save or download the adapter "
            "again."
        )


def _check_rank(down: tuple[str, torch.Tensor], up: tuple[str, torch.Tensor], source: Path) -> None:
    """A LoRA pair's ranks agree: rows of ``lora_A`` (``r x in``), columns of ``lora_B``."""
    (down_key, a), (up_key, b) = down, up
    if a.dim() < 2 or b.dim() < 2 or a.shape[0] != b.shape[1]:
        raise CheckpointError(
            f"{source}: {down_key} {tuple(a.shape)} and {up_key} {tuple(b.shape)} are not a "
            "LoRA pair (the rank, rows of lora_A and columns of lora_B, must agree): the "
            "adapter file is damaged."
        )


def _pad_vocabulary(tensor: torch.Tensor, part: str) -> torch.Tensor:
    """Zero rows (lm_head's lora_B) or columns (an embedding's lora_embedding_A) for the
    native model's extra vocabulary."""
    axis = 0 if part == "lora_B" else 1 if part == "lora_embedding_A" else None
    if axis is None:
        return tensor
    extra = native_vocabulary_size(tensor.shape[axis]) - tensor.shape[axis]
    padding = [0, 0] * (tensor.dim() - 1 - axis) + [0, extra]
    return torch.nn.functional.pad(tensor, padding)


def _native_adapter_config(
    config: dict[str, Any], state: Mapping[str, torch.Tensor], modules: dict[str, str], path: Path
) -> dict[str, Any]:
    """The adapter configuration for the native module names.

    ``target_modules`` lists exactly the modules holding weights (so nothing can be left out
    or added by a name that means other modules in the native model); per-module ranks and
    alphas are keyed by those native names; filters already applied to the list are dropped.
    """
    config = dict(config)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"The adapter in {path.parent} is {config['peft_type']!r}, not LoRA: only LoRA "
            "adapters convert."
        )
    for field in ("peft_type", "r"):
        if field not in config:
            raise CheckpointError(
                f"{path}: the adapter configuration has no {field!r}, which every adapter peft "
                'saves has (a LoRA adapter\'s say "peft_type": "LORA" and its rank '
                '"r"): the file is incomplete. Save or download the adapter again.'
            )
    # peft's rule: the first key matching the end of the module path (bounded in time).
    only = {f: config[f] for f in ("rank_pattern", "alpha_pattern") if config.get(f)}
    try:
        first = match_module_patterns(only, modules.values(), path)
    except AdapterError as error:
        raise CheckpointError(str(error)) from None
    patterns = {}
    for field in ("rank_pattern", "alpha_pattern"):
        keys = list(config.get(field) or {})
        patterns[field] = {
            native: config[field][keys[index]]
            for native, index in zip(modules, first.get(field, [None] * len(modules)), strict=True)
            if index is not None
        }
    config.update(
        target_modules=sorted(modules),
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
    )
    # Microsoft's model was loaded as a causal LM; the native one is an encoder-decoder, which
    # peft's plain wrapper serves (as adapters made by florence_helpers.add_lora are saved).
    if config.get("task_type") == "CAUSAL_LM":
        config["task_type"] = None
    base = str(config.get("base_model_name_or_path") or "")
    if base.lower().startswith("microsoft/florence-2"):
        config["base_model_name_or_path"] = "florence-community/" + base.split("/", 1)[1]
    _ = state
    return config


def _read_adapter_config(source: Path) -> dict[str, Any]:
    from .adapter_files import AdapterError, read_adapter_config

    try:
        return read_adapter_config(source)
    except FileNotFoundError:
        raise CheckpointError(
            f"{source} holds no adapter: there is no adapter_config.json."
        ) from None
    except AdapterError as error:
        raise CheckpointError(str(error)) from None
