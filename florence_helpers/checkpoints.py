"""Recognise Florence-2 checkpoints, and convert remote-code ones to the native classes.

Microsoft's original ``microsoft/Florence-2-*`` repositories, and most fine-tunes made from
them, are stored in the *remote-code* layout: ``config.json`` names ``auto_map`` modules and a
``florence2_language`` text model, the weights are named after the original modules
(``vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv``), and the Florence-2 tokens are
added to the BART tokenizer at run time by the remote processor. transformers' native
``Florence2ForConditionalGeneration`` reads none of that. :func:`convert_checkpoint` writes a
native copy: the configuration translated, every weight renamed (the image projection
transposed), the tokenizer given Florence-2's tokens in their original order plus
``<image>``, and the native processor saved beside it. :func:`convert_adapter` renames the
keys of a LoRA adapter trained on the remote-code model the same way.

The name mapping follows transformers' own Florence-2 conversion script. Both converters write
to a temporary folder beside the output and move it into place only when everything is
written, so a failure never leaves a half-converted output behind (and an existing output
replaced with ``overwrite`` stays as it was until the new one is complete).

What :func:`convert` raises, and nothing else: :class:`CheckpointError` for an input it cannot
convert (the message names the file and what is wrong with it);
:class:`~florence_helpers.outputs.OutputError` for an output it refuses before reading anything
(an existing file, or a folder that is or holds the input); :class:`OSError` when writing
fails (a full disk, a read-only folder), with one sentence naming the output and the reason.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .outputs import OutputError, check_folder_output

REMOTE_TEXT_MODEL = "florence2_language"
FLORENCE_SPECIAL_TOKENS = (
    ["<od>", "</od>", "<ocr>", "</ocr>"]
    + [f"<loc_{i}>" for i in range(1000)]
    + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>"]
    + ["<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>"]
    + ["</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>"]
)
"""The tokens Florence-2 adds to BART's vocabulary, in the original order (the misspelling
``desciption`` is the original's)."""
IMAGE_TOKEN = "<image>"
"""The token the native processor writes where the image features go."""
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

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
# Phrases the grounding parser never reports as a box of their own: Microsoft's processor's
# list (``Florence2PostProcesser._create_black_list_of_phrase_grounding``), which transformers'
# conversion script copies into the native checkpoints: pronouns, determiners, quantifiers and
# words for the picture itself. tests/test_microsoft_reference.py checks it against the list
# recorded from Microsoft's code.
BANNED_GROUNDING_PHRASES: tuple[str, ...] = (
    *"I me mine myself you your yours yourself yourselves".split(),
    *"he him his himself she her hers herself it its itself".split(),
    *"we us our ours ourselves they them their theirs themselves one oneself".split(),
    *"this that these those who whom whose which what".split(),
    *"a an the all another any anybody anyone anything each everybody everyone".split(),
    *"everything few many nobody none several some somebody someone something lots".split(),
    "each other",
    "one another",
    "a group",
    "a set",
    "other objects",
    "image",
    "images",
    "the image",
)
MICROSOFT_GENERATION_SETTINGS: dict[str, Any] = {
    "num_beams": 3,
    "no_repeat_ngram_size": 3,
    "forced_bos_token_id": 0,
    "forced_eos_token_id": 2,
    "early_stopping": True,
}
"""How Microsoft's Florence-2 checkpoints decode (their text configuration, which their
``generate()`` applies): 3 beams, no 3-gram twice in an answer, the answer opened with ``<s>``
and closed with ``</s>`` at the length limit. :func:`convert_checkpoint` carries over whatever
a checkpoint's own configuration says; the tiny test model uses these."""
POST_PROCESSOR_CONFIG: dict[str, Any] = {
    "ocr": {"area_threshold": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": list(BANNED_GROUNDING_PHRASES)},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}
"""The native processor's parsing rules, one entry per kind of answer it can parse."""


class CheckpointError(ValueError):
    """Raised for a folder that is not a Florence-2 checkpoint this package can use as it is."""


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
    folder = Path(path).expanduser()
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
    target = new if new is not None else f"{Path(old).expanduser().name or 'florence2'}-native"
    return f"python -m florence_helpers convert {old} {target}"


def convert_checkpoint(
    old: str | os.PathLike, new: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a native copy of a remote-code Florence-2 checkpoint that ``load_model`` reads.

    Args:
        old: The remote-code checkpoint folder (e.g. a download of ``microsoft/Florence-2-base``
            or of a community fine-tune).
        new: The folder to write. It must not exist, or be empty, unless ``overwrite``; it
            can never be a file, ``old`` itself or a folder holding ``old``.
        overwrite: Replace an existing ``new``. It is replaced only once the new copy is
            complete: if anything fails, it stays as it was.

    Returns:
        ``new`` as a :class:`~pathlib.Path`.

    The generation settings Microsoft's ``generate()`` applied (its text configuration's
    ``num_beams=3``, ``no_repeat_ngram_size=3``, ``forced_bos_token_id=0``,
    ``early_stopping=True``, ...) are written into ``generation_config.json``, so the native
    model decodes as the original did.

    Raises:
        CheckpointError: ``old`` is not a remote-code Florence-2 checkpoint (the message says
            what it is), one of its files is damaged or holds wrong values (the message names
            the file), its weights do not fit the configuration (every weight that would be
            dropped or left unset is named), or ``new`` exists and is not empty.
        OutputError: ``new`` is a file, or is (or holds) ``old``; checked before anything is
            read.
        OSError: Writing failed (a full disk, a read-only folder); nothing is left behind.

    Example:
        >>> convert_checkpoint("Florence-2-base-PromptGen", "promptgen-native")  # doctest: +SKIP
        >>> florence = load_model("promptgen-native")  # doctest: +SKIP
    """
    source = Path(old).expanduser()
    target = Path(new).expanduser()
    _check_output(target, source, overwrite)
    with _reading(source):
        layout = checkpoint_layout(source)
        if layout == "native":
            raise CheckpointError(
                f"{source} is already a native checkpoint: load_model reads it as it is."
            )
        config = _read_config(source)
        processor = _native_processor(source)
        model = _native_model(source, config, processor)
    with _written_atomically(target, overwrite) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return target


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
    with :func:`~florence_helpers.adapters.load_adapter` on the converted checkpoint.

    Raises:
        CheckpointError: ``old`` holds no adapter (``adapter_config.json`` and weights), one
            of its files is damaged or holds wrong values (the message names the file), its
            weights are incomplete (a ``lora_A`` without its ``lora_B``), the adapter cannot
            be converted whole (the message says why), or ``new`` exists and is not empty.
        OutputError: ``new`` is a file, or is (or holds) ``old``; checked before anything is
            read.
        OSError: Writing failed (a full disk, a read-only folder); nothing is left behind.
    """
    source = Path(old).expanduser()
    target = Path(new).expanduser()
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
        for extra in source.iterdir():
            if extra.name not in _ADAPTER_FILES and extra.is_file():
                shutil.copy2(extra, folder / extra.name)
    return target


_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


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
    patterns = {}
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        keyed = {}
        for native, remote in modules.items():
            key = _pattern_key(pattern, remote)
            if key is not None:
                keyed[native] = pattern[key]
        patterns[field] = keyed
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


def _pattern_key(pattern: Mapping[str, Any], module: str) -> str | None:
    """The key of a peft rank or alpha pattern that applies to ``module`` (peft's own rule:
    the key matches the end of the module path)."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _read_adapter_config(source: Path) -> dict[str, Any]:
    from .adapters import AdapterError, read_adapter_config

    try:
        return read_adapter_config(source)
    except FileNotFoundError:
        raise CheckpointError(
            f"{source} holds no adapter: there is no adapter_config.json."
        ) from None
    except AdapterError as error:
        raise CheckpointError(str(error)) from None


def _read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` as a dict, its sections and sizes checked (see :func:`_check_config`)."""
    if not folder.is_dir():
        raise CheckpointError(f"No checkpoint folder at {folder}.")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no model checkpoint: there is no config.json.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}.") from None
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


def _weight_files(folder: Path) -> list[Path]:
    for name in INDEX_FILES:
        index = folder / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise CheckpointError(
                    f"{index} is not a weight index (JSON with a weight_map of weight names to "
                    "files): the download is incomplete or damaged."
                ) from None
            return [folder / shard for shard in shards]
    return [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]


def _load_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_weight_file(file))
    return state


def _check_weight_file(file: Path) -> None:
    """Refuse a missing weight file, or a safetensors file whose header does not cover it
    (cut short, or not a safetensors file): cheap, only the header is read."""
    if not file.is_file():
        raise CheckpointError(
            f"Missing weight file {file}: the checkpoint is incomplete. Download it again."
        )
    if file.suffix != ".safetensors":
        return
    from safetensors import safe_open

    try:
        with safe_open(file, "pt"):
            pass
    except OSError as error:
        raise CheckpointError(f"Could not read {file}: {error.strerror or error}.") from None
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise CheckpointError(_damaged_safetensors(file, error)) from None


def _damaged_safetensors(file: Path, error: Exception) -> str:
    return (
        f"{file}: this safetensors file is damaged or cut short ({_first_line(error)}). "
        "Download it again."
    )


def _first_line(error: BaseException) -> str:
    """The first line of an error's message, without a final full stop (for quoting)."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.bin`` that holds only tensors.

    A ``.bin`` is read with ``torch.load(weights_only=True)``: a pickle that holds anything
    else (code could run while it is read) is refused, never unpickled.

    Raises:
        CheckpointError: The file is missing, damaged or cut short, a pickle holding more
            than tensors, or not a mapping of names to tensors; the message names the file.
    """
    if not file.is_file():
        raise CheckpointError(
            f"Missing weight file {file}: the checkpoint is incomplete. Download it again."
        )
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except OSError as error:
        raise CheckpointError(f"Could not read {file}: {error.strerror or error}.") from None
    except pickle.UnpicklingError as error:
        if not pickle_runs_code(error):
            raise CheckpointError(_damaged_pickle(file, error)) from None
        raise CheckpointError(
            f"{file} is a pickle file holding more than tensors, which is refused: reading it "
            "could run code. Only if you trust where it came from, load it with "
            "torch.load(path, weights_only=False) and save the tensors with "
            "safetensors.torch.save_file(state_dict, 'model.safetensors') in its place."
        ) from None
    except Exception as error:  # noqa: BLE001 - safetensors' and torch's errors, named below
        if file.suffix == ".safetensors":
            raise CheckpointError(_damaged_safetensors(file, error)) from None
        raise CheckpointError(_damaged_pickle(file, error)) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{file} holds a {type(state).__name__}, not a mapping of weight names to tensors: "
            "it is not a weight file."
        )
    return state


def pickle_runs_code(error: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a pickle for what it would call or
    build (anything but tensors), rather than for being damaged."""
    # torch names what it refused: "Unsupported global: GLOBAL builtins.print", "Trying to
    # load unsupported GLOBAL posix.system"; a damaged file gets "Unsupported operand 110".
    return isinstance(error, pickle.UnpicklingError) and bool(
        re.search(r"\bglobal\b", str(error), re.IGNORECASE)
    )


def _damaged_pickle(file: Path, error: Exception) -> str:
    found = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
    reason = found.group(1).strip().rstrip(".") if found else _first_line(error)
    return (
        f"{file} is not a readable PyTorch weight file ({reason}): it is damaged, cut short or "
        "not a weight file. Download it again."
    )


# Fields of Microsoft's text configuration that the native one derives from others (BART's
# aliases: Microsoft's code sets num_hidden_layers from encoder_layers and ignores the file's).
_DERIVED_TEXT_FIELDS = {"num_hidden_layers", "hidden_size", "num_attention_heads"}
_NOT_TEXT_FIELDS = {
    "model_type",
    "architectures",
    "auto_map",
    "_name_or_path",
    "transformers_version",
}


def _native_config(
    config: Mapping[str, Any],
    image_token_id: int,
    vocab: int,
    path: Path = Path("config.json"),
) -> Any:
    """The native ``Florence2Config`` for a remote-code ``config.json`` (read from ``path``).

    Raises:
        CheckpointError: A value transformers' configuration classes reject, named with its
            place in ``path`` (``text_config.activation_function``).
    """
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    skip = _NOT_TEXT_FIELDS | _DERIVED_TEXT_FIELDS | set(_generation_settings(config))
    text = {k: v for k, v in (config.get("text_config") or {}).items() if k not in skip}
    text["vocab_size"] = vocab
    vision = dict(config.get("vision_config") or {})
    known = set(Florence2VisionConfig.__dataclass_fields__) - {"model_type"}
    native_vision = {k: v for k, v in vision.items() if k in known}
    if "dim_embed" in vision:
        native_vision["embed_dim"] = vision["dim_embed"]
    temporal = vision.get("visual_temporal_embedding") or {}
    if "max_temporal_embeddings" in temporal:
        native_vision["max_temporal_embeddings"] = temporal["max_temporal_embeddings"]
    position = vision.get("image_pos_embed") or {}
    if "max_pos_embeddings" in position:
        native_vision["max_position_embeddings"] = position["max_pos_embeddings"]
    if "projection_dim" in config:
        native_vision.setdefault("projection_dim", config["projection_dim"])
    try:
        return Florence2Config(
            text_config=BartConfig(**text),
            vision_config=Florence2VisionConfig(**native_vision),
            image_token_id=image_token_id,
        )
    except Exception as error:  # noqa: BLE001 - transformers' validation errors vary; named below
        raise CheckpointError(
            f"{path} does not describe a Florence-2 model: {_config_problem(error, config)}. "
            "Fix or download config.json again."
        ) from None


# transformers 4.x wrote every generation field into a saved text config, defaults included;
# these values meant "not set" there (its GenerationConfig defaults).
_LEGACY_GENERATION_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "output_scores": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict_in_generate": False,
    "remove_invalid_values": False,
    "use_cache": True,
}


def _generation_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The generation settings Microsoft's ``generate()`` used: those of its text config.

    Its ``generate`` hands over to the language model, whose generation config transformers
    4.x built from the text config (the checkpoint's own ``generation_config.json`` belongs to
    the outer model and is not used): every generation field set to something other than
    4.x's default. For Microsoft's checkpoints that is ``num_beams=3``,
    ``no_repeat_ngram_size=3``, ``forced_bos_token_id=0``, ``forced_eos_token_id=2`` and
    ``early_stopping=True``, beside the special token ids.
    """
    from transformers import GenerationConfig

    fields = set(GenerationConfig().to_dict()) - {"transformers_version"}
    text = config.get("text_config") or {}
    return {
        k: v
        for k, v in text.items()
        if k in fields and v is not None and _LEGACY_GENERATION_DEFAULTS.get(k, object()) != v
    }


def _generation_config(config: Mapping[str, Any], path: Path = Path("config.json")) -> Any:
    """The native generation configuration (see :func:`_generation_settings`).

    Raises:
        CheckpointError: A generation setting of the wrong type (``num_beams: "3"``), which
            transformers would otherwise write into the converted checkpoint as it is.
    """
    from transformers import GenerationConfig

    settings = _generation_settings(config)
    defaults = GenerationConfig().to_dict()
    for key, value in settings.items():
        default = _LEGACY_GENERATION_DEFAULTS.get(key, defaults.get(key))
        expected = {bool: "true or false", int: "a whole number", float: "a number"}.get(
            type(default), "value of another kind"
        )
        if key.endswith("_token_id"):
            values = value if isinstance(value, list) else [value]
            fits, expected = all(_is_count(v) for v in values), "a token id (a whole number)"
        elif isinstance(default, bool):
            fits = isinstance(value, bool) or (key == "early_stopping" and value == "never")
        elif isinstance(default, int):
            fits = _is_count(value)
        elif isinstance(default, float):
            fits = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            fits = True
        if not fits:
            raise CheckpointError(
                f"{path}: text_config.{key} is {value!r}, which is not a valid generation "
                f"setting (expected {expected}). Fix or download config.json again."
            )
    try:
        return GenerationConfig(**settings)
    except ValueError as error:
        raise CheckpointError(
            f"{path}: {_first_line(error)}. Fix or download config.json again."
        ) from None


def _is_count(value: Any) -> bool:
    """A whole number of at least 0 (a count, or a token id)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _native_processor(source: Path) -> Any:
    from tokenizers import AddedToken
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Florence2Processor,
        RobertaTokenizer,
    )

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - tokenizers and transformers raise many kinds
        raise CheckpointError(
            f"Could not read the tokenizer or image processor in {source} (tokenizer.json, "
            f"tokenizer_config.json, preprocessor_config.json): {_first_line(error)}. The "
            "download is incomplete or damaged: download it again."
        ) from None
    # The remote processor added these at run time, in this order, after BART's vocabulary;
    # fine-tunes that saved their tokenizer already hold them, with the same ids.
    backend = tokenizer.backend_tokenizer
    vocabulary = backend.get_vocab(with_added_tokens=True)
    added = [t for t in (*FLORENCE_SPECIAL_TOKENS, IMAGE_TOKEN) if t not in vocabulary]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tokenizer = RobertaTokenizer(
        tokenizer_object=backend,
        image_token=IMAGE_TOKEN,
        extra_special_tokens=FLORENCE_SPECIAL_TOKENS,
    )
    side = min(image_processor.size.get("height", 768), image_processor.size.get("width", 768))
    image_processor.image_seq_length = getattr(
        image_processor, "image_seq_length", 1 + (side // 32) ** 2
    )
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config=POST_PROCESSOR_CONFIG,
    )


_FINAL_LOGITS_BIAS = "language_model.final_logits_bias"
_TIED = {
    "model.language_model.encoder.embed_tokens.weight",
    "model.language_model.decoder.embed_tokens.weight",
    "lm_head.weight",
}


def _native_model(source: Path, config: Mapping[str, Any], processor: Any) -> Any:
    from transformers import Florence2ForConditionalGeneration

    tokenizer = processor.tokenizer
    state = _load_weights(_weight_files(source))
    bias = state.pop(_FINAL_LOGITS_BIAS, None)
    if bias is not None and bool(torch.any(bias != 0)):
        raise CheckpointError(
            f"{source}: {_FINAL_LOGITS_BIAS} is not zero ({int((bias != 0).sum())} of "
            f"{bias.numel()} values), so this fine-tune trained an output bias. The native "
            "model has no such bias, and dropping it would change every answer: this "
            "checkpoint cannot be converted."
        )
    renamed = {native_name(k): v for k, v in state.items()}
    projection = "model.multi_modal_projector.image_projection.weight"
    if projection in renamed:
        renamed[projection] = renamed[projection].t().contiguous()
    embeddings = renamed.get("model.language_model.shared.weight")
    if embeddings is None:
        raise CheckpointError(f"{source}: no text embeddings (language_model.model.shared).")
    path = source / "config.json"
    native = _native_config(config, tokenizer.image_token_id, vocab=embeddings.shape[0], path=path)
    generation = _generation_config(config, path)
    dtype = embeddings.dtype
    try:
        model = Florence2ForConditionalGeneration(native).to(dtype)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure here comes from the configuration
        raise CheckpointError(
            f"{path} does not describe a Florence-2 model that can be built: "
            f"{_first_line(error)}. Fix or download config.json again."
        ) from None
    for name in _TIED & renamed.keys():  # stored copies of the shared embeddings
        if not torch.equal(renamed.pop(name), embeddings):
            raise CheckpointError(
                f"{source}: {name} differs from the shared text embeddings it is tied to in "
                "Florence-2; the native model cannot hold both."
            )
    try:
        missing, unexpected = model.load_state_dict(renamed, strict=False)
    except RuntimeError as error:  # weights of the wrong shape
        mismatched = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise CheckpointError(
            f"The weights in {source} do not fit a Florence-2 of its config.json: "
            + (" ".join(mismatched[:4]) or _first_line(error))
            + (f" (and {len(mismatched) - 4} more)" if len(mismatched) > 4 else "")
            + ". The checkpoint is damaged, or its config.json belongs to another model."
        ) from None
    missing = [k for k in missing if k not in _TIED]
    if missing or unexpected:
        raise CheckpointError(
            f"The weights in {source} do not fit a Florence-2 of its config.json, and "
            "converting would leave weights random or drop trained ones. "
            + (f"Missing ({len(missing)}): {', '.join(missing)}. " if missing else "")
            + (f"Not used ({len(unexpected)}): {', '.join(unexpected)}." if unexpected else "")
        )
    model.tie_weights()
    rows = embeddings.shape[0]
    padded = model.resize_token_embeddings(
        len(tokenizer), pad_to_multiple_of=64, mean_resizing=False
    )
    with torch.no_grad():  # the rows added for <image> and padding: the mean row, every time
        padded.weight[rows:] = embeddings.float().mean(dim=0).to(dtype)
    # Microsoft's model has no such tokens, so it can never write them: neither may this one.
    generation.suppress_tokens = list(range(rows, padded.weight.shape[0]))
    model.generation_config = generation
    return model.eval()


def _check_output(target: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output folder before anything is read or written.

    Raises:
        OutputError: ``target`` is (or holds) ``source``, is not a folder, or cannot be one
            (a file stands where one of its parent folders would be).
        CheckpointError: ``target`` is a folder that is not empty, and not ``overwrite``.
        OSError: ``target`` exists but cannot be listed.
    """
    check_folder_output(target, [source])
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutputError(
                f"NEW {target} exists and is not a folder: give the name of a folder to create "
                "(or of an empty one)."
            )
        try:
            occupied = any(target.iterdir())
        except OSError as error:
            raise _write_error(error, target, existed=True) from None
        if occupied and not overwrite:
            raise CheckpointError(
                f"{target} already exists and is not empty: choose a new folder, or replace "
                "it with --overwrite (overwrite=True)."
            )
        return
    parent = target.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(
            f"NEW {target} cannot be created: {parent} is a file, not a folder. Choose "
            "another place."
        )


@contextmanager
def _reading(source: Path) -> Iterator[None]:
    """Turn any failure while reading and converting ``source`` into a CheckpointError.

    Expected problems are named where they are found; this is the net under them, so that an
    unforeseen kind of damage still says which checkpoint it was, not a traceback.
    """
    try:
        yield
    except (CheckpointError, OutputError, MemoryError):
        raise
    except OSError as error:
        where = error.filename or source
        raise CheckpointError(f"Could not read {where}: {error.strerror or error}.") from None
    except Exception as error:
        raise CheckpointError(
            f"Could not convert {source}: {type(error).__name__}: {_first_line(error)}. One of "
            "its files is damaged or is not what a Florence-2 checkpoint holds."
        ) from error


@contextmanager
def _written_atomically(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``target`` that becomes ``target`` only if the block succeeds.

    On any failure the temporary folder is removed and ``target`` is as it was (an existing
    one is renamed aside, not deleted, until the new one is in place). A failure to write
    becomes an :class:`OSError` whose message is one sentence naming ``target``.
    """
    existed = target.is_dir()
    created = [p for p in target.parents if not p.exists()]  # parent folders made here
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp, whose 0o700 the finished folder would keep: the umask applies.
        folder = target.parent / f".{target.name}.{secrets.token_hex(6)}"
        folder.mkdir()
    except OSError as error:
        _remove_empty(created)
        raise _write_error(error, target, existed) from None
    try:
        yield folder
        _replace_folder(folder, target)
    except BaseException as error:
        shutil.rmtree(folder, ignore_errors=True)
        _remove_empty(created)
        written = _as_os_error(error)
        if written is None:
            raise
        raise _write_error(written, target, existed) from None


def _remove_empty(folders: list[Path]) -> None:
    """Remove the parent folders a failed conversion created (innermost first), if empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _replace_folder(folder: Path, target: Path) -> None:
    """Move ``folder`` to ``target``; an existing ``target`` is deleted only once it is."""
    if not (target.exists() or target.is_symlink()):
        os.replace(folder, target)
        return
    aside = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    os.replace(target, aside)
    try:
        os.replace(folder, target)
    except BaseException:
        os.replace(aside, target)
        raise
    if aside.is_symlink():
        aside.unlink()
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _as_os_error(error: BaseException) -> OSError | None:
    """The operating-system error behind a failed write, if it was one.

    safetensors reports its write errors as ``SafetensorError("... I/O error: No space left
    on device (os error 28)")``, not as OSError: its errno is recovered from the text.
    """
    if isinstance(error, OSError):
        return error
    if type(error).__name__ == "SafetensorError":
        code = re.search(r"os error (\d+)", str(error))
        if code is not None:
            number = int(code.group(1))
            return OSError(number, os.strerror(number))
    return None


def _write_error(error: OSError, target: Path, existed: bool) -> OSError:
    """One sentence for a failed write: the output, the reason, and that nothing changed."""
    reason = error.strerror or str(error) or os.strerror(error.errno or errno.EIO)
    kept = f"{target} is as it was" if existed else "nothing was left behind"
    return OSError(
        error.errno, f"Could not write {target}: {reason} (the conversion was not saved; {kept})."
    )


def convert(old: str | os.PathLike, new: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert a remote-code checkpoint, or a LoRA adapter trained on one (told by its files).

    ``new`` is checked first, before anything is read (see :func:`convert_checkpoint`).

    Raises:
        CheckpointError: ``old`` cannot be converted (the message names the file and what is
            wrong), or ``new`` exists and is not empty (without ``overwrite``).
        OutputError: ``new`` is a file, or is (or holds) ``old``.
        OSError: Writing failed; the message names ``new`` and the reason, and nothing is
            left behind (an existing ``new`` is as it was).
    """
    source, target = Path(old).expanduser(), Path(new).expanduser()
    _check_output(target, source, overwrite)
    if (source / "adapter_config.json").is_file():
        return convert_adapter(source, target, overwrite=overwrite)
    return convert_checkpoint(source, target, overwrite=overwrite)
