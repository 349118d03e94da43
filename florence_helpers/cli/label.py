"""``python -m florence_helpers label FOLDER --out labels.jsonl``: label a folder, resumably,
with every output checked before the model loads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..boundary.images import ImageLoadError
from ..boundary.inputs import expand_path
from ..boundary.outputs import check_outputs
from ..language.prompts import build_prompt
from ..language.tasks import TaskSpec
from .common import (
    EXIT_BAD_INPUT,
    EXIT_NO_MODEL,
    _add_classes,
    _add_generation_options,
    _add_model_options,
    _checked_device,
    _load,
    _model_folders,
    _Refused,
    _task_and_classes,
)


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
    parser.add_argument(
        "--masks",
        choices=["sam2"],
        help="also draw a mask in every box with SAM 2, written run-length encoded (and as "
        "the COCO segmentation with --coco)",
    )
    parser.add_argument(
        "--sam",
        help="SAM 2 hub id or local directory for --masks (default: $SAM_MODEL, else "
        "facebook/sam2.1-hiera-tiny)",
    )
    return parser


def label_main(argv: Sequence[str]) -> int:
    args = _label_parser().parse_args(argv)
    from ..labelling import export_coco
    from ..labelling.jobs import label

    settings = {
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "scores": args.scores,
    }
    spec, images = _checked_before_loading(args, settings)
    florence = _load(args)
    sam = _load_sam(args) if args.masks else None
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
        sam=sam,
        **settings,
    )
    retried = f", {summary.retried} of them retried errors" if summary.retried else ""
    print(
        f"wrote {summary.written} records ({summary.errors} errors{retried}) to "
        f"{summary.output}; {summary.skipped} images were already there",
        file=sys.stderr,
    )
    if args.coco:
        from ..labelling import LabelFileError

        try:
            dataset = export_coco(summary.output, args.coco)
        except LabelFileError as error:
            message = f"{error} The labels are written; no COCO file was."
            raise _Refused(message, EXIT_BAD_INPUT) from None
        print(f"wrote {len(dataset['annotations'])} boxes to {args.coco}", file=sys.stderr)
    return 0


def _checked_before_loading(
    args: argparse.Namespace, settings: dict[str, Any]
) -> tuple[TaskSpec, list[Path]]:
    """Everything that can be refused without the model, refused in a second: the task and
    its inputs, the settings, the folder, the outputs and the label file's job. Returns the
    task and the images."""
    from ..labelling import LabelFileError, check_label_file, job_settings
    from ..labelling.jobs import find_images
    from ..model.inference import check_generation_settings
    from ..model.loading import resolve_model_id

    spec = _task_and_classes(args, default=None)
    if not expand_path(args.folder).is_dir():
        raise ImageLoadError(f"Not a folder: {args.folder}")
    if args.classes is None:
        build_prompt(spec, (10**6, 10**6), text=args.text, region=args.region)
    check_generation_settings(args.num_beams, args.max_new_tokens, args.batch_size)
    images = find_images(args.folder)
    dtype = _checked_device(args)
    masks = _planned_masks(args, spec)
    sam_folder = [masks["model"]] if masks and expand_path(masks["model"]).is_dir() else []
    check_outputs(
        {"--out": args.out, "--coco": args.coco},
        images,
        folders=_model_folders(args) + sam_folder,
        holds={"--coco": "COCO JSON"},
    )
    # The output file is checked before the model loads: a wrong --out fails in a second.
    job = job_settings(
        resolve_model_id(args.model),
        spec,
        text=args.text,
        region=args.region,
        classes=args.classes,
        dtype=dtype,
        masks=masks,
        **settings,
    )
    try:
        check_label_file(args.out, job, add=args.add)
    except LabelFileError as error:
        raise _Refused(str(error), EXIT_BAD_INPUT) from None
    return spec, images


def _planned_masks(args: argparse.Namespace, spec: TaskSpec) -> dict[str, Any] | None:
    """The job's masks as its label file will record them, checked before anything loads."""
    if args.masks is None:
        if args.sam is not None:
            raise _Refused("--sam names the SAM 2 model for --masks sam2.", EXIT_BAD_INPUT)
        return None
    from ..labelling.masks import check_masks_task, planned_masks_job
    from ..masks.sam import resolve_sam_id, sam_dtype
    from ..model.devices import resolve_device

    check_masks_task(spec, args.classes)
    return planned_masks_job(
        resolve_sam_id(args.sam), sam_dtype("auto", resolve_device(args.device))
    )


def _load_sam(args: argparse.Namespace) -> Any:
    """Load SAM 2 for --masks, or refuse with exit code 3."""
    from ..masks.sam import load_sam
    from ..model.loading import ModelNotAvailableError

    try:
        return load_sam(args.sam, device=args.device)
    except ModelNotAvailableError as error:
        raise _Refused(str(error), EXIT_NO_MODEL) from None
