"""Command line: run one Florence-2 task on one image, label a folder, convert a checkpoint.

python -m florence_helpers IMAGE --task OD [--text ...] [--region X1 Y1 X2 Y2]
                           [--model ID_OR_DIR] [--out annotated.png] [--json]
python -m florence_helpers IMAGE --classes car,person,"traffic light"
python -m florence_helpers label FOLDER --task OD --out labels.jsonl [--add] [--retry-errors]
python -m florence_helpers convert OLD_REMOTE_CODE_CHECKPOINT NEW_FOLDER
python -m florence_helpers serve [--host 127.0.0.1] [--port 8000] [--max-batch 8]
python -m florence_helpers mcp      # MCP tools over stdio

Exit codes: 0 done; 2 a mistake in the settings or the input (unknown task, missing text, an
unreadable image, an output file that is not a label file or is in use); 3 no model could be
loaded; 4 reading or writing files failed (a full disk, no permission). Each failure prints
one line starting with "error:", never a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .images import ImageLoadError, load_image
from .model import (
    DEFAULT_MODEL_ID,
    MODEL_ENV_VAR,
    FlorenceModel,
    ModelNotAvailableError,
    load_model,
)
from .prompts import TaskInputError, build_prompt
from .regions import RegionError
from .tasks import TASKS, Task, TaskSpec, UnknownTaskError, task_spec

EXIT_BAD_INPUT = 2
EXIT_NO_MODEL = 3
EXIT_IO = 4


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
    parser.add_argument(
        "--model",
        help=f"hub id or local directory (default: ${MODEL_ENV_VAR}, else {DEFAULT_MODEL_ID})",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument(
        "--scores", action="store_true", help="attach confidences from token probabilities"
    )
    parser.add_argument("--out", help="write the image with the result drawn on it here")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one compact JSON line, raw model output included (for scripts)",
    )
    return parser


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
        help="label again the images whose record is an error (replacing those records)",
    )
    parser.add_argument("--text", help="text for the tasks that take text")
    parser.add_argument("--region", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"))
    _add_classes(parser)
    parser.add_argument("--model", help="hub id or local directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--scores", action="store_true", help="attach confidences")
    parser.add_argument("--coco", help="also write the boxes as a COCO JSON file here")
    return parser


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


def _load_quietly(model_id: str | None, device: str) -> FlorenceModel | None:
    """Load the model without transformers' progress bars; on failure print why, return None."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load_model(model_id, device=device)
    except ModelNotAvailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def label_main(argv: Sequence[str]) -> int:
    args = _label_parser().parse_args(argv)
    from .inference import check_generation_settings
    from .labelling import LabelFileError, check_label_file, export_coco, job_settings, label
    from .model import resolve_model_id

    settings = {
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "scores": args.scores,
    }
    try:
        spec = _task_and_classes(args, default=None)
        if not Path(args.folder).is_dir():
            raise ImageLoadError(f"Not a folder: {args.folder}")
        if args.classes is None:
            build_prompt(spec, (10**6, 10**6), text=args.text, region=args.region)
        check_generation_settings(args.num_beams, args.max_new_tokens, args.batch_size)
        # The output file is checked before the model loads: a wrong --out fails in a second.
        job = job_settings(
            resolve_model_id(args.model),
            spec,
            text=args.text,
            region=args.region,
            classes=args.classes,
            **settings,
        )
        check_label_file(args.out, job, add=args.add)
    except (UnknownTaskError, ImageLoadError, TaskInputError, RegionError, LabelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    florence = _load_quietly(args.model, args.device)
    if florence is None:
        return EXIT_NO_MODEL
    try:
        summary = label(
            florence,
            args.folder,
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
    except (TaskInputError, LabelFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_IO
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
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {written}; load it with load_model({str(written)!r})", file=sys.stderr)
    return 0


def serve_main(argv: Sequence[str], mcp: bool = False) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m florence_helpers {'mcp' if mcp else 'serve'}",
        description="Serve Florence-2 as MCP tools over stdio (caption, detect, read_text, ground)."
        if mcp
        else "Serve Florence-2 over HTTP: POST /v1/run, GET /v1/tasks, GET /healthz.",
    )
    parser.add_argument("--model", help="hub id or local directory")
    parser.add_argument("--device", default="auto")
    if not mcp:
        parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
        parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, help="requests per generate call")
    parser.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill"
    )
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests, at most")
    parser.add_argument("--max-image-mb", type=float, default=20.0, help="largest image")
    args = parser.parse_args(argv)
    try:  # the "serve" extra: say so now, not after the model has loaded
        if mcp:
            import mcp as _sdk  # noqa: F401
        else:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
    except ImportError:
        print(
            'error: serving needs the "serve" extra: pip install "florence-helpers[serve]"',
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    from .serve import ServeSettings, mcp_server, serve

    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1.", file=sys.stderr)
            return EXIT_BAD_INPUT
    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_image_mb=args.max_image_mb,
    )
    florence = _load_quietly(args.model, args.device)
    if florence is None:
        return EXIT_NO_MODEL
    if mcp:
        mcp_server(florence, settings).run("stdio")
    else:
        serve(florence, host=args.host, port=args.port, settings=settings)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "label":
        return label_main(argv[1:])
    if argv and argv[0] == "convert":
        return convert_main(argv[1:])
    if argv and argv[0] in ("serve", "mcp"):
        return serve_main(argv[1:], mcp=argv[0] == "mcp")
    args = _parser().parse_args(argv)
    try:
        # Everything that can be checked without the model is checked first.
        spec = _task_and_classes(args, default="CAPTION")
        image = load_image(args.image)
        if args.classes is None:
            build_prompt(spec, image.size, text=args.text, region=args.region)
        from .inference import check_generation_settings

        check_generation_settings(args.num_beams, args.max_new_tokens)
    except (UnknownTaskError, ImageLoadError, TaskInputError, RegionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    florence = _load_quietly(args.model, args.device)
    if florence is None:
        return EXIT_NO_MODEL

    from .detection import detect
    from .inference import run
    from .plotting import annotate

    settings = {
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "scores": args.scores,
    }
    try:
        if args.classes is not None:
            result = detect(florence, image, args.classes, **settings)
        else:
            result = run(florence, image, spec, text=args.text, region=args.region, **settings)
    except (TaskInputError, RegionError) as error:  # checks that need the model (prompt length)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
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
        try:
            annotate(image, result).save(args.out)
        except (OSError, ValueError) as error:
            detail = _one_line(error) if isinstance(error, OSError) else str(error)
            print(f"error: could not write {args.out}: {detail}", file=sys.stderr)
            return EXIT_IO
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
