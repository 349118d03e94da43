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
failed (a full disk, no permission, not enough memory to read one); 130 interrupted (Ctrl-C),
after saying what was finished; 143 terminated (SIGTERM), handled as Ctrl-C is.
Each failure prints one line starting with "error:", never a traceback. Everything that can be
checked without the model (the task, the image, the outputs, the device) is checked before it
loads.

Modules: ``common`` (exit codes, the one-line failures, options shared by the commands), ``run``
(one image), ``label`` (a folder), ``convert`` (a checkpoint), ``serving`` (``serve``, ``mcp``).

Layer 5 (the top): may import every other layer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from .common import (
    _BAD_INPUT,
    DEBUG_ENV_VAR,
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_TERMINATED,
    _fail,
    _interrupted,
    _one_line,
    _Refused,
)
from .convert import convert_main
from .label import label_main
from .run import run_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; every failure is one ``error:`` line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("label", "convert", "serve", "mcp") else None
    if command in ("serve", "mcp"):  # the servers drain on SIGTERM themselves
        return _main(argv, command)
    with _terminate_as_interrupt():
        return _main(argv, command)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: what was being written is finished or removed."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str], command: str | None) -> int:
    try:
        if command == "label":
            return label_main(argv[1:])
        if command == "convert":
            return convert_main(argv[1:])
        if command in ("serve", "mcp"):
            from .serving import serve_main

            return serve_main(argv[1:], mcp=command == "mcp")
        return run_main(argv)
    except _Refused as refused:
        return _fail(str(refused), refused.code)
    except _BAD_INPUT as error:
        return _fail(str(error), EXIT_BAD_INPUT)
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated) or isinstance(
            interrupt.__context__,
            Terminated,  # re-raised with what was written (label)
        )
        code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        return _fail(_interrupted(interrupt, command), code)
    except OSError as error:
        return _fail(_one_line(error), EXIT_IO)
    except MemoryError:
        return _fail(
            "ran out of memory: an input is larger than this machine can hold (what was "
            "finished is written).",
            EXIT_IO,
        )
    except Exception as error:  # noqa: BLE001 - the contract: one line, never a traceback
        if os.environ.get(DEBUG_ENV_VAR):
            traceback.print_exc()
        return _fail(
            f"unexpected {type(error).__name__}: {error}. This is a bug in florence-helpers: "
            f"please report it (set {DEBUG_ENV_VAR}=1 to see where it happened).",
            EXIT_BUG,
        )
