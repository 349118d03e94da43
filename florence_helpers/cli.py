"""Command line: run one Florence-2 task on one image, label a folder, convert a checkpoint.

python -m florence_helpers IMAGE --task OD [--text ...] [--region X1 Y1 X2 Y2]
                           [--model ID_OR_DIR] [--out annotated.png] [--json]
python -m florence_helpers IMAGE --classes car,person,"traffic light"
python -m florence_helpers label FOLDER --task OD --out labels.jsonl [--add] [--retry-errors]
python -m florence_helpers convert OLD_REMOTE_CODE_CHECKPOINT NEW_FOLDER
python -m florence_helpers serve [--host 127.0.0.1] [--port 8000] [--api-key KEY]
python -m florence_helpers mcp [--allow-folder DIR]      # MCP tools over stdio

Exit codes: 0 done; 1 an unexpected error (a bug: please report it; FLORENCE_DEBUG=1 shows
where it happened); 2 a mistake in the settings or the input (unknown task, missing text, an
unreadable image, an output that would overwrite an input, a label file of another job or in
use, a damaged checkpoint to convert); 3 no model could be loaded; 4 reading or writing files
failed (a full disk, no permission); 130 interrupted (Ctrl-C), after saying what was finished.
Each failure prints one line starting with "error:", never a traceback. Everything that can be
checked without the model (the task, the image, the outputs, the device) is checked before it
loads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from .images import ImageLoadError, load_image
from .inputs import InputError, InputLimits, SettingError
from .model import (
    DEFAULT_MODEL_ID,
    MODEL_ENV_VAR,
    FlorenceModel,
    ModelNotAvailableError,
    load_model,
)
from .outputs import OutputError, check_outputs, write_atomically
from .prompts import TaskInputError, build_prompt
from .regions import RegionError
from .tasks import TASKS, Task, TaskSpec, UnknownTaskError, task_spec

EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_NO_MODEL = 3
EXIT_IO = 4
EXIT_INTERRUPTED = 130
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


def _parser() -> argparse.ArgumentParser:
    tasks = "\n".join(f"  {spec.name:<34} {spec.description}" for spec in TASKS.values())
    parser = argparse.ArgumentParser(
        prog="python -m florence_helpers",
        description="Run a Florence-2 task on an image and print the parsed result as JSON.",
        epilog=f"tasks:\n{tasks}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", help="image path or http(s) URL")
    parser.add_argument(
        "--task",
        help="task name, e.g. OD or '<OD>' (default: CAPTION; with --classes: "
        "OPEN_VOCABULARY_DETECTION)",
    )
    parser.add_argument("--text", help="text for grounding, open-vocabulary detection, etc.")
    _add_classes(parser)
    parser.add_argument(
        "--region",
        nargs=4,
        type=float,
        metavar=("X1", "Y1", "X2", "Y2"),
        help="pixel box for the REGION_TO_* tasks",
    )
    _add_model_options(parser)
    _add_generation_options(parser)
    parser.add_argument("--out", help="write the image with the result drawn on it here")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one compact JSON line, raw model output included (for scripts)",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="let an image URL reach this host or network although it is not public "
        "(e.g. 127.0.0.1 or 10.0.0.0/8); repeatable",
    )
    return parser


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


def _readable_json(payload: dict) -> str:
    """Indented JSON with each innermost list of numbers (a box, a point) on one line."""
    text = json.dumps(payload, ensure_ascii=False, indent=2)
    return re.sub(r"\[\s+([-\d.,eE\s]+?)\s+\]", lambda m: f"[{' '.join(m.group(1).split())}]", text)


def _label_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m florence_helpers label",
        description="Label every image of a folder into a JSON-lines file. Run it again with "
        "the same --out to resume after an interruption: done images are skipped.",
    )
    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument(
        "--task", help="task name, e.g. OD or DETAILED_CAPTION (needed unless --classes)"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="label file (JSON lines); the same job resumes in it, another job is refused",
    )
    parser.add_argument(
        "--add", action="store_true", help="add this job to a label file holding another job"
    )
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        help="label again the images of FOLDER whose record is an error (replacing those "
        "records, and only those)",
    )
    parser.add_argument("--text", help="text for the tasks that take text")
    parser.add_argument("--region", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"))
    _add_classes(parser)
    _add_model_options(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    _add_generation_options(parser)
    parser.add_argument("--coco", help="also write the boxes as a COCO JSON file here")
    return parser


def _task_and_classes(args: argparse.Namespace, default: str | None) -> TaskSpec:
    """The task to run; with --classes, open-vocabulary detection (a clash is an error)."""
    if args.classes is None:
        if args.task is None and default is None:
            raise TaskInputError("Give --task (e.g. --task OD) or --classes.")
        return task_spec(args.task or default)
    spec = task_spec(args.task or "OPEN_VOCABULARY_DETECTION")
    if spec.task is not Task.OPEN_VOCABULARY_DETECTION:
        raise TaskInputError(
            f"--classes runs open-vocabulary detection per class; it does not go with --task "
            f"{spec.name}."
        )
    if args.text is not None or args.region is not None:
        raise TaskInputError("--classes takes the place of --text and --region: give only it.")
    from .detection import check_classes  # the model code loads only once input is checked

    check_classes(args.classes)
    return spec


def _checked_device(args: argparse.Namespace) -> str:
    """The dtype load_model will choose, checking --device and --dtype before it loads."""
    from .model import resolve_device, resolve_dtype

    try:
        device = resolve_device(args.device)
        return str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    except (ValueError, RuntimeError, TypeError) as error:
        raise _Refused(f"{error}", EXIT_BAD_INPUT) from None


def _load(args: argparse.Namespace) -> FlorenceModel:
    """Load the model without transformers' progress bars, or refuse with exit code 3."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load_model(args.model, device=args.device, dtype=args.dtype)
    except ModelNotAvailableError as error:
        raise _Refused(str(error), EXIT_NO_MODEL) from None


def _check_image_output(path: str | None) -> None:
    """Refuse an --out whose extension names no image format, before any work."""
    from PIL import Image

    if path is not None and Path(path).suffix.lower() not in Image.registered_extensions():
        raise OutputError(
            f"--out {path}: the file name must end in an image format's extension "
            "(.png, .jpg, .webp, ...)."
        )


def run_main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    # Everything that can be checked without the model is checked first.
    spec = _task_and_classes(args, default="CAPTION")
    local = "://" not in args.image or args.image.lower().startswith("file://")
    check_outputs({"--out": args.out}, [args.image] if local else [])
    _check_image_output(args.out)
    image = load_image(args.image, limits=InputLimits(allowed_hosts=tuple(args.allow_host)))
    if args.classes is None:
        build_prompt(spec, image.size, text=args.text, region=args.region)
    from .inference import check_generation_settings

    check_generation_settings(args.num_beams, args.max_new_tokens)
    _checked_device(args)
    florence = _load(args)
    result = _answer(florence, image, spec, args)
    payload = result.to_dict()
    if args.json:
        print(json.dumps(payload, ensure_ascii=False))
    else:
        payload.pop("raw")
        print(_readable_json(payload))
    if result.truncated:
        print(
            f"warning: the answer hit --max-new-tokens={args.max_new_tokens} and was cut off; "
            "only what parsed cleanly is shown.",
            file=sys.stderr,
        )
    if args.out:
        _write_annotated(image, result, args.out)
    return 0


def _answer(florence: FlorenceModel, image: object, spec: TaskSpec, args: argparse.Namespace):
    from .detection import detect
    from .inference import run

    settings = {
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "scores": args.scores,
    }
    if args.classes is not None:
        return detect(florence, image, args.classes, **settings)
    return run(florence, image, spec, text=args.text, region=args.region, **settings)


def _write_annotated(image: object, result: object, path: str) -> None:
    from PIL import Image

    from .plotting import annotate

    picture = annotate(image, result)
    kind = Image.registered_extensions()[Path(path).suffix.lower()]
    if kind == "JPEG":
        picture = picture.convert("RGB")
    write_atomically(path, lambda handle: picture.save(handle, format=kind))
    print(f"wrote {path}", file=sys.stderr)


def label_main(argv: Sequence[str]) -> int:
    args = _label_parser().parse_args(argv)
    from .inference import check_generation_settings
    from .labelling import (
        LabelFileError,
        check_label_file,
        export_coco,
        find_images,
        job_settings,
        label,
    )
    from .model import resolve_model_id

    settings = {
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "scores": args.scores,
    }
    spec = _task_and_classes(args, default=None)
    if not Path(args.folder).is_dir():
        raise ImageLoadError(f"Not a folder: {args.folder}")
    if args.classes is None:
        build_prompt(spec, (10**6, 10**6), text=args.text, region=args.region)
    check_generation_settings(args.num_beams, args.max_new_tokens, args.batch_size)
    images = find_images(args.folder)
    check_outputs({"--out": args.out, "--coco": args.coco}, images)
    dtype = _checked_device(args)
    # The output file is checked before the model loads: a wrong --out fails in a second.
    job = job_settings(
        resolve_model_id(args.model),
        spec,
        text=args.text,
        region=args.region,
        classes=args.classes,
        dtype=dtype,
        **settings,
    )
    try:
        check_label_file(args.out, job, add=args.add)
    except LabelFileError as error:
        raise _Refused(str(error), EXIT_BAD_INPUT) from None
    florence = _load(args)
    summary = label(
        florence,
        images,
        spec,
        args.out,
        text=args.text,
        region=args.region,
        classes=args.classes,
        batch_size=args.batch_size,
        add=args.add,
        retry_errors=args.retry_errors,
        **settings,
    )
    retried = f", {summary.retried} of them retried errors" if summary.retried else ""
    print(
        f"wrote {summary.written} records ({summary.errors} errors{retried}) to "
        f"{summary.output}; {summary.skipped} images were already there",
        file=sys.stderr,
    )
    if args.coco:
        dataset = export_coco(summary.output, args.coco)
        print(f"wrote {len(dataset['annotations'])} boxes to {args.coco}", file=sys.stderr)
    return 0


def _one_line(error: OSError) -> str:
    """An OSError as one sentence (the filename and reason, without the errno tuple)."""
    if error.filename is not None:
        return f"{error.strerror or error} ({error.filename})"
    return str(error.args[-1] if error.args else error)


def convert_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m florence_helpers convert",
        description="Convert a Florence-2 checkpoint in the original remote-code layout (or a "
        "LoRA adapter trained on one) to the native transformers format that load_model reads.",
    )
    parser.add_argument("old", help="the remote-code checkpoint or adapter folder")
    parser.add_argument("new", help="the folder to write (must not exist yet)")
    parser.add_argument("--overwrite", action="store_true", help="replace NEW if it exists")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from .checkpoints import CheckpointError, convert

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        written = convert(args.old, args.new, overwrite=args.overwrite)
    except CheckpointError as error:
        raise _Refused(str(error), EXIT_BAD_INPUT) from None
    print(f"wrote {written}; load it with load_model({str(written)!r})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; every failure is one ``error:`` line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("label", "convert", "serve", "mcp") else None
    try:
        if command == "label":
            return label_main(argv[1:])
        if command == "convert":
            return convert_main(argv[1:])
        if command in ("serve", "mcp"):
            from .serve_cli import serve_main

            return serve_main(argv[1:], mcp=command == "mcp")
        return run_main(argv)
    except _Refused as refused:
        return _fail(str(refused), refused.code)
    except _BAD_INPUT as error:
        return _fail(str(error), EXIT_BAD_INPUT)
    except KeyboardInterrupt as interrupt:
        return _fail(_interrupted(interrupt, command), EXIT_INTERRUPTED)
    except OSError as error:
        return _fail(_one_line(error), EXIT_IO)
    except Exception as error:  # noqa: BLE001 - the contract: one line, never a traceback
        if os.environ.get(DEBUG_ENV_VAR):
            traceback.print_exc()
        return _fail(
            f"unexpected {type(error).__name__}: {error}. This is a bug in florence-helpers: "
            f"please report it (set {DEBUG_ENV_VAR}=1 to see where it happened).",
            EXIT_BUG,
        )


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
