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
:class:`~florence_helpers.boundary.outputs.OutputError` for an output it refuses before reading
anything (an existing file, or a folder that is or holds the input); :class:`OSError` when writing
fails (a full disk, a read-only folder), with one sentence naming the output and the reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..boundary.inputs import expand_path
from .checkpoint_files import _config_problem, _read_config, checkpoint_layout, native_name
from .convert_adapter import convert_adapter
from .convert_output import _check_output, _reading, _written_atomically
from .weight_files import CheckpointError, _first_line, _load_weights, _weight_files

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


def convert_checkpoint(
    old: str | os.PathLike, new: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a native copy of a remote-code Florence-2 checkpoint that ``load_model`` reads.

    Args:
        old: The remote-code checkpoint folder (e.g. a download of ``microsoft/Florence-2-base``
            or of a community fine-tune).
        new: The folder to write. It must not exist, or be empty, unless ``overwrite``; it
            can never be a file, ``old`` itself or a folder holding ``old``.
        overwrite: Replace an existing ``new`` that holds an earlier conversion (a
            Florence-2 checkpoint or adapter; never other files, the current folder or the
            home folder). It is replaced only once the new copy is complete: if anything
            fails, it stays as it was.

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
    source = expand_path(old)
    target = expand_path(new)
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
    """The native model holding the remote-code checkpoint's weights, renamed and checked."""
    tokenizer = processor.tokenizer
    renamed = _native_weights(source)
    embeddings = renamed["model.language_model.shared.weight"]
    path = source / "config.json"
    native = _native_config(config, tokenizer.image_token_id, vocab=embeddings.shape[0], path=path)
    generation = _generation_config(config, path)
    model = _empty_model(native, embeddings.dtype, path)
    for name in _TIED & renamed.keys():  # stored copies of the shared embeddings
        if not torch.equal(renamed.pop(name), embeddings):
            raise CheckpointError(
                f"{source}: {name} differs from the shared text embeddings it is tied to in "
                "Florence-2; the native model cannot hold both."
            )
    _load_state(model, renamed, source)
    model.tie_weights()
    rows = embeddings.shape[0]
    padded = model.resize_token_embeddings(
        len(tokenizer), pad_to_multiple_of=64, mean_resizing=False
    )
    with torch.no_grad():  # the rows added for <image> and padding: the mean row, every time
        padded.weight[rows:] = embeddings.float().mean(dim=0).to(embeddings.dtype)
    # Microsoft's model has no such tokens, so it can never write them: neither may this one.
    generation.suppress_tokens = list(range(rows, padded.weight.shape[0]))
    model.generation_config = generation
    return model.eval()


def _native_weights(source: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under their native names (no output bias: there is none)."""
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
    if "model.language_model.shared.weight" not in renamed:
        raise CheckpointError(f"{source}: no text embeddings (language_model.model.shared).")
    return renamed


def _empty_model(native: Any, dtype: torch.dtype, path: Path) -> Any:
    """A native Florence-2 of the translated configuration, in the checkpoint's dtype."""
    from transformers import Florence2ForConditionalGeneration

    try:
        return Florence2ForConditionalGeneration(native).to(dtype)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure here comes from the configuration
        raise CheckpointError(
            f"{path} does not describe a Florence-2 model that can be built: "
            f"{_first_line(error)}. Fix or download config.json again."
        ) from None


def _load_state(model: Any, renamed: dict[str, torch.Tensor], source: Path) -> None:
    """Load every weight, refusing one of the wrong shape, one missing or one left unused."""
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


def convert(old: str | os.PathLike, new: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert a remote-code checkpoint, or a LoRA adapter trained on one (told by its files).

    ``new`` is checked first, before anything is read (see :func:`convert_checkpoint`).

    Raises:
        CheckpointError: ``old`` cannot be converted (the message names the file and what is
            wrong), or ``new`` exists and is not empty (without ``overwrite``).
        OutputError: ``new`` is a file, is (or holds) ``old``, or would replace what
            ``overwrite`` may not (files that are not an earlier conversion, the current or
            home folder).
        OSError: Writing failed; the message names ``new`` and the reason, and nothing is
            left behind (an existing ``new`` is as it was).
    """
    source, target = expand_path(old), expand_path(new)
    _check_output(target, source, overwrite)
    if (source / "adapter_config.json").is_file():
        return convert_adapter(source, target, overwrite=overwrite)
    return convert_checkpoint(source, target, overwrite=overwrite)
