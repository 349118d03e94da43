"""Load Segment Anything 2 (SAM 2) with transformers' native classes, beside Florence-2.

Florence-2 turns words into boxes; SAM 2 turns each box into a mask at the image's own
resolution. ``Sam2Processor`` prepares SAM 2's inputs with torchvision; where torchvision is
missing (no CPU build installs beside every CPU torch), :mod:`.prompts` prepares the same
tensors with torch alone, so :class:`SamModel` holds the processor only where it imports.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..boundary.inputs import MAX_CONFIG_FILE_BYTES, expand_path, read_file
from ..model.devices import cuda_half_dtype, resolve_device, resolve_dtype
from ..model.loading import ModelNotAvailableError, _hub_reachable

DEFAULT_SAM_ID = "facebook/sam2.1-hiera-tiny"
"""The SAM 2 checkpoint :func:`load_sam` loads when none is named (39 M parameters)."""

SAM_CHECKPOINTS = (
    "facebook/sam2.1-hiera-tiny",
    "facebook/sam2.1-hiera-small",
    "facebook/sam2.1-hiera-base-plus",
    "facebook/sam2.1-hiera-large",
)
"""SAM 2.1 checkpoints with transformers weights, smallest first."""

SAM_ENV_VAR = "SAM_MODEL"
"""Environment variable that may name a SAM 2 hub id or a local directory."""

logger = logging.getLogger(__name__)


@dataclass
class SamModel:
    """A SAM 2 model, and ``Sam2Processor`` where torchvision makes it importable.

    Attributes:
        model: The ``Sam2Model`` in eval mode.
        processor: The ``Sam2Processor``, or None where torchvision is missing (inputs are
            then prepared as :mod:`florence_helpers.masks.prompts` describes).
        model_id: The hub id or directory it was loaded from.
    """

    model: Any
    processor: Any
    model_id: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def input_size(self) -> int:
        """The square side SAM 2 sees every image at (1024 for the published checkpoints)."""
        return int(self.model.config.prompt_encoder_config.image_size)

    def __repr__(self) -> str:
        how = "Sam2Processor" if self.processor is not None else "inputs prepared with torch"
        return f"SamModel({self.model_id!r}, {self.device}, {self.dtype}, {how})"


def load_sam(
    model_id: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> SamModel:
    """Load a SAM 2 checkpoint from the hub or a local directory.

    Args:
        model_id: A hub id from :data:`SAM_CHECKPOINTS` or a local directory. Defaults to
            ``$SAM_MODEL``, then :data:`DEFAULT_SAM_ID`.
        device: As for :func:`~florence_helpers.load_model`: ``"auto"``, ``"cpu"``,
            ``"cuda"``, ``"cuda:N"`` or ``"mps"``; checked before anything is read.
        dtype: ``"auto"`` (bf16 on GPUs that compute it, as SAM 2's own code runs; fp32
            elsewhere, since fp16 overflows in SAM 2), a name such as ``"float32"``, or a
            torch dtype.

    Returns:
        A :class:`SamModel`.

    Raises:
        ValueError: An unknown or unavailable device, or an unknown dtype.
        ModelNotAvailableError: No such directory, a directory without a SAM 2 checkpoint,
            or the hub cannot be reached and there is no local copy (the message says how
            to download one).

    Example:
        >>> sam = load_sam("facebook/sam2.1-hiera-small")  # doctest: +SKIP
    """
    from transformers import Sam2Model

    name = resolve_sam_id(model_id)
    target = resolve_device(device)
    chosen = sam_dtype(dtype, target)
    local_only = _local_only(name)
    try:
        model, loading = Sam2Model.from_pretrained(
            name, dtype=chosen, local_files_only=local_only, output_loading_info=True
        )
    except Exception as error:  # noqa: BLE001 - every failure is named for the user below
        raise ModelNotAvailableError(_unavailable(name, error, local_only)) from error
    missing = sorted(loading.get("missing_keys") or ())
    if missing:  # random weights in their place would give masks of noise, silently
        raise ModelNotAvailableError(
            f"{name} is not a whole SAM 2 checkpoint: {len(missing)} weights are missing "
            f"(e.g. {', '.join(missing[:3])})."
        )
    model = model.to(target).eval()
    processor = _processor(name, local_only)
    logger.info("Loaded SAM 2 %s on %s in %s.", name, target, chosen)
    return SamModel(model=model, processor=processor, model_id=name)


def resolve_sam_id(model_id: str | os.PathLike | None = None) -> str:
    """The argument if given, else ``$SAM_MODEL``, else :data:`DEFAULT_SAM_ID`."""
    return os.fspath(model_id) if model_id else os.environ.get(SAM_ENV_VAR) or DEFAULT_SAM_ID


def torchvision_works() -> bool:
    """Whether torchvision imports and its operators load (``Sam2Processor`` needs both)."""
    try:
        import torchvision  # noqa: F401
        from torchvision.ops.boxes import batched_nms  # noqa: F401
    except Exception:  # noqa: BLE001 - a wheel built for another torch fails in its own way
        return False
    return True


def sam_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype :func:`load_sam` loads SAM 2 in on ``device`` for a ``dtype`` argument."""
    if dtype != "auto":
        return resolve_dtype(dtype, device)
    if device.type == "cuda" and cuda_half_dtype() == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def _processor(name: str, local_only: bool) -> Any:
    if not torchvision_works():
        return None
    from transformers import Sam2Processor

    return Sam2Processor.from_pretrained(name, local_files_only=local_only)


def _local_only(name: str) -> bool:
    """Whether to read local files only; raise at once where nothing can work."""
    path = expand_path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{path} is a directory but holds no SAM 2 checkpoint (no config.json)."
            )
        kind = _model_type(path / "config.json")
        if kind not in ("sam2", "sam2_video"):
            raise ModelNotAvailableError(
                f"{path} holds a {kind or 'model of unknown type'}, not SAM 2 (its config.json "
                "says model_type "
                f"{kind!r}). SAM 2.1 checkpoints: {', '.join(SAM_CHECKPOINTS)}."
            )
        return True
    if name.startswith(("/", "./", "../", "~")) or path.exists() or name.count("/") > 1:
        raise ModelNotAvailableError(f"No SAM 2 checkpoint directory at {path}.")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    return not _hub_reachable(name, f"SAM 2.1 checkpoints: {', '.join(SAM_CHECKPOINTS)}.")


def _model_type(config: Path) -> str | None:
    try:
        data = json.loads(read_file(config, max_bytes=MAX_CONFIG_FILE_BYTES))
    except (OSError, ValueError):  # InputError and JSONDecodeError are ValueErrors
        return None
    kind = data.get("model_type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def _unavailable(name: str, error: Exception, local_only: bool) -> str:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if expand_path(name).is_dir():
        return f"Could not load a SAM 2 model from {name}: {detail}"
    if not local_only:
        return f"The files of {name!r} were read from the hub, but are not a SAM 2 model: {detail}"
    folder = name.split("/")[-1]
    return (
        f"Could not load the SAM 2 model {name!r}: the Hugging Face Hub could not be reached "
        "and there is no local copy. Download it where the hub is reachable:\n"
        f"    hf download {name} --local-dir ./{folder}\n"
        f"then load_sam('./{folder}') (or set {SAM_ENV_VAR}=./{folder})."
    )
