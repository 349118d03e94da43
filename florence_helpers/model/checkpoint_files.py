"""What a checkpoint folder holds: its layout (native or remote-code), its ``config.json``
checked for structure, sizes and types, and the weight names of the remote-code model
translated to the native ones (:func:`native_name`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..boundary.inputs import MAX_CONFIG_FILE_BYTES, InputError, expand_path, read_file
from .weight_files import WEIGHT_FILES, CheckpointError, _check_weight_file, _weight_files

# Remote-code weight names -> native ones, applied in order to every key and module path, each
# with a dot appended (so that a pattern ending in a dot matches a module path too).
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^vision_tower\.convs\.(\d+)\.proj\.", r"model.vision_tower.convs.\1.conv."),
        (r"^vision_tower\.", "model.vision_tower."),
        (r"\.(conv[12])\.fn\.dw\.", r".\1."),
        (r"\.(?:window_attn|channel_attn)\.norm\.", ".norm1."),
        (r"\.(window_attn|channel_attn)\.fn\.", r".\1."),
        (r"\.ffn\.norm\.", ".norm2."),
        (r"\.ffn\.fn\.net\.", ".ffn."),
        (r"^image_projection\.$", "model.multi_modal_projector.image_projection.weight."),
        (r"^image_proj_norm\.", "model.multi_modal_projector.image_proj_norm."),
        (r"^image_pos_embed\.", "model.multi_modal_projector.image_position_embed."),
        (r"^visual_temporal_embed\.", "model.multi_modal_projector.visual_temporal_embed."),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
    ]
]


REMOTE_TEXT_MODEL = "florence2_language"


def native_name(remote: str) -> str:
    """The native transformers name of a remote-code Florence-2 weight (or module path).

    Example:
        >>> native_name("vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight")
        'model.vision_tower.blocks.0.0.spatial_block.window_attn.qkv.weight'
        >>> native_name("language_model.model.encoder.layers.0.fc1.weight")
        'model.language_model.encoder.layers.0.fc1.weight'
        >>> native_name("vision_tower.convs.0.proj")  # a module path
        'model.vision_tower.convs.0.conv'
    """
    name = remote + "."
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name[:-1]


def checkpoint_layout(path: str | os.PathLike) -> str:
    """``"native"`` or ``"remote-code"``: which Florence-2 layout the folder holds.

    Only what is cheap to check is read: ``config.json`` (its values must have the types and
    ranges Florence-2 needs; a native one must be one transformers accepts) and the headers
    of the safetensors weight files (a file cut short is caught here, not while loading).

    Raises:
        CheckpointError: No folder, no readable ``config.json`` (or one with wrong values),
            another model type, no weights, or a damaged safetensors file. The message names
            the file.
    """
    folder = expand_path(path)
    config = _read_config(folder)
    model_type = config.get("model_type")
    if model_type != "florence2" and not (isinstance(model_type, str) and model_type):
        said = "has no model_type" if model_type is None else f"has model_type {model_type!r}"
        raise CheckpointError(
            f"{folder / 'config.json'} {said}, so it does not describe a Florence-2 checkpoint "
            '(expected "model_type": "florence2"). The file is damaged or belongs to another '
            "model."
        )
    if model_type != "florence2":
        raise CheckpointError(
            f"{folder} holds a {model_type or 'model of unknown type'!s} checkpoint, not "
            "Florence-2 (config.json: model_type is "
            f"{model_type!r}, expected 'florence2')."
        )
    files = _weight_files(folder)
    if not files:
        raise CheckpointError(
            f"{folder} has a Florence-2 config.json but no weights: expected "
            f"{' or '.join(WEIGHT_FILES)} (or a sharded index) beside it."
        )
    for file in files:
        _check_weight_file(file)
    text = config.get("text_config") or {}
    remote = (
        "auto_map" in config
        or text.get("model_type") == REMOTE_TEXT_MODEL
        or "dim_embed" in (config.get("vision_config") or {})
    )
    if not remote:
        _check_native_config(folder / "config.json", config)
    return "remote-code" if remote else "native"


def convert_command(old: str | os.PathLike, new: str | os.PathLike | None = None) -> str:
    """The shell command that converts ``old`` (for messages)."""
    target = new if new is not None else f"{expand_path(old).name or 'florence2'}-native"
    return f"python -m florence_helpers convert {old} {target}"


def _read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` as a dict, its sections and sizes checked (see :func:`_check_config`)."""
    if not folder.is_dir():
        raise CheckpointError(f"No checkpoint folder at {folder}.")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no model checkpoint: there is no config.json.")
    try:
        config = json.loads(read_file(path, max_bytes=MAX_CONFIG_FILE_BYTES).decode("utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}.") from None
    except InputError as error:  # not a regular file, or far too large for a configuration
        raise CheckpointError(str(error)) from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be a model configuration.") from None
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{path} is not UTF-8 text, so not a model configuration: the file is damaged. "
            "Download the checkpoint again."
        ) from None
    except OSError as error:
        raise CheckpointError(f"Could not read {path}: {error.strerror or error}.") from None
    _check_config(config, path)
    return config


# Sizes that must be whole numbers of at least 1 (lists of them for the vision stages), in
# either layout (the remote-code one's names included); a value of another type or a zero or
# negative size would fail deep inside model construction instead.
_TEXT_SIZES = (
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "vocab_size",
    "max_position_embeddings",
)


_VISION_SIZES = (
    "embed_dim",
    "dim_embed",
    "num_heads",
    "num_groups",
    "depths",
    "patch_size",
    "patch_stride",
    "window_size",
    "projection_dim",
    "max_position_embeddings",
    "max_temporal_embeddings",
)


_VISION_SECTIONS = {
    "visual_temporal_embedding": ("max_temporal_embeddings",),
    "image_pos_embed": ("max_pos_embeddings",),
}


def _check_config(config: Any, path: Path) -> None:
    """Refuse a ``config.json`` whose structure or sizes cannot describe a Florence-2.

    Raises:
        CheckpointError: Naming the file, the field and what it should be.
    """
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path} holds a JSON {_json_type(config)}, not a model configuration (a JSON "
            "object): the file is damaged. Download the checkpoint again."
        )
    sections: list[tuple[str, Any, tuple[str, ...]]] = [("", config, ("projection_dim",))]
    for name, sizes in (("text_config", _TEXT_SIZES), ("vision_config", _VISION_SIZES)):
        section = config.get(name)
        if section is not None and not isinstance(section, dict):
            raise CheckpointError(
                f"{path}: {name} is a JSON {_json_type(section)}, but must be an object (the "
                f"{name.split('_')[0]} model's settings). Fix or download config.json again."
            )
        sections.append((name + ".", section or {}, sizes))
    vision = config.get("vision_config") or {}
    for name, sizes in _VISION_SECTIONS.items():
        section = vision.get(name)
        if section is not None and not isinstance(section, dict):
            raise CheckpointError(
                f"{path}: vision_config.{name} is a JSON {_json_type(section)}, but must be an "
                "object. Fix or download config.json again."
            )
        sections.append((f"vision_config.{name}.", section or {}, sizes))
    for prefix, section, sizes in sections:
        for field in sizes:
            if field not in section:
                continue
            value = section[field]
            if prefix == "vision_config." and field in _STAGES:
                fits = isinstance(value, list) and bool(value) and all(map(_is_size, value))
                expected = "a list of whole numbers of at least 1, one per vision stage"
            else:
                fits, expected = _is_size(value), "a whole number of at least 1"
            if not fits:
                raise CheckpointError(
                    f"{path}: {prefix}{field} is {value!r}, but must be {expected}. Fix or "
                    "download config.json again."
                )
    _check_shapes(config, path)


def _check_shapes(config: dict[str, Any], path: Path) -> None:
    """Sizes that must agree: attention heads that divide the text width, and one value per
    vision stage in every per-stage setting (sizes are already whole numbers here)."""
    text = config.get("text_config") or {}
    width = text.get("d_model")
    for field in ("encoder_attention_heads", "decoder_attention_heads"):
        heads = text.get(field)
        if width is not None and heads is not None and width % heads:
            raise CheckpointError(
                f"{path}: text_config.{field} ({heads}) does not divide text_config.d_model "
                f"({width}), as attention heads must. Fix or download config.json again."
            )
    vision = config.get("vision_config") or {}
    lengths = {field: len(vision[field]) for field in sorted(_STAGES) if field in vision}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{field} has {count}" for field, count in lengths.items())
        raise CheckpointError(
            f"{path}: the vision encoder's per-stage settings disagree on the number of stages "
            f"({shown}): each needs one value per stage. Fix or download config.json again."
        )


# The vision encoder's settings that hold one value per stage.
_STAGES = {
    "embed_dim",
    "dim_embed",
    "num_heads",
    "num_groups",
    "depths",
    "patch_size",
    "patch_stride",
}


def _is_size(value: Any) -> bool:
    """A whole number of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (``list``, ``number``...)."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _check_native_config(path: Path, config: dict[str, Any]) -> None:
    """Refuse a native ``config.json`` that transformers' Florence-2 configuration rejects
    (a value of the wrong type), before the slow part of loading starts."""
    from transformers import Florence2Config

    try:
        Florence2Config.from_dict(config)
    except Exception as error:  # noqa: BLE001 - transformers' validation errors vary; named below
        raise CheckpointError(
            f"{path} does not describe a Florence-2 model: {_config_problem(error, config)}. "
            "Fix or download config.json again."
        ) from None


def _config_problem(error: Exception, config: Mapping[str, Any]) -> str:
    """transformers' complaint about a configuration, as one line naming the field."""
    text = str(error)
    field = re.search(r"field '([^']+)'", text)
    several = re.search(r"with value (.*?) doesn't match any type in \((.*)\)\. Errors", text, re.S)
    one = re.search(r"expected (.+?), got \w+ \(value: (.*)\)\s*$", text, re.S)
    if field is None or (several is None and one is None):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return " ".join(lines[:2]) or type(error).__name__
    where = _key_path(config, field.group(1)) or field.group(1)
    value, kinds = (several.group(1), several.group(2)) if several else (one.group(2), one.group(1))
    kinds = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", kinds).replace("NoneType", "null")
    return f"{where} is {value}, but must be {' or '.join(_split_top_level(kinds))}"


def _split_top_level(text: str) -> list[str]:
    """``"int, tuple[int, ...]"`` -> ``["int", "tuple[int, ...]"]``: commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()] if current.strip() else parts


def _key_path(config: Any, key: str, prefix: str = "") -> str | None:
    """Where ``key`` first occurs in nested JSON objects, as ``text_config.d_model``."""
    if not isinstance(config, dict):
        return None
    if key in config:
        return prefix + key
    for name, value in config.items():
        found = _key_path(value, key, f"{prefix}{name}.")
        if found is not None:
            return found
    return None
