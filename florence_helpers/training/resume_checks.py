"""A training checkpoint's optimizer, scheduler and scaler states checked before they load.

``load_state_dict`` takes what it is given: LambdaLR copies every key of its state into the
scheduler's attributes, and AdamW keeps moment tensors of any shape until a step fails. A
checkpoint someone else wrote is read with ``weights_only=True`` (no code runs), and its
states are then held to the layout this package's own optimizer, scheduler and scaler have.
"""

from __future__ import annotations

from typing import Any

import torch

_ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def resumable(state: dict[str, Any], optimizer: Any, scheduler: Any, scaler: Any) -> bool:
    """Whether the saved states have the layout of these (freshly made) ones."""
    fresh_scaler = scaler.state_dict()
    return (
        _optimizer_matches(state["optimizer"], optimizer)
        and same_layout(state["scheduler"], scheduler.state_dict())
        and (not fresh_scaler or same_layout(state["scaler"], fresh_scaler))
    )


def same_layout(saved: Any, fresh: Any) -> bool:
    """Whether ``saved`` has ``fresh``'s keys, lengths and kinds of value, all the way down."""
    if isinstance(fresh, dict):
        return (
            isinstance(saved, dict)
            and saved.keys() == fresh.keys()
            and all(same_layout(saved[k], fresh[k]) for k in fresh)
        )
    if isinstance(fresh, list | tuple):
        return (
            isinstance(saved, list | tuple)
            and len(saved) == len(fresh)
            and all(same_layout(a, b) for a, b in zip(saved, fresh, strict=True))
        )
    if isinstance(fresh, torch.Tensor):
        return (
            isinstance(saved, torch.Tensor)
            and saved.shape == fresh.shape
            and saved.dtype == fresh.dtype
        )
    if isinstance(fresh, bool) or fresh is None or isinstance(fresh, str):
        return type(saved) is type(fresh)
    if isinstance(fresh, int | float):
        return isinstance(saved, int | float) and not isinstance(saved, bool)
    return False


def _optimizer_matches(saved: Any, optimizer: Any) -> bool:
    """The same parameter groups (settings and parameter counts), and moments only for those
    parameters, each of its parameter's shape."""
    fresh = optimizer.state_dict()
    if not isinstance(saved, dict) or saved.keys() != fresh.keys():
        return False
    groups = saved["param_groups"]
    if not same_layout(groups, fresh["param_groups"]):
        return False
    shapes = {
        index: parameter.shape
        for group, saved_group in zip(optimizer.param_groups, groups, strict=True)
        for index, parameter in zip(saved_group["params"], group["params"], strict=True)
    }
    moments = saved["state"]
    return isinstance(moments, dict) and all(
        key in shapes
        and isinstance(entry, dict)
        and entry.keys() <= _ADAMW_STATE
        and all(
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and value.shape == (torch.Size([]) if name == "step" else shapes[key])
            for name, value in entry.items()
        )
        for key, entry in moments.items()
    )
