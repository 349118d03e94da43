"""``python -m florence_helpers IMAGE --task ...``: one task on one image, printed as JSON,
optionally drawn into ``--out`` (never over the input).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ..boundary.images import load_image
from ..boundary.inputs import InputLimits, is_url, local_path
from ..boundary.outputs import OutputError, check_outputs, write_atomically
from ..language.prompts import build_prompt
from ..language.tasks import TASKS, TaskSpec
from ..model.loading import (
    FlorenceModel,
)
from .common import (
    _add_classes,
    _add_generation_options,
    _add_model_options,
    _checked_device,
    _load,
    _model_folders,
    _task_and_classes,
)


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
        help="let an image URL reach this host or network although it is not public, on "
        "every port or as HOST:PORT on one (e.g. 10.0.0.0/8, 127.0.0.1:8001); repeatable",
    )
    return parser


def _readable_json(payload: dict) -> str:
    """Indented JSON with each innermost list of numbers (a box, a point) on one line."""
    text = json.dumps(payload, ensure_ascii=False, indent=2)
    return re.sub(r"\[\s+([-\d.,eE\s]+?)\s+\]", lambda m: f"[{' '.join(m.group(1).split())}]", text)


def _check_image_output(path: str | None) -> None:
    """Refuse an --out whose extension names no image format Pillow writes in colour, before
    any work (some it reads but cannot write, such as .psd, or not in RGB, such as .xbm)."""
    from PIL import Image

    if path is None:
        return
    kind = Image.registered_extensions().get(Path(path).suffix.lower())
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=kind)
    except Exception:  # noqa: BLE001 - no format, no writer, or no RGB: each fails its own way
        raise OutputError(
            f"--out {path}: the file name must end in the extension of an image format that "
            "can be written in colour (.png, .jpg, .webp, ...)."
        ) from None


def run_main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    # Everything that can be checked without the model is checked first.
    spec = _task_and_classes(args, default="CAPTION")
    _check_image_output(args.out)
    check_outputs(
        {"--out": args.out},
        [] if is_url(args.image) else [local_path(args.image)],
        folders=_model_folders(args),
        holds={"--out": "image"},
    )
    image = load_image(args.image, limits=InputLimits(allowed_hosts=tuple(args.allow_host)))
    if args.classes is None:
        build_prompt(spec, image.size, text=args.text, region=args.region)
    from ..model.inference import check_generation_settings

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
    from ..model.detection import detect
    from ..model.inference import run

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

    from ..drawing.plotting import annotate

    picture = annotate(image, result)
    kind = Image.registered_extensions()[Path(path).suffix.lower()]
    if kind == "JPEG":
        picture = picture.convert("RGB")
    write_atomically(path, lambda handle: picture.save(handle, format=kind))
    print(f"wrote {path}", file=sys.stderr)
