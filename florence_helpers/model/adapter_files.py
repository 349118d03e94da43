"""An adapter folder's files checked before peft reads them: ``adapter_config.json`` (types,
ranks, settings that would change the model while loading) and the weight file's tensor
shapes, read from its header.

Part of the model layer: imports only :mod:`florence_helpers.boundary` and this subpackage.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..boundary.inputs import MAX_CONFIG_FILE_BYTES, InputError, read_file, shown


class AdapterError(ValueError):
    """Raised for a folder that does not hold a LoRA adapter this model can take."""


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as a dict.

    Raises:
        FileNotFoundError: There is none.
        AdapterError: It is not JSON, or not a JSON object.
    """

    config_path = folder / "adapter_config.json"
    try:
        data = read_file(config_path, max_bytes=MAX_CONFIG_FILE_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"No LoRA adapter in {folder}: adapter_config.json is missing."
        ) from None
    except InputError as error:  # a FIFO, a device, a directory, or far too large
        raise AdapterError(str(error)) from None
    try:
        config = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{config_path} is not valid JSON ({error}).") from None
    except RecursionError:
        raise AdapterError(
            f"{config_path} is nested too deeply to be an adapter configuration."
        ) from None
    if not isinstance(config, dict):
        raise AdapterError(
            f"{config_path} holds a JSON {type(config).__name__}, not an adapter configuration."
        )
    _check_config_types(config, config_path)
    _check_other_fields(config, config_path)
    return config


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_PATTERNS = 10_000
"""The most module names or patterns one field of adapter_config.json may hold: a model has a
few thousand modules."""


def _is_texts(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= MAX_PATTERNS
        and all(isinstance(item, str) for item in value)
    )


MAX_PATTERN_KEYS = 128
"""The most keys a ``rank_pattern`` or ``alpha_pattern`` may hold, each at most
:data:`MAX_PATTERN_CHARS` long: peft compiles every key again for every module once there are
more than Python's cache of 512 regular expressions (550 slow keys took minutes)."""
MAX_PATTERN_CHARS = 1000


def _is_table(value: Any, fits: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= MAX_PATTERN_KEYS
        and all(len(key) <= MAX_PATTERN_CHARS for key in value)
        and all(map(fits, value.values()))
    )


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
        lambda v: (
            _is_whole(v)
            or (isinstance(v, list) and len(v) <= MAX_PATTERNS and all(_is_whole(i) for i in v))
        ),
        "a whole number or a list of them",
    ),
    "rank_pattern": (
        lambda v: _is_table(v, lambda i: _is_whole(i) and i >= 1),
        "an object of module patterns and ranks (whole numbers of at least 1)",
    ),
    "alpha_pattern": (
        lambda v: _is_table(v, _is_number),
        "an object of module patterns and alphas (numbers)",
    ),
    "base_model_name_or_path": (_is_text, "a string"),
    "task_type": (_is_text, "a string"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "ensure_weight_tying": (lambda v: isinstance(v, bool), "true or false"),
}
# Lists and tables are capped at MAX_PATTERNS entries (the messages say so).
_CAPPED = ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern",
           "layers_to_transform", "rank_pattern", "alpha_pattern")  # fmt: skip

# Read by this package or peft without acting on the model: metadata, and the initialisation
# (loading always starts from plain LoRA, see load_adapter) and runtime settings it replaces.
_IGNORED_FIELDS = ("auto_mapping", "peft_version", "revision", "init_lora_weights",
                   "runtime_config", "megatron_core")  # fmt: skip


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
            capped = f", with at most {MAX_PATTERNS:,} entries" if field in _CAPPED else ""
            if field in ("rank_pattern", "alpha_pattern"):
                capped = (
                    f", with at most {MAX_PATTERN_KEYS} keys of at most {MAX_PATTERN_CHARS:,} "
                    "characters"
                )
            raise AdapterError(
                f"{config_path}: {field} is {shown(value)}, but must be {expected}{capped} (or "
                "null). The file is damaged or was edited by hand: save or download the "
                "adapter again."
            )


def _check_other_fields(config: dict[str, Any], config_path: Path) -> None:
    """Refuse any other setting peft acts on, unless it holds peft's default (or null):
    trainable token rows (``trainable_token_indices`` allocates a row per entry), variants
    built from any configuration given, even ``{}`` (KaSA, VeLoRA, MonteCLoRA), weight
    initialisations that compute (EVA, CorDA, LoRA-GA...), layer copies, and what newer peft
    versions add. A plain LoRA adapter saved by peft holds the defaults."""
    import dataclasses

    from peft import LoraConfig

    for field in dataclasses.fields(LoraConfig):
        name = field.name
        if name in _CONFIG_FIELDS or name in _IGNORED_FIELDS or name not in config:
            continue
        value = config[name]
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        # Only peft's default, or null: an empty {} is not "unset" to peft (it builds a KaSA or
        # VeLoRA variant from it, and KaSA rewrites the base weights while loading).
        if value is None or (value == default and type(value) is type(default)):
            continue
        if name in _STRUCTURE_FIELDS:
            raise AdapterError(
                f"{config_path} sets {name}, which changes the model's structure or weights "
                "while loading; this package loads plain LoRA adapters only."
            )
        raise AdapterError(
            f"{config_path} sets {name} ({shown(value)}), which this package does not load: "
            "it loads plain LoRA adapters (target_modules, r, lora_alpha, rank_pattern, "
            "alpha_pattern, modules_to_save, use_dora, use_rslora). Merge the adapter with "
            "the tool that made it and load the merged model instead."
        )


PATTERN_SECONDS = 10.0
"""How long the module patterns of an adapter_config.json may take to match a model's module
names: microseconds for any pattern a person writes."""

# peft's rules, as regular expressions built around each pattern (peft/tuners/tuners_utils.py
# check_target_module_exists, peft/utils/other.py get_pattern_key); "listed" is its rule for a
# list of names: the name itself or a dotted suffix.
_MATCHER = r"""
import json, re, sys
job = json.load(sys.stdin)
forms = {
    "full": lambda p: re.compile(p).fullmatch,
    "suffix": lambda p: re.compile(rf"(.*\.)?({p})$").match,
    "saved": lambda p: re.compile(rf"(^|.*\.){p}($|\..*)").match,
    "layers": lambda p: re.compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.").match,
    "listed": lambda p: lambda name: name == p or name.endswith("." + p),
}
first = {}
for field, (form, patterns) in job["fields"].items():
    tests = []
    for pattern in patterns:
        try:
            tests.append(forms[form](pattern))
        except re.error as error:
            print(json.dumps({"error": [field, pattern, str(error)]}))
            sys.exit()
    first[field] = [
        next((i for i, test in enumerate(tests) if test(name)), None) for name in job["names"]
    ]
print(json.dumps({"first": first}))
"""


def match_module_patterns(
    config: dict[str, Any], names: Iterable[str], config_path: Path
) -> dict[str, list[int | None]]:
    """Match the configuration's module patterns against ``names`` as peft will, in a separate
    process given :data:`PATTERN_SECONDS`: a regular expression such as ``((\\w|\\.)+)+!``
    backtracks for ever on a long module name, and Python cannot stop a match once begun.

    Args:
        config: The adapter configuration.
        names: Every name peft matches the patterns against: module names, and the embedding
            and tied-weight names peft also tries.
        config_path: Its file, for messages.

    Returns:
        Per pattern field present (``target_modules``, ``exclude_modules``,
        ``modules_to_save``, ``layers_pattern``, ``rank_pattern``, ``alpha_pattern``), per
        name, the index of the first pattern (or ``rank_pattern`` key) matching it, or None.

    Raises:
        AdapterError: A pattern is not a regular expression, or the matching took too long.
    """
    fields: dict[str, tuple[str, list[str]]] = {}
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if value:
            fields[field] = ("full", [value]) if isinstance(value, str) else ("listed", value)
    if isinstance(config.get("target_modules"), list):  # peft ties embeddings with these too
        fields["target_modules as tied"] = ("saved", config["target_modules"])
    if config.get("modules_to_save"):
        fields["modules_to_save"] = ("saved", config["modules_to_save"])
    layers = config.get("layers_pattern")
    if layers:
        fields["layers_pattern"] = ("layers", [layers] if isinstance(layers, str) else layers)
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            fields[field] = ("suffix", list(config[field]))
    names = list(names)
    if not fields:
        return {}
    job = json.dumps({"names": names, "fields": fields})
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _MATCHER],
            input=job,
            capture_output=True,
            text=True,
            timeout=PATTERN_SECONDS,
        )
        answer = json.loads(done.stdout)
    except subprocess.TimeoutExpired:
        raise AdapterError(
            f"{config_path}: its module patterns ({', '.join(fields)}) take more than "
            f"{PATTERN_SECONDS:g} s to match the model's {len(names):,} module names (a regular "
            "expression that backtracks without end): list the module names instead."
        ) from None
    except (OSError, ValueError) as error:
        raise AdapterError(
            f"Could not check the module patterns of {config_path}: {error}"
        ) from None
    if "error" in answer:
        field, pattern, reason = answer["error"]
        raise AdapterError(
            f"{config_path}: {field} holds {shown(pattern)}, which is not a regular expression "
            f"({reason})."
        )
    return answer["first"]


# Fields that make peft copy layers or compute weights while building the adapter: refused.
# (init_lora_weights is not: loading always starts from plain LoRA, see load_adapter.)
_STRUCTURE_FIELDS = ("layer_replication", "megatron_config", "loftq_config")


def _check_adapter_folder(folder: Path) -> tuple[Path, dict[str, Any]]:
    """Check the adapter's files before peft reads them; the weight file's path and the
    checked configuration."""
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
            return folder / name, config
    raise AdapterError(
        f"{folder} has an adapter_config.json but no weights (adapter_model.safetensors)."
    )


_LORA_A = re.compile(r"lora_(?:embedding_)?A(?:\.|$)")
_LORA_B = re.compile(r"lora_(?:embedding_)?B(?:\.|$)")


def _check_ranks(folder: Path, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, before peft allocates anything, a configuration asking for a larger rank than
    the weight file holds: the LoRA matrices are made at the configured rank, so a 40 kB
    folder saying ``r: 1000000`` would ask for gigabytes before failing on a size mismatch.

    The rank of a saved tensor is the first dimension of a ``lora_A`` (or
    ``lora_embedding_A``) matrix and the second of a ``lora_B`` (``lora_embedding_B``); an
    empty tensor (a dimension of 0, no data) counts as damage, not as a rank.
    """
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
