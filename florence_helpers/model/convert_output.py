"""Writing a converted checkpoint: the new folder checked before anything is read, written
beside its target and moved into place whole; on a failure nothing is left behind and an old
folder being replaced is kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..boundary.inputs import expand_path
from ..boundary.outputs import (
    OutputError,
    check_folder_output,
    check_folder_replaceable,
    resolved,
)
from .weight_files import CheckpointError, _first_line


def write_model_folder(
    path: str | os.PathLike, write: Callable[[Path], None], *, inputs: Sequence[Path] = ()
) -> Path:
    """Write a model or adapter folder whole with ``write(folder)``, through the one way out.

    ``path`` is created, or replaced once the new folder is complete if it is empty or holds
    an earlier model or adapter; never a folder holding other files, the current or home
    folder, or one of ``inputs`` (the model's own folder).

    Raises:
        OutputError: ``path`` may not be written or replaced (the message says why).
        OSError: Writing failed; ``path`` is as it was and nothing is left behind.
    """
    target = expand_path(path)
    _check_output(target, inputs, overwrite=True, name="The folder")
    with _written_atomically(target, overwrite=True) as folder:
        write(folder)
    return target


def _check_output(
    target: Path, source: Path | Sequence[Path], overwrite: bool, name: str = "NEW"
) -> None:
    """Refuse an output folder before anything is read or written.

    Raises:
        OutputError: ``target`` is (or holds) ``source``, is not a folder, or cannot be one
            (a file stands where one of its parent folders would be).
        CheckpointError: ``target`` is a folder that is not empty, and not ``overwrite``.
        OutputError: ``target`` is the current or home folder (or holds one), or holds files
            that are not a Florence-2 checkpoint or adapter: even ``overwrite`` replaces only
            what ``convert`` writes.
        OSError: ``target`` exists but cannot be listed.
    """
    check_folder_output(target, [source] if isinstance(source, Path) else source, name)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutputError(
                f"{name} {target} exists and is not a folder: give the name of a folder to create "
                "(or of an empty one)."
            )
        try:
            occupied = any(target.iterdir())
        except OSError as error:
            raise _write_error(error, target, existed=True) from None
        if occupied and not overwrite:
            raise CheckpointError(
                f"{target} already exists and is not empty: choose a new folder, or replace "
                "it with --overwrite (overwrite=True)."
            )
        check_folder_replaceable(target, name)
        return
    parent = target.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(
            f"{name} {target} cannot be created: {parent} is a file, not a folder. Choose "
            "another place."
        )


@contextmanager
def _reading(source: Path) -> Iterator[None]:
    """Turn any failure while reading and converting ``source`` into a CheckpointError.

    Expected problems are named where they are found; this is the net under them, so that an
    unforeseen kind of damage still says which checkpoint it was, not a traceback.
    """
    try:
        yield
    except (CheckpointError, OutputError, MemoryError):
        raise
    except OSError as error:
        where = error.filename or source
        raise CheckpointError(f"Could not read {where}: {error.strerror or error}.") from None
    except Exception as error:
        raise CheckpointError(
            f"Could not convert {source}: {type(error).__name__}: {_first_line(error)}. One of "
            "its files is damaged or is not what a Florence-2 checkpoint holds."
        ) from error


@contextmanager
def _written_atomically(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``target`` that becomes ``target`` only if the block succeeds.

    On any failure the temporary folder is removed and ``target`` is as it was (an existing
    one is renamed aside, not deleted, until the new one is in place). A failure to write
    becomes an :class:`OSError` whose message is one sentence naming ``target``. A symbolic
    link stays a link (the folder it names is the one replaced) and a replaced folder keeps
    its permissions and, where allowed, its owner.
    """
    shown, target = target, Path(resolved(target))
    existed = target.is_dir()
    created = [p for p in target.parents if not p.exists()]  # parent folders made here
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp, whose 0o700 the finished folder would keep: the umask applies.
        folder = target.parent / f".{target.name}.{secrets.token_hex(6)}"
        folder.mkdir()
    except OSError as error:
        _remove_empty(created)
        raise _write_error(error, shown, existed) from None
    try:
        yield folder
        _usual_modes(folder)
        _replace_folder(folder, target)
    except BaseException as error:
        shutil.rmtree(folder, ignore_errors=True)
        _remove_empty(created)
        written = _as_os_error(error)
        if written is None:
            raise
        raise _write_error(written, shown, existed) from None


def _usual_modes(folder: Path) -> None:
    """Give every file the mode a new file gets (0666 less the umask, read from the folder
    made with it): transformers writes the weights through a 0600 temporary file."""
    mode = stat.S_IMODE(folder.stat().st_mode) & 0o666
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the parent folders a failed conversion created (innermost first), if empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _replace_folder(folder: Path, target: Path) -> None:
    """Move ``folder`` to ``target``; an existing ``target`` is deleted only once it is."""
    if not (target.exists() or target.is_symlink()):
        os.replace(folder, target)
        return
    info = target.stat()
    os.chmod(folder, stat.S_IMODE(info.st_mode))
    with contextlib.suppress(OSError):  # only root may give a folder away
        os.chown(folder, info.st_uid, info.st_gid)
    aside = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    os.replace(target, aside)
    try:
        os.replace(folder, target)
    except BaseException:
        os.replace(aside, target)
        raise
    if aside.is_symlink():
        aside.unlink()
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _as_os_error(error: BaseException) -> OSError | None:
    """The operating-system error behind a failed write, if it was one.

    safetensors reports its write errors as ``SafetensorError("... I/O error: No space left
    on device (os error 28)")``, not as OSError: its errno is recovered from the text.
    """
    if isinstance(error, OSError):
        return error
    if type(error).__name__ == "SafetensorError":
        code = re.search(r"os error (\d+)", str(error))
        if code is not None:
            number = int(code.group(1))
            return OSError(number, os.strerror(number))
    return None


def _write_error(error: OSError, target: Path, existed: bool) -> OSError:
    """One sentence for a failed write: the output, the reason, and that nothing changed."""
    reason = error.strerror or str(error) or os.strerror(error.errno or errno.EIO)
    kept = f"{target} is as it was" if existed else "nothing was left behind"
    return OSError(
        error.errno, f"Could not write {target}: {reason} (the conversion was not saved; {kept})."
    )
