"""CPU kernels: fp32 linear layers on oneDNN, decoding steps from weights packed once.

On AMD processors torch's MKL GEMM runs at about half speed; :func:`use_onednn_linears` swaps
the forward of fp32 ``nn.Linear`` layers for oneDNN's, with the weights of the few-row layers
of decoding packed once in its layout (repacked when a weight changes).
"""

from __future__ import annotations

import types
from typing import Any

import torch


def cpuinfo_field(name: str) -> str:
    """The first value of ``name`` in /proc/cpuinfo (``"vendor_id"``, ``"model name"``,
    ``"flags"``), or ``""`` where there is no such file or field."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU's vendor id (``"AuthenticAMD"``, ``"GenuineIntel"``), or ``""`` if unknown."""
    return cpuinfo_field("vendor_id")


def onednn_beats_mkl() -> bool:
    """Whether fp32 linear layers should run on oneDNN's kernels here rather than MKL's.

    torch's CPU builds multiply fp32 matrices with Intel's MKL, which on AMD processors runs far
    below their AVX-512 rate; oneDNN's kernels, also in every torch build, do not. Measured on
    this project's 2-core AMD EPYC: 2.0-2.4x faster for Florence-2's layer shapes, 5x for the
    output projection at 3 beams. On Intel processors MKL is kept (not measured against oneDNN).
    """
    return (
        cpu_vendor() == "AuthenticAMD"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Run ``model``'s fp32 linear layers through oneDNN when no gradient is needed.

    Each ``nn.Linear`` keeps its weights and its class; only its forward changes, and only for
    fp32 inputs on the CPU outside autograd (inference). Inputs of at most :data:`FEW_ROWS`
    rows (a decoding step: batch x beams rows) multiply by a copy of the weight packed once
    in oneDNN's own layout instead of being reordered on every call: a 3-row layer 1.5-2x
    faster on this project's AMD EPYC, bit for bit the same result. The packed copies cost
    memory (the decoder and the output projection again: 0.36 GB for base); a copy is packed
    again when its weight is replaced or changed in place (also through ``.data``, as peft's
    merge does).

    Anything else (bf16, CUDA, training, autocast, code being compiled by ``torch.compile``)
    takes ``nn.functional.linear`` as before. The results are the same fp32 products summed
    in another order (differences around 1e-7 of their size). ``load_model`` calls this on
    CPUs where :func:`onednn_beats_mkl`; :func:`use_plain_linears` undoes it. Returns how many
    layers were switched.
    """
    switched = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and "forward" not in vars(module):
            module.forward = types.MethodType(_linear_forward, module)
            module._onednn = _PackedWeight()
            switched += 1
    return switched


def use_plain_linears(model: torch.nn.Module) -> int:
    """Undo :func:`use_onednn_linears`: every linear layer back on ``nn.functional.linear``
    (the path of plain transformers), packed copies dropped. Returns how many layers changed."""
    restored = 0
    for module in model.modules():
        if isinstance(vars(module).get("_onednn"), _PackedWeight):
            del module.forward, module._onednn
            restored += 1
    return restored


FEW_ROWS = 256
"""Inputs of at most this many rows use a packed weight: decoding steps (batch x beams rows),
not the encoder's passes over hundreds of image and prompt tokens."""


_FINGERPRINT_SAMPLES = 1024


class _PackedWeight:
    """A linear layer's weight packed in oneDNN's layout, once it has been packed.

    A deepcopy (or a pickle) starts empty: the copy packs its own weights on first use.
    """

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.packed: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _PackedWeight:
        return _PackedWeight()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def packed_weight(self, weight: torch.Tensor, rows: int) -> torch.Tensor | None:
        """``weight`` in oneDNN's layout, packed again whenever it changed; None if it cannot
        be packed (a tensor made in inference mode has no version counter)."""
        if not weight.is_contiguous():
            return None
        try:
            version = weight._version
        except RuntimeError:
            return None
        flat = weight.detach().view(-1)
        # In-place writes through .data bypass the version counter (peft's merge does
        # that); a sum over 1024 spread-out elements notices them.
        fingerprint = float(flat[:: max(1, flat.numel() // _FINGERPRINT_SAMPLES)].sum())
        key = (weight.data_ptr(), version, weight.dtype, tuple(weight.shape), fingerprint)
        packed = self.packed
        if key != self.key or packed is None:
            self.packed = None  # free the stale copy before packing the new one
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
            self.packed, self.key = packed, key
        return packed  # a local: another thread may be repacking self.packed meanwhile


def _linear_forward(self: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (
        inputs.dtype == torch.float32
        and weight.dtype == torch.float32
        and inputs.device.type == "cpu"
        and weight.device.type == "cpu"
        and inputs.dim() >= 2
        and not (torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()  # torch.compile chooses its own kernels
    ):
        rows = inputs.numel() // max(1, inputs.shape[-1])
        packed = self._onednn.packed_weight(weight, rows) if rows <= FEW_ROWS else None
        return torch.ops.mkldnn._linear_pointwise(
            inputs, weight if packed is None else packed, self.bias, "none", [], ""
        )
    if self._onednn.packed is not None and (
        weight.dtype != torch.float32 or weight.device.type != "cpu"
    ):
        self._onednn.packed = self._onednn.key = None  # moved or cast: free the packed copy
    return torch.nn.functional.linear(inputs, weight, self.bias)
