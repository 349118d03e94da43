"""Where the model runs and in which precision: ``auto`` resolved to CUDA, MPS or the CPU, and
the dtype each device computes natively (bf16 on CPUs with AVX512-BF16 or AMX).
"""

from __future__ import annotations

import re
import warnings

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
"""The devices :func:`resolve_device` (and ``load_model(device=...)``) accepts, in words."""


_DEVICE = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def available_devices() -> list[str]:
    """The devices that can be used here: ``auto``, ``cpu``, then ``cuda`` and ``cuda:0``,
    ``cuda:1``... for each visible GPU, and ``mps`` on Apple silicon."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if _mps_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for a ``device`` argument, checked to exist on this machine.

    ``"auto"`` picks CUDA, then Apple MPS, then the CPU. Nothing is loaded: call it first to
    refuse a wrong device at once (the command line does).

    Raises:
        ValueError: ``device`` is not one of auto, cpu, cuda, cuda:N or mps; or it is not
            available here (no CUDA in this torch or no GPU, a GPU index past the last one,
            no MPS). The message lists the devices that are.
    """
    text = str(device).strip() if isinstance(device, str | torch.device) else None
    match = _DEVICE.fullmatch(text) if text is not None else None
    if match is None or (match.group(2) is not None and match.group(1) not in ("cuda", "mps")):
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {device!r}.")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cuda":
        _check_cuda(text, None if index is None else int(index))
    elif kind == "mps" and not _mps_available():
        mps = getattr(torch.backends, "mps", None)
        why = (
            "this torch was built without MPS"
            if mps is None or not mps.is_built()
            else "MPS needs a Mac with Apple silicon and macOS 12.3 or later"
        )
        raise ValueError(_unavailable_device(text, why))
    elif kind == "mps" and index not in (None, "0"):
        raise ValueError(_unavailable_device(text, "there is one MPS device, mps"))
    return torch.device(text)


def _check_cuda(text: str, index: int | None) -> None:
    if not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) was built without CUDA"
            if torch.version.cuda is None
            else "no CUDA GPU is visible (check the driver, and CUDA_VISIBLE_DEVICES)"
        )
        raise ValueError(_unavailable_device(text, why))
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        gpus = f"cuda:0 to cuda:{count - 1}" if count > 1 else "cuda:0"
        raise ValueError(
            _unavailable_device(
                text,
                f"there {'is' if count == 1 else 'are'} {count} GPU"
                f"{'' if count == 1 else 's'} here ({gpus})",
            )
        )


def _unavailable_device(text: str, why: str) -> str:
    return (
        f"device {text!r} is not available here: {why}. Available: "
        f"{', '.join(available_devices())}."
    )


_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def cuda_half_dtype() -> torch.dtype:
    """bf16 where the GPU computes it natively (Ampere and later), else fp16.

    ``torch.cuda.is_bf16_supported()`` alone also says yes for emulated bf16 (a T4, for
    example), which is several times slower than fp16 there.
    """
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native else torch.float16


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX).

    Where it does, bf16 runs several times faster than fp32; where it does not (many laptops,
    Colab's CPU runtimes, ARM), torch emulates it and bf16 is far slower. The answer comes from
    torch's own capability checks, the ones its bf16 kernels dispatch on.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype for a ``load_model(dtype=...)`` argument on ``device``.

    ``"auto"`` picks the fastest safe one: on CUDA, bf16 where the GPU computes it natively,
    else fp16 (Florence-2 was trained in fp16); on a CPU, bf16 where the processor has native
    bf16 (:func:`cpu_has_native_bf16`), else fp32; fp32 on Apple MPS, which gives wrong answers
    in fp16. Half precision changes answers slightly; ask for ``"float32"`` for the exact ones.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return cuda_half_dtype()
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    else:
        try:
            chosen = _DTYPE_NAMES[str(dtype).lower()]
        except KeyError:
            raise ValueError(
                f"Unknown dtype {dtype!r}: use 'auto', {', '.join(_DTYPE_NAMES)} or a torch.dtype."
            ) from None
    if device.type == "mps" and chosen == torch.float16:
        warnings.warn(
            "Florence-2 in float16 on Apple MPS gives wrong answers with current PyTorch; "
            "use dtype='float32' (the default there).",
            stacklevel=3,
        )
    return chosen
