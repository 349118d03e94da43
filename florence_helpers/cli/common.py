"""What every command shares: exit codes, one-line failures, the model and generation
options, and the checks made before the model loads.
"""

from __future__ import annotations

import argparse
import sys

from ..boundary.images import ImageLoadError
from ..boundary.inputs import InputError, SettingError, expand_path
from ..boundary.outputs import OutputError
from ..language.prompts import TaskInputError
from ..language.regions import RegionError
from ..language.tasks import Task, TaskSpec, UnknownTaskError, task_spec
from ..model.loading import (
    DEFAULT_MODEL_ID,
    MODEL_ENV_VAR,
    FlorenceModel,
    ModelNotAvailableError,
    load_model,
    resolve_model_id,
)

EXIT_BUG = 1
EXIT_BAD_INPUT = 2


EXIT_NO_MODEL = 3
EXIT_IO = 4


EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
DEBUG_ENV_VAR = "FLORENCE_DEBUG"


# Mistakes in what the user gave: one "error:" line and exit code 2.
_BAD_INPUT = (
    UnknownTaskError,
    ImageLoadError,
    TaskInputError,
    RegionError,
    InputError,
    SettingError,
    OutputError,
)


class _Refused(Exception):
    """A failure already explained to the user: carries the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help=f"hub id or local directory (default: ${MODEL_ENV_VAR}, else {DEFAULT_MODEL_ID})",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--dtype", default="auto", help="auto, float32, bfloat16 or float16 (weights' precision)"
    )


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument(
        "--scores", action="store_true", help="attach confidences from token probabilities"
    )


def _add_classes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--classes",
        type=lambda value: [name for name in value.split(",") if name.strip()],
        help="comma-separated class names to detect, e.g. car,person (one open-vocabulary "
        "detection per class, boxes labelled with these names)",
    )


def _task_and_classes(args: argparse.Namespace, default: str | None) -> TaskSpec:
    """The task to run; with --classes, open-vocabulary detection (a clash is an error)."""
    if args.classes is None:
        if args.task is None and default is None:
            raise TaskInputError("Give --task (e.g. --task OD) or --classes.")
        return task_spec(args.task if args.task is not None else default)
    given = args.task if args.task is not None else "OPEN_VOCABULARY_DETECTION"
    spec = task_spec(given)
    if spec.task is not Task.OPEN_VOCABULARY_DETECTION:
        raise TaskInputError(
            f"--classes runs open-vocabulary detection per class; it does not go with --task "
            f"{spec.name}."
        )
    if args.text is not None or args.region is not None:
        raise TaskInputError("--classes takes the place of --text and --region: give only it.")
    from ..model.detection import check_classes

    check_classes(args.classes)
    return spec


def _checked_device(args: argparse.Namespace) -> str:
    """The dtype load_model will choose, checking --device and --dtype before it loads."""
    from ..model.devices import resolve_device, resolve_dtype

    try:
        device = resolve_device(args.device)
        return str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    except (ValueError, RuntimeError, TypeError) as error:
        raise _Refused(f"{error}", EXIT_BAD_INPUT) from None


def _model_folders(args: argparse.Namespace) -> list[str]:
    """The model's local folder, if it loads from one: outputs never go inside it."""
    model = resolve_model_id(args.model)
    return [model] if expand_path(model).is_dir() else []


def _load(args: argparse.Namespace) -> FlorenceModel:
    """Load the model without transformers' progress bars, or refuse with exit code 3."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load_model(args.model, device=args.device, dtype=args.dtype)
    except ModelNotAvailableError as error:
        raise _Refused(str(error), EXIT_NO_MODEL) from None


def _one_line(error: OSError) -> str:
    """An OSError as one sentence (the filename and reason, without the errno tuple)."""
    if error.filename is not None:
        return f"{error.strerror or error} ({error.filename})"
    return str(error.args[-1] if error.args else error)


def _fail(message: str, code: int) -> int:
    first, *rest = str(message).strip().splitlines() or [""]
    print(f"error: {' '.join([first, *[line.strip() for line in rest]])}", file=sys.stderr)
    return code


def _interrupted(interrupt: KeyboardInterrupt, command: str | None) -> str:
    summary = getattr(interrupt, "summary", None)
    if summary is not None:
        return (
            f"interrupted: {summary.written} records were written whole to {summary.output} "
            "before it; run the same command again to resume."
        )
    if command == "convert":
        return "interrupted: nothing was written (the unfinished folder was removed)."
    if command == "label":
        return "interrupted before any record was written."
    return "interrupted: nothing was written."
