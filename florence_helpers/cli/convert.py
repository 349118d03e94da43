"""``python -m florence_helpers convert OLD NEW``: a remote-code checkpoint or adapter made
native.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .common import EXIT_BAD_INPUT, _Refused


def convert_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m florence_helpers convert",
        description="Convert a Florence-2 checkpoint in the original remote-code layout (or a "
        "LoRA adapter trained on one) to the native transformers format that load_model reads.",
    )
    parser.add_argument("old", help="the remote-code checkpoint or adapter folder")
    parser.add_argument("new", help="the folder to write (must not exist yet)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace NEW if it holds an earlier conversion (a checkpoint or adapter)",
    )
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from ..model.convert import convert
    from ..model.weight_files import CheckpointError

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        written = convert(args.old, args.new, overwrite=args.overwrite)
    except CheckpointError as error:
        raise _Refused(str(error), EXIT_BAD_INPUT) from None
    print(f"wrote {written}; load it with load_model({str(written)!r})", file=sys.stderr)
    return 0
