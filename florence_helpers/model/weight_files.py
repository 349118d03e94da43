"""Checkpoint weight files read safely: safetensors and weights-only pickles, each damaged
file named with what is wrong with it (truncated, holding code, not a weights file).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from ..boundary.inputs import MAX_CONFIG_FILE_BYTES, InputError, read_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """Raised for a folder that is not a Florence-2 checkpoint this package can use as it is."""


def _weight_files(folder: Path) -> list[Path]:
    for name in INDEX_FILES:
        index = folder / name
        if index.is_file():
            try:
                text = read_file(index, max_bytes=MAX_CONFIG_FILE_BYTES).decode("utf-8")
                shards = sorted(set(json.loads(text)["weight_map"].values()))
            except InputError as error:  # not a regular file, or far too large for an index
                raise CheckpointError(str(error)) from None
            except (
                json.JSONDecodeError,
                UnicodeDecodeError,
                KeyError,
                TypeError,
                AttributeError,
                RecursionError,
            ):
                raise CheckpointError(
                    f"{index} is not a weight index (JSON with a weight_map of weight names to "
                    "files): the download is incomplete or damaged."
                ) from None
            for shard in shards:
                if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                    raise CheckpointError(
                        f"{index} names the weight file {shard!r:.80}, which is not a file name "
                        "in the checkpoint's folder: the index is damaged."
                    )
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
    for name, tensor in state.items():
        # A pickle can hold a view that repeats a few numbers over a huge shape (stride 0):
        # 2 kB claiming a rank of 100 million, which peft then allocates for real.
        if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise CheckpointError(
                f"{file}: its tensor {name} claims the shape {tuple(tensor.shape)} over "
                f"{tensor.untyped_storage().nbytes():,} bytes of data (a repeated view, which "
                "no saved model holds): it is not a weight file this package reads."
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
