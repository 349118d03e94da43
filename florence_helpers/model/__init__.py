"""Running Florence-2: loading, devices and CPU kernels, checkpoints and adapters, decoding,
scores and the task runners.

``loading`` (``load_model``, ``FlorenceModel``), ``devices`` (device and dtype choice),
``kernels`` (oneDNN linear layers on AMD CPUs), ``weight_files`` and ``checkpoint_files``
(reading and checking checkpoint files), ``convert``, ``convert_adapter`` and
``convert_output`` (remote-code checkpoints and adapters to native ones), ``adapters`` (LoRA),
``decoding`` (beam search shortcuts), ``scores`` (confidences), ``inference`` (``run``,
``run_tasks``), ``held_images`` (a long list's images, a bounded number held decoded),
``detection`` (a list of classes), ``tiling`` (OCR on large pages), ``prefetch`` (the next
batch prepared on a thread).

Layer 2: may import ``language``, ``boundary`` and ``drawing``.
"""

from .devices import (
    available_devices,
    cpu_has_native_bf16,
    cuda_half_dtype,
    resolve_device,
    resolve_dtype,
)
from .kernels import (
    cpu_vendor,
    cpuinfo_field,
    onednn_beats_mkl,
    use_onednn_linears,
    use_plain_linears,
)
from .loading import (
    CHECKPOINTS,
    DEFAULT_MODEL_ID,
    MODEL_ENV_VAR,
    FlorenceModel,
    ModelNotAvailableError,
    base_model,
    compile_for_speed,
    embed_prompts,
    is_peft,
    load_model,
    resolve_model_id,
    vision_tower,
)

__all__ = [
    "CHECKPOINTS",
    "DEFAULT_MODEL_ID",
    "MODEL_ENV_VAR",
    "FlorenceModel",
    "ModelNotAvailableError",
    "available_devices",
    "base_model",
    "compile_for_speed",
    "cpu_has_native_bf16",
    "cpu_vendor",
    "cpuinfo_field",
    "cuda_half_dtype",
    "embed_prompts",
    "is_peft",
    "load_model",
    "onednn_beats_mkl",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_id",
    "use_onednn_linears",
    "use_plain_linears",
    "vision_tower",
]
