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

# Remote-code weight names -> native ones, applied in order to every key (and to the module
# paths of adapter keys).
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
        (r"^image_projection$", "model.multi_modal_projector.image_projection.weight"),
        (r"^image_proj_norm\.", "model.multi_modal_projector.image_proj_norm."),
        (r"^image_pos_embed\.", "model.multi_modal_projector.image_position_embed."),
        (r"^visual_temporal_embed\.", "model.multi_modal_projector.visual_temporal_embed."),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
    ]
]
# Module names that adapter configurations list and that the native model calls otherwise.
_MODULE_RENAMES = {"dw": ["conv1", "conv2"]}
# Phrases the grounding parser never reports as a box of their own: pronouns, determiners and
# words for the picture itself.
_BANNED_GROUNDING = [
    *"I me my mine you your yours he him his she her hers it its we us our ours".split(),
    *"they them their theirs one this that these those who whom whose which what".split(),
    *"a an the all any each some several many few none another other".split(),
    "image",
    "images",
    "the image",
    "a group",
    "other objects",
]
POST_PROCESSOR_CONFIG: dict[str, Any] = {
    "ocr": {"area_threshold": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": _BANNED_GROUNDING},
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
    """
    name = remote
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


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

    Raises:
        CheckpointError: ``old`` is not a remote-code Florence-2 checkpoint (the message says
            what it is), its weights do not fit the configuration, or ``new`` exists.

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
    """Rename a LoRA adapter trained on the remote-code model for the native model.

    The keys (``base_model.model.<module>.lora_A.weight``) get their native module paths and
    ``target_modules`` the native module names; load the result with
    :func:`~florence_helpers.adapters.load_adapter` on the converted checkpoint.

    Raises:
        CheckpointError: ``old`` holds no adapter (``adapter_config.json`` and weights), or
            ``new`` exists.
    """
    source = Path(old).expanduser()
    config_path = source / "adapter_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{source} holds no adapter: there is no adapter_config.json.")
    weights = [source / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
    weights = [w for w in weights if w.is_file()]
    if not weights:
        raise CheckpointError(
            f"{source} has an adapter_config.json but no adapter_model.safetensors or .bin."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    state = _load_weights(weights)
    prefix = "base_model.model."
    renamed = {
        prefix + native_name(k[len(prefix) :]) if k.startswith(prefix) else k: v
        for k, v in state.items()
    }
    config["target_modules"] = _native_targets(config.get("target_modules"))
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


def _native_targets(targets: Any) -> Any:
    if isinstance(targets, str):
        return native_name(targets)
    if not targets:
        return targets
    out: list[str] = []
    for name in targets:
        for native in _MODULE_RENAMES.get(name, [name]):
            if native not in out:
                out.append(native)
    return out


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
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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


def _native_config(config: Mapping[str, Any], image_token_id: int, vocab: int) -> Any:
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    skip = {"model_type", "architectures", "auto_map", "_name_or_path", "transformers_version"}
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


def _native_model(source: Path, config: Mapping[str, Any], processor: Any) -> Any:
    from transformers import Florence2ForConditionalGeneration

    tokenizer = processor.tokenizer
    state = _load_weights(_weight_files(source))
    renamed = {native_name(k): v for k, v in state.items()}
    projection = "model.multi_modal_projector.image_projection.weight"
    if projection in renamed:
        renamed[projection] = renamed[projection].t().contiguous()
    embeddings = renamed.get("model.language_model.shared.weight")
    if embeddings is None:
        raise CheckpointError(f"{source}: no text embeddings (language_model.model.shared).")
    native = _native_config(config, tokenizer.image_token_id, vocab=embeddings.shape[0])
    dtype = next(iter(renamed.values())).dtype
    model = Florence2ForConditionalGeneration(native).to(dtype)
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    tied = {
        "model.language_model.encoder.embed_tokens.weight",
        "model.language_model.decoder.embed_tokens.weight",
        "lm_head.weight",
    }
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:6])
        raise CheckpointError(
            f"The weights in {source} do not fit a Florence-2 of its config.json: "
            f"{len(missing)} missing and {len(unexpected)} unexpected, e.g. {shown}."
        )
    model.tie_weights()
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
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
