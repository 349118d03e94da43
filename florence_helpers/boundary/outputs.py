"""The one way out: every file the package writes goes through here.

- :func:`check_outputs`: before any work starts (before the model loads), refuse an output
  that resolves to one of the command's inputs, or to another of its outputs. Paths are
  compared after following symbolic links, and by device and inode where both exist, so
  ``cat.jpg``, ``./cat.jpg``, a link to it and a hard link are one file.
- :func:`write_atomically`: a whole file is written to a temporary file beside it and renamed
  over it only once complete: a crash or a full disk leaves the old file as it was. An
  existing file keeps its permissions and (where allowed) its owner; a symbolic link stays a
  link, and the file it points to is the one replaced; a file with other hard links is refused
  (renaming over it would leave them the old bytes).
- :func:`check_replaceable`: an existing file is replaced whole only if it holds what the
  command writes (a COCO export never replaces a label file).
- :class:`Appender`: whole lines appended in place (label files); a write that fails part-way
  (a full disk, Ctrl-C) is cut back, so the file never ends in a torn line.

It imports nothing from the rest of the package.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .inputs import MAX_CONFIG_FILE_BYTES, MAX_DATA_FILE_BYTES, expand_path, read_file

PathLike = str | os.PathLike


class OutputError(ValueError):
    """An output refused before anything is written: it would overwrite an input, or
    another output of the same command, or it cannot be a file."""


def resolved(path: PathLike) -> str:
    """``path`` as an absolute path with ``~`` expanded and symbolic links followed."""
    return os.path.realpath(expand_path(path))


def same_file(first: PathLike, second: PathLike) -> bool:
    """Whether two paths name one file: the same resolved path, or (both existing) the same
    device and inode, as a hard link does."""
    if resolved(first) == resolved(second):
        return True
    try:
        return os.path.samefile(expand_path(first), expand_path(second))
    except OSError:
        return False


def check_outputs(
    outputs: Mapping[str, PathLike | None],
    inputs: Iterable[PathLike] = (),
    *,
    folders: Iterable[PathLike] = (),
    holds: Mapping[str, str] | None = None,
) -> None:
    """Refuse outputs that would overwrite an input or each other, before anything runs.

    Args:
        outputs: Each output's name (as the user knows it: ``"--out"``) and its path; None
            for an output not asked for.
        inputs: The files (or folders) the command reads.
        folders: Folders the command reads as a whole (a model's): nothing is written
            inside them.
        holds: For the outputs written whole, what an existing file there must already hold
            to be replaced (see :func:`check_replaceable`).

    Raises:
        OutputError: Naming the output and the input (or other output) it resolves to.

    Example:
        >>> check_outputs({"--out": "cat.jpg"}, inputs=["./cat.jpg"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        florence_helpers.boundary.outputs.OutputError: --out cat.jpg is the input ./cat.jpg: ...
    """
    given = [(name, path) for name, path in outputs.items() if path is not None]
    sources: dict[Any, PathLike] = {}
    for source in inputs:
        sources[resolved(source)] = source
        identity = _identity(source)
        if identity is not None:
            sources[identity] = source
    for index, (name, path) in enumerate(given):
        hit = sources.get(resolved(path))
        identity = _identity(path)
        if hit is None and identity is not None:
            hit = sources.get(identity)
        if hit is not None:
            raise OutputError(
                f"{name} {os.fspath(path)} is the input {os.fspath(hit)}: writing it would "
                "overwrite the input. Choose another file name."
            )
        for other_name, other in given[:index]:
            if same_file(path, other):
                raise OutputError(
                    f"{name} and {other_name} are the same file ({os.fspath(path)}): one would "
                    "overwrite the other. Give each its own file name."
                )
        if expand_path(path).is_dir():
            raise OutputError(f"{name} {os.fspath(path)} is a folder: give a file name.")
        for folder in folders:
            inside = resolved(folder)
            if os.path.commonpath([resolved(path), inside]) == inside:
                raise OutputError(
                    f"{name} {os.fspath(path)} is inside {os.fspath(folder)}, which the command "
                    "reads: writing there could break it. Choose another folder."
                )
        _check_writable(name, path)
        if holds is not None and name in holds:
            check_replaceable(path, holds[name], name)


HOLDS = {
    "image": "an image",
    "COCO JSON": "a COCO JSON file",
}
"""What :func:`check_replaceable` can check an existing file holds."""


def check_replaceable(path: PathLike, holds: str | None = None, name: str | None = None) -> None:
    """Refuse to replace an existing file whole where that would lose something.

    Args:
        path: The file to be replaced (nothing to check where it does not exist).
        holds: What the file must already hold to be replaced, a key of :data:`HOLDS`
            (``"image"``, ``"COCO JSON"``): a COCO export never replaces a label file or a
            model's config. None: anything.
        name: How the user knows the output, for the message.

    Raises:
        OutputError: The file has other hard links (they would keep the old bytes), or does
            not hold what ``holds`` says.
    """
    label = f"{name} {os.fspath(path)}" if name else os.fspath(path)
    target = Path(resolved(path))
    try:
        info = target.stat()
    except OSError:
        return
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        raise OutputError(
            f"{label} has {info.st_nlink - 1} other hard link(s): replacing it would leave them "
            "with the old content. Write to another file name."
        )
    if holds is not None and stat.S_ISREG(info.st_mode) and not _holds(target, holds):
        raise OutputError(
            f"{label} exists and is not {HOLDS[holds]}: replacing it would lose it. Move it "
            "away or choose another file name."
        )


def _holds(path: Path, kind: str) -> bool:
    """Whether an existing file holds ``kind`` (a key of :data:`HOLDS`); empty files do."""
    if path.stat().st_size == 0:
        return True
    if kind == "image":  # opened as the images read are: their formats, structure checked
        from .images import open_header

        try:
            with open_header(path, str(path)):
                return True
        except Exception:  # noqa: BLE001 - whatever cannot be opened is not an image
            return False
    if kind == "COCO JSON":
        import json

        try:  # a file past the readers' cap is no COCO file this package wrote or reads
            document = json.loads(read_file(path, max_bytes=MAX_DATA_FILE_BYTES))
        except (OSError, ValueError, RecursionError):  # InputError is a ValueError
            return False
        return isinstance(document, dict) and {"images", "annotations"} <= document.keys()
    raise ValueError(f"Unknown kind {kind!r}: one of {', '.join(HOLDS)}")


def _check_writable(name: str, path: PathLike) -> None:
    """Refuse, before any work, an output whose folder cannot be made or written: a path under
    a file, a read-only file system, a folder without write permission."""
    target = expand_path(path)
    folder = target.parent
    while not folder.exists():
        if folder == folder.parent:
            break
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{name} {os.fspath(path)}: {folder} is a file, not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(
            f"{name} {os.fspath(path)}: the folder {folder} cannot be written (read-only or "
            "no permission)."
        )
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"{name} {os.fspath(path)} cannot be written (read-only).")


def _identity(path: PathLike) -> tuple[int, int] | None:
    """The device and inode of an existing file (hard links share them), else None."""
    try:
        info = os.stat(expand_path(path))
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def check_folder_output(target: PathLike, inputs: Iterable[PathLike], name: str = "NEW") -> None:
    """Refuse an output folder that is an input, or holds one (replacing it would delete it).

    Raises:
        OutputError: Naming the input in the way.
    """
    folder = resolved(target)
    for source in inputs:
        real = resolved(source)
        if real == folder or os.path.commonpath([real, folder]) == folder:
            raise OutputError(
                f"{name} {os.fspath(target)} is or holds the input {os.fspath(source)}: "
                "writing it would destroy the input. Choose another folder."
            )


def check_folder_replaceable(target: PathLike, name: str = "NEW") -> None:
    """Refuse to replace a folder whole unless losing it loses nothing the user made.

    A folder is replaced only if it is empty or holds a Florence-2 checkpoint or adapter (a
    ``config.json`` of ``model_type`` ``"florence2"``, or an ``adapter_config.json``); never
    the current folder, the home folder, or a folder holding either.

    Raises:
        OutputError: Naming what replacing the folder would lose.
    """
    folder = resolved(target)
    for kept, what in ((os.getcwd(), "the current folder"), ("~", "your home folder")):
        real = resolved(kept)
        if os.path.commonpath([real, folder]) == folder:
            raise OutputError(
                f"{name} {os.fspath(target)} is or holds {what}: it would be replaced whole. "
                "Give the name of a new folder."
            )
    path = Path(folder)
    if not path.is_dir() or not any(path.iterdir()) or _holds_model(path):
        return
    raise OutputError(
        f"{name} {os.fspath(target)} holds files that are not a Florence-2 checkpoint or "
        "adapter: replacing it would delete them. Move them away or choose another folder."
    )


def _holds_model(folder: Path) -> bool:
    """Whether ``folder`` holds a Florence-2 checkpoint (either layout) or a LoRA adapter."""
    import json

    if (folder / "adapter_config.json").is_file():
        return True
    try:  # a regular file of a configuration's size: never /dev/zero, a FIFO, a sparse giant
        config = json.loads(read_file(folder / "config.json", max_bytes=MAX_CONFIG_FILE_BYTES))
    except (OSError, ValueError, RecursionError):  # InputError is a ValueError
        return False
    return isinstance(config, dict) and config.get("model_type") == "florence2"


def write_atomically(
    path: PathLike, content: bytes | Callable[[IO[bytes]], Any], *, follow_links: bool = True
) -> Path:
    """Write a whole file so that it is either entirely the new one or still the old one.

    Args:
        path: The file to write. A symbolic link stays a link: the file it points to is
            replaced. An existing file keeps its permission bits and, where the process may
            set it, its owner and group; a new file gets the usual permissions (0666 less the
            umask).
        content: The bytes, or a function that writes them to an open binary file.
        follow_links: False replaces a symbolic link at ``path`` itself with the new file,
            never touching what it points to: for files of a folder this package writes
            whole, where a link planted inside must not lead a write outside.

    Returns:
        The path written (the link's target for a link).

    Raises:
        OSError: Writing failed (no space, no permission); the old file is untouched and no
            temporary file is left behind.
    """
    if follow_links:
        target = Path(resolved(path))
    else:  # the folders on the way are followed, the file's own name is not
        target = Path(resolved(expand_path(path).parent)) / expand_path(path).name
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        before: os.stat_result | None = target.stat() if follow_links else target.lstat()
    except FileNotFoundError:
        before = None
    if before is not None and stat.S_ISLNK(before.st_mode):
        before = None  # the link itself is replaced
    elif before is not None and not stat.S_ISREG(before.st_mode):
        raise OutputError(f"{os.fspath(path)} is not a regular file: give a file name.")
    else:
        check_replaceable(target)
    temporary = folder / f".{target.name}.{secrets.token_hex(4)}.tmp"
    # O_EXCL: never write through a file someone else placed there; 0o666: the umask applies.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if isinstance(content, bytes | bytearray | memoryview):
                handle.write(content)
            else:
                content(handle)
            handle.flush()
            os.fsync(handle.fileno())
            if before is not None:
                os.fchmod(handle.fileno(), stat.S_IMODE(before.st_mode))
                with contextlib.suppress(OSError):  # only root may give a file away
                    os.fchown(handle.fileno(), before.st_uid, before.st_gid)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_folder(folder)
    return target


def _sync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); where folders cannot be opened, nothing to do."""
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class Appender:
    """Appends whole chunks to a file in place; a failed or interrupted write is cut back.

    The file is opened unbuffered, so what :meth:`write` returned from is on disk (it is
    fsynced) and what it did not finish is removed: after a full disk or Ctrl-C the file ends
    where the last successful write ended. The file keeps its mode, owner and links, since
    it is never replaced.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "labels.jsonl"
        >>> with Appender.open(path) as out:
        ...     out.write(b'{"a": 1}\\n')
        >>> path.read_text()
        '{"a": 1}\\n'
    """

    def __init__(self, handle: IO[bytes], path: Path) -> None:
        self.handle, self.path = handle, path
        self.chunks = 0

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: PathLike, *, keep: int | None = None) -> Any:
        """Open ``path`` for appending (creating it); ``keep`` cuts it to that many bytes
        first (the torn last line of an interrupted run)."""
        target = expand_path(path)
        handle = open(target, "r+b" if target.exists() else "w+b", buffering=0)  # noqa: SIM115
        try:
            if keep is not None and keep != os.fstat(handle.fileno()).st_size:
                os.ftruncate(handle.fileno(), keep)
            yield cls(handle, target)
        finally:
            handle.close()

    def write(self, data: bytes) -> None:
        """Append ``data`` whole and flush it to disk, or leave the file as it was."""
        descriptor = self.handle.fileno()
        position = os.lseek(descriptor, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                written = os.write(descriptor, view)
                view = view[written:]
            os.fsync(descriptor)
        except BaseException as error:
            with contextlib.suppress(OSError):
                os.ftruncate(descriptor, position)
            if isinstance(error, OSError):
                # What was written before is intact: the message says what failed, and where.
                raise OSError(error.errno, error.strerror or str(error), str(self.path)) from error
            raise
        self.chunks += 1


def lock_path(out: PathLike) -> Path:
    """The lock beside the file ``out`` really is (symbolic links followed), named so that it
    can be no one else's file: ``.<name>.florence-lock``."""
    target = Path(resolved(out))
    return target.with_name(f".{target.name}.florence-lock")


class InUseError(OutputError):
    """Another process holds the file's one-writer lock (:func:`one_writer`)."""

    def __init__(self, out: PathLike, lock: PathLike) -> None:
        super().__init__(f"{os.fspath(out)} is being written by another process.")
        self.lock = Path(lock)


@contextlib.contextmanager
def one_writer(path: PathLike) -> Iterator[None]:
    """Hold the file's lock exclusively while the block runs; refuse at once if it is held.

    Every name of one file takes one lock: a symbolic link by the file it points to, a hard
    link by the file's own lock (held on the file itself too). The lock file's name is this
    package's own, so it is removed after, also when an interrupted run left it. The file's
    folder must exist.

    Raises:
        InUseError: Another process holds the lock; ``error.lock`` is the lock file.
    """
    out = expand_path(path)
    lock = lock_path(out)
    while True:
        handle = open(lock, "a+b")  # noqa: SIM115 - closed below
        try:
            _lock(handle)
        except OSError:
            handle.close()
            raise InUseError(out, lock) from None
        try:  # the lock file may have been removed by its last holder while we opened it
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    data = None
    try:
        if out.exists():  # a hard link elsewhere takes another lock file: lock the data too
            data = open(out, "rb")  # noqa: SIM115 - closed below
            try:
                _lock(data)
            except OSError:
                raise InUseError(out, out) from None
        yield
    finally:
        if data is not None:
            data.close()
        with contextlib.suppress(OSError):
            lock.unlink()
        handle.close()


def _lock(handle: Any) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
