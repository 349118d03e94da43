"""Load a native transformers Florence-2 checkpoint with its processor."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..boundary.inputs import expand_path
from .devices import cpu_has_native_bf16, resolve_device, resolve_dtype
from .kernels import onednn_beats_mkl, use_onednn_linears

DEFAULT_MODEL_ID = "florence-community/Florence-2-base"
"""The checkpoint used when neither the argument nor ``FLORENCE_MODEL`` names one."""


MODEL_ENV_VAR = "FLORENCE_MODEL"
"""Environment variable that may name a hub id or a local directory."""


CHECKPOINTS = (
    "florence-community/Florence-2-base",
    "florence-community/Florence-2-large",
    "florence-community/Florence-2-base-ft",
    "florence-community/Florence-2-large-ft",
)
"""Checkpoints in the native transformers format (no remote code)."""


_HUB_PROBE_TIMEOUT_S = 10


logger = logging.getLogger(__name__)


class ModelNotAvailableError(RuntimeError):
    """Raised when a model can be found neither locally nor on the Hugging Face Hub."""


@dataclass
class FlorenceModel:
    """A Florence-2 model and its processor, loaded together.

    Attributes:
        model: The ``Florence2ForConditionalGeneration`` in eval mode.
        processor: The matching ``Florence2Processor``.
        model_id: The hub id or directory it was loaded from.
        merged_adapter: For a model a LoRA adapter was merged into
            (:func:`~florence_helpers.model.adapters.merge_adapter`), that adapter's fingerprint
            (:func:`~florence_helpers.model.adapters.adapter_fingerprint`), so the merged weights
            are never taken for ``model_id``'s own; None otherwise.
        adapter_folders: The folders of the adapters loaded on it (or merged into it), which
            a save never replaces.
    """

    model: Any
    processor: Any
    model_id: str
    merged_adapter: str | None = None
    adapter_folders: tuple[str, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def __repr__(self) -> str:
        merged = "" if self.merged_adapter is None else f", merged_adapter={self.merged_adapter!r}"
        return f"FlorenceModel({self.model_id!r}, device={self.device}, dtype={self.dtype}{merged})"


def base_model(model: Any) -> Any:
    """The transformers ``Florence2ForConditionalGeneration`` itself, unwrapped from peft."""
    return model.get_base_model() if is_peft(model) else model


def is_peft(model: Any) -> bool:
    """Whether ``model`` is a peft wrapper (a model with a LoRA adapter)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def vision_tower(model: Any) -> Any:
    """The image encoder (DaViT) of a Florence-2 model, peft-wrapped or not."""
    return base_model(model).model.vision_tower


def embed_prompts(model: Any, input_ids: torch.Tensor, image_features: torch.Tensor) -> Any:
    """The prompts' token embeddings with the image features in place of the ``<image>`` tokens.

    This is what the model's own forward pass does with ``pixel_values``; doing it here lets a
    caller encode an image once and reuse its features (several prompts, or every epoch).

    Args:
        model: A Florence-2 model (peft-wrapped or not).
        input_ids: Prompt token ids as the processor writes them, ``<image>`` tokens included.
        image_features: Projected image features, one row per prompt or one for all of them
            (``model.get_image_features(pixels).pooler_output``).
    """
    base = base_model(model)
    embeds = base.get_input_embeddings()(input_ids)
    features = image_features.to(embeds.dtype).expand(len(input_ids), -1, -1)
    where = (input_ids == base.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(where, features.reshape(-1, features.shape[-1]))


def resolve_model_id(model_id: str | os.PathLike | None = None) -> str:
    """The argument if given, else ``$FLORENCE_MODEL``, else :data:`DEFAULT_MODEL_ID`."""
    if model_id:
        return os.fspath(model_id)
    return os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL_ID


def load_model(
    model_id: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    compile: bool = False,
) -> FlorenceModel:
    """Load a Florence-2 model and its processor from the hub or a local directory.

    Args:
        model_id: A hub id such as ``"florence-community/Florence-2-large"`` or a local
            directory. Defaults to ``$FLORENCE_MODEL``, then
            ``"florence-community/Florence-2-base"``.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``
            or ``"mps"``; checked (:func:`resolve_device`) before anything is loaded.
        dtype: ``"auto"`` (bf16 or fp16 on CUDA; bf16 on CPUs with native bf16, fp32 on
            other CPUs and on MPS; see :func:`resolve_dtype`), a name such as ``"float32"``
            (exact answers) or ``"fp16"``, or a torch dtype. ``florence.dtype`` says which
            was chosen, and the choice is logged. On AMD processors fp32 linear layers run on
            oneDNN's kernels instead of MKL's, which are 2-5x slower there, decoding steps
            from weights packed once in oneDNN's layout (:func:`use_onednn_linears`; same
            products, summed in another order).
        compile: Compile for long runs. The vision encoder is compiled with
            ``torch.compile`` (on CPU this fuses its copies and element-wise work: about 12 %
            faster per image, after about a minute of compilation, so it pays after a few
            hundred images), and on CUDA decoding uses a static KV cache, which transformers
            compiles itself (uncompiled, on the CPU, it made decoding slower; see
            :func:`compile_for_speed`). Each new batch size compiles again. Worth it when
            labelling a folder; not for a few calls in a notebook. Nothing changes on MPS.

    Returns:
        A :class:`FlorenceModel` holding the model (in eval mode, on ``device``) and processor.

    Raises:
        ValueError: ``device`` is not a device name, or not available here; ``dtype`` is
            unknown. Raised before anything is read.
        ModelNotAvailableError: The directory does not exist, or the hub cannot be reached
            and there is no local copy (the message says how to point ``FLORENCE_MODEL`` at a
            local directory); or the checkpoint is not one this package can load: another
            model, the remote-code layout, a ``config.json`` that is not valid JSON or holds
            wrong values, or a damaged weight file. The message names the file and what is
            wrong with it.

    Example:
        >>> florence = load_model("florence-community/Florence-2-large")  # doctest: +SKIP
        >>> florence.device  # doctest: +SKIP
        device(type='cuda', index=0)
    """
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    name = resolve_model_id(model_id)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    local_only = _check_source(name)
    try:
        processor = AutoProcessor.from_pretrained(name, local_files_only=local_only)
        model, loading = Florence2ForConditionalGeneration.from_pretrained(
            name,
            dtype=torch_dtype,
            local_files_only=local_only,
            attn_implementation="sdpa",
            output_loading_info=True,
        )
    except Exception as error:  # noqa: BLE001 - every failure is named for the user below
        message = _unavailable_message(name, _load_failure(name, error), hub_reached=not local_only)
        raise ModelNotAvailableError(message) from error
    _check_weights(name, loading)
    _check_settings(name, model, processor)
    if target.type == "cpu":
        _use_available_cores()
        if onednn_beats_mkl():
            use_onednn_linears(model)
    model = model.to(target).eval()
    logger.info("Loaded %s on %s in %s%s.", name, target, torch_dtype, _dtype_reason(dtype, target))
    if compile:
        compile_for_speed(model)
    return FlorenceModel(model=model, processor=processor, model_id=name)


def compile_for_speed(model: Any) -> Any:
    """What ``load_model(compile=True)`` does to a loaded model: compile the vision encoder
    (CPU and CUDA) and, on CUDA, decode with a static KV cache, which transformers compiles.

    Elsewhere transformers runs a static cache uncompiled, which attends over its whole length
    at every step: on this project's AMD EPYC an 80-token bf16 answer took 6.1-7.9 s with it
    against 3.7-5.5 s without (interleaved, 3 rounds), so the CPU keeps the dynamic cache."""
    if model.device.type == "cuda":
        model.generation_config.cache_implementation = "static"
    if model.device.type in ("cpu", "cuda"):
        vision_tower(model).compile()
    else:
        logger.info("compile=True changes nothing on %s.", model.device.type)
    return model


def _check_weights(name: str, loading: dict[str, Any]) -> None:
    """Refuse a checkpoint whose weights do not fill the model: transformers would leave the
    missing ones random (and answers noise) and drop the unexpected ones, with only a report."""
    missing = sorted(loading.get("missing_keys") or [])
    unexpected = sorted(loading.get("unexpected_keys") or [])
    mismatched = [str(entry[0]) for entry in loading.get("mismatched_keys") or []]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, names in (
        ("missing (would be random)", missing),
        ("unexpected (would be dropped)", unexpected),
        ("of the wrong shape", mismatched),
    ):
        if names:
            shown = ", ".join(names[:8]) + (
                f", and {len(names) - 8} more" if len(names) > 8 else ""
            )
            parts.append(f"{len(names)} {label}: {shown}")
    raise ModelNotAvailableError(
        f"The weights in {name} do not fit a Florence-2 model of its config.json; "
        + "; ".join(parts)
        + ". The checkpoint is incomplete or damaged (download it again), or belongs to "
        "another model."
    )


def _check_settings(name: str, model: Any, processor: Any) -> None:
    """Refuse a checkpoint whose settings load but cannot answer: a generation_config.json
    without the token ids decoding starts and stops with, a processor_config.json that cannot
    prepare an image (a size of 0x0). Found here, the file is named; found at the first
    image, it would be an error from deep inside transformers."""
    from PIL import Image

    from .weight_files import _first_line

    folder = expand_path(name)

    def where(file: str) -> str:
        return str(folder / file) if folder.is_dir() else f"its {file}"

    vocabulary = model.get_output_embeddings().weight.shape[0]
    for key in ("decoder_start_token_id", "eos_token_id"):
        value = getattr(model.generation_config, key, None)
        ids = value if isinstance(value, list) else [value]
        if not ids or not all(isinstance(i, int) and 0 <= i < vocabulary for i in ids):
            raise ModelNotAvailableError(
                f"{where('generation_config.json')} has no valid {key} (found {value!r}), "
                "which decoding needs. The checkpoint is damaged: download it again, or copy "
                "generation_config.json from the checkpoint it was made from."
            )
    try:
        processor(text="<OD>", images=Image.new("RGB", (8, 8)), return_tensors="pt")
    except Exception as error:  # noqa: BLE001 - however the processor fails, its file is named
        raise ModelNotAvailableError(
            f"{where('processor_config.json')} cannot prepare an image "
            f"({type(error).__name__}: {_first_line(error)}). "
            "The checkpoint is damaged: download it again."
        ) from error


def _load_failure(name: str, error: Exception) -> str:
    """What went wrong while reading a checkpoint, in words a user can act on."""
    import json
    import pickle

    from .checkpoint_files import _config_problem
    from .weight_files import pickle_runs_code

    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    kind = type(error).__name__
    folder = expand_path(name)
    local = folder.is_dir()
    weights = folder / "pytorch_model.bin" if local else "its pytorch_model.bin"
    if isinstance(error, pickle.UnpicklingError) and not pickle_runs_code(error):
        return f"{weights} is damaged, cut short or not a PyTorch weight file; download it again"
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(error):
        return (
            f"{weights} is a pickle file holding more than tensors, which torch "
            "refuses to load safely (it could run code). Only if you trust where it came from, "
            "load it with torch.load(path, weights_only=False) and save the tensors with "
            "safetensors.torch.save_file(state_dict, 'model.safetensors') in its place."
        )
    if isinstance(error, json.JSONDecodeError):
        return f"one of its JSON files (config or weight index) is not valid JSON ({text})"
    if kind == "SafetensorError":
        return f"its safetensors file is damaged or cut short ({text}); download it again"
    if "ignore_mismatched_sizes" in str(error) or "size mismatch" in str(error):
        return f"some weights have the wrong shape for its config.json ({text})"
    if kind.startswith("StrictDataclass"):  # transformers refused a value in config.json
        config = folder / "config.json" if local else "its config.json"
        return f"{config} holds a wrong value: {_config_problem(error, {})}"
    return text


def _dtype_reason(asked: str | torch.dtype, device: torch.device) -> str:
    """Why ``"auto"`` chose what it did, for the log line; empty for an explicit dtype."""
    if asked != "auto":
        return ""
    if device.type == "cpu":
        native = cpu_has_native_bf16()
        return (
            " (this processor computes bf16 natively; dtype='float32' gives exact answers)"
            if native
            else " (this processor has no native bf16, where fp32 is faster)"
        )
    return " (the fastest safe dtype on this device)"


def _use_available_cores() -> None:
    """Never run more torch threads than this process may use (containers often show more)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        available = os.cpu_count() or 1
    if torch.get_num_threads() > available:
        torch.set_num_threads(available)


def _check_source(name: str) -> bool:
    """Decide whether to load from local files only; raise early when nothing can work.

    Returns:
        True when the model must come from local files (a directory, offline mode, or an
        unreachable hub with a cached copy).
    """
    path = expand_path(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotAvailableError(
                f"{path} is a directory but holds no Florence-2 model (no config.json). "
                f"Point {MODEL_ENV_VAR} at the folder that contains config.json."
            )
        _check_layout(path)
        return True
    if name.startswith(("/", "./", "../", "~")) or path.exists() or name.count("/") > 1:
        raise ModelNotAvailableError(f"No model directory at {path}.")
    if name.lower().startswith("microsoft/florence-2"):
        native = "florence-community/" + name.split("/", 1)[1]
        raise ModelNotAvailableError(
            f"{name} holds the original remote-code format, which current transformers cannot "
            f"load without trust_remote_code. Use the native conversion {native!r} instead."
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    return not _hub_reachable(name)


def _check_layout(path: Path) -> None:
    """Refuse a folder that is not a native Florence-2 checkpoint, saying what it is."""
    from .checkpoint_files import checkpoint_layout, convert_command
    from .weight_files import CheckpointError

    try:
        layout = checkpoint_layout(path)
    except CheckpointError as error:
        raise ModelNotAvailableError(str(error)) from None
    if layout == "remote-code":
        raise ModelNotAvailableError(
            f"{path} is a Florence-2 checkpoint in the original remote-code layout "
            "(config.json names auto_map modules and a florence2_language text model), which "
            "transformers' native classes cannot read. Convert it once, then load the copy:\n"
            f"    {convert_command(path)}"
        )


def _hub_reachable(
    name: str, known: str = f"Native Florence-2 checkpoints: {', '.join(CHECKPOINTS)}."
) -> bool:
    """One quick request to the hub, so an offline machine fails in seconds, not minutes.

    Raises:
        ModelNotAvailableError: The hub answered that there is no such model; ``known``
            (the checkpoints to use instead) ends the message.
    """
    import huggingface_hub

    try:
        huggingface_hub.model_info(name, timeout=_HUB_PROBE_TIMEOUT_S)
    except huggingface_hub.errors.RepositoryNotFoundError as error:
        raise ModelNotAvailableError(
            f"There is no model {name!r} on the Hugging Face Hub (or it is private). {known}"
        ) from error
    except Exception:  # noqa: BLE001 - any transport failure means: go offline
        return False
    return True


def _unavailable_message(name: str, detail: str, *, hub_reached: bool = False) -> str:
    """Why loading failed, naming what actually went wrong (never the network when the files
    were read)."""
    from .checkpoint_files import REMOTE_TEXT_MODEL, convert_command

    first_line = detail.strip().splitlines()[0] if detail.strip() else ""
    if expand_path(name).is_dir():
        return f"Could not load a Florence-2 model from {name}: {first_line}"
    folder = name.split("/")[-1]
    if hub_reached and (REMOTE_TEXT_MODEL in detail or "trust_remote_code" in detail):
        return (
            f"{name} is a Florence-2 checkpoint in the original remote-code layout, which "
            "transformers' native classes cannot read. Download it and convert it once:\n"
            f"    hf download {name} --local-dir ./{folder}\n"
            f"    {convert_command('./' + folder)}\n"
            f"then load ./{folder}-native."
        )
    if hub_reached:
        return (
            f"The files of {name!r} were read from the Hugging Face Hub, but transformers could "
            f"not load them as a Florence-2 model: {first_line}"
        )
    return (
        f"Could not load the Florence-2 model {name!r}: the Hugging Face Hub could not be "
        "reached and there is no local copy.\n"
        "To use a copy on disk, download it on a machine with internet access, e.g.\n"
        f"    hf download {name} --local-dir ./{name.split('/')[-1]}\n"
        f"then point {MODEL_ENV_VAR} at that directory:\n"
        f"    export {MODEL_ENV_VAR}=/path/to/{name.split('/')[-1]}\n"
        "To try the pipeline offline with a tiny random-weight model (its answers are noise):\n"
        "    python -m florence_helpers.testing /tmp/tiny-florence2\n"
        f"    export {MODEL_ENV_VAR}=/tmp/tiny-florence2"
    )
