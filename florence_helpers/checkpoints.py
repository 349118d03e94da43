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
written, so a failure never leaves a half-converted output behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

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

    Raises:
        CheckpointError: No folder, no ``config.json``, another model type, or no weights.
    """
    folder = Path(path).expanduser()
    config = _read_config(folder)
    model_type = config.get("model_type")
    if model_type != "florence2":
        raise CheckpointError(
            f"{folder} holds a {model_type or 'model of unknown type'!s} checkpoint, not "
            "Florence-2 (config.json: model_type is "
            f"{model_type!r}, expected 'florence2')."
        )
    if not _weight_files(folder):
        raise CheckpointError(
            f"{folder} has a Florence-2 config.json but no weights: expected "
            f"{' or '.join(WEIGHT_FILES)} (or a sharded index) beside it."
        )
    text = config.get("text_config") or {}
    remote = (
        "auto_map" in config
        or text.get("model_type") == REMOTE_TEXT_MODEL
        or "dim_embed" in (config.get("vision_config") or {})
    )
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
        new: The folder to write. It must not exist, or be empty, unless ``overwrite``.
        overwrite: Replace an existing ``new``.

    Returns:
        ``new`` as a :class:`~pathlib.Path`.

    The generation settings Microsoft's ``generate()`` applied (its text configuration's
    ``num_beams=3``, ``no_repeat_ngram_size=3``, ``forced_bos_token_id=0``,
    ``early_stopping=True``, ...) are written into ``generation_config.json``, so the native
    model decodes as the original did.

    Raises:
        CheckpointError: ``old`` is not a remote-code Florence-2 checkpoint (the message says
            what it is), its weights do not fit the configuration (every weight that would be
            dropped or left unset is named), or ``new`` exists.

    Example:
        >>> convert_checkpoint("Florence-2-base-PromptGen", "promptgen-native")  # doctest: +SKIP
        >>> florence = load_model("promptgen-native")  # doctest: +SKIP
    """
    source = Path(old).expanduser()
    layout = checkpoint_layout(source)
    if layout == "native":
        raise CheckpointError(f"{source} is already a native checkpoint: load_model reads it.")
    target = Path(new).expanduser()
    with _written_atomically(target, overwrite) as folder:
        config = _read_config(source)
        processor = _native_processor(source)
        model = _native_model(source, config, processor)
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
        CheckpointError: ``old`` holds no adapter (``adapter_config.json`` and weights), the
            adapter cannot be converted whole (the message says why), or ``new`` exists.
    """
    source = Path(old).expanduser()
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
            "it into the remote-code model (peft's merge_and_unload), save that, and convert "
            "the merged checkpoint instead."
        )
    state = _load_weights(weights)
    renamed, modules = _native_adapter_weights(state, source)
    config = _native_adapter_config(config, state, modules)
    target = Path(new).expanduser()
    with _written_atomically(target, overwrite) as folder:
        if weights[0].suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in renamed.items()}, folder / weights[0].name)
        else:
            torch.save(renamed, folder / weights[0].name)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), "utf-8")
        for extra in source.iterdir():
            if extra.name not in ("adapter_config.json", weights[0].name) and extra.is_file():
                shutil.copy2(extra, folder / extra.name)
    return target


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
    they belong to (native name -> remote name)."""
    renamed: dict[str, torch.Tensor] = {}
    modules: dict[str, str] = {}
    for key, tensor in state.items():
        part = _ADAPTER_PART.search(key)
        if not key.startswith(_ADAPTER_PREFIX) or part is None:
            raise CheckpointError(
                f"{source}: the adapter weight {key!r} is not a LoRA weight of a module "
                "(expected base_model.model.<module>.lora_A.weight and the like)."
            )
        module = key[len(_ADAPTER_PREFIX) : part.start()]
        native = native_name(module)
        modules[native] = module
        if _VOCABULARY_MODULES.search(module):
            tensor = _pad_vocabulary(tensor, part.group(1))
        renamed[_ADAPTER_PREFIX + native + part.group(0)] = tensor
    if not modules:
        raise CheckpointError(f"{source}: the adapter file holds no LoRA weights.")
    return renamed, modules


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
    config: dict[str, Any], state: Mapping[str, torch.Tensor], modules: dict[str, str]
) -> dict[str, Any]:
    """The adapter configuration for the native module names.

    ``target_modules`` lists exactly the modules holding weights (so nothing can be left out
    or added by a name that means other modules in the native model); per-module ranks and
    alphas are keyed by those native names; filters already applied to the list are dropped.
    """
    config = dict(config)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"The adapter is {config.get('peft_type')!r}, not LoRA: only LoRA adapters convert."
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
    if not folder.is_dir():
        raise CheckpointError(f"No checkpoint folder at {folder}.")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no model checkpoint: there is no config.json.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}.") from None


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
        if not file.is_file():
            raise CheckpointError(f"Missing weight file {file}.")
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(file))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


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


def _native_config(config: Mapping[str, Any], image_token_id: int, vocab: int) -> Any:
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
    return Florence2Config(
        text_config=BartConfig(**text),
        vision_config=Florence2VisionConfig(**native_vision),
        image_token_id=image_token_id,
    )


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


def _generation_config(config: Mapping[str, Any]) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(**_generation_settings(config))


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
    except (OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"Could not read the tokenizer or image processor in {source}: {first}"
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
    native = _native_config(config, tokenizer.image_token_id, vocab=embeddings.shape[0])
    dtype = embeddings.dtype
    model = Florence2ForConditionalGeneration(native).to(dtype)
    for name in _TIED & renamed.keys():  # stored copies of the shared embeddings
        if not torch.equal(renamed.pop(name), embeddings):
            raise CheckpointError(
                f"{source}: {name} differs from the shared text embeddings it is tied to in "
                "Florence-2; the native model cannot hold both."
            )
    missing, unexpected = model.load_state_dict(renamed, strict=False)
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
    generation = _generation_config(config)
    # Microsoft's model has no such tokens, so it can never write them: neither may this one.
    generation.suppress_tokens = list(range(rows, padded.weight.shape[0]))
    model.generation_config = generation
    return model.eval()


@contextmanager
def _written_atomically(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``target`` that becomes ``target`` only if the block succeeds."""
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise CheckpointError(f"{target} already exists and is not empty: choose a new folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(folder, target)


def convert(old: str | os.PathLike, new: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert a remote-code checkpoint, or a LoRA adapter trained on one (told by its files)."""
    if (Path(old).expanduser() / "adapter_config.json").is_file():
        return convert_adapter(old, new, overwrite=overwrite)
    return convert_checkpoint(old, new, overwrite=overwrite)
