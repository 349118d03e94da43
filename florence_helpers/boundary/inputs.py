"""The one way in: the limits and checks every outside input passes before it is used.

Paths, URLs, uploaded bytes, settings and request fields all come from someone else. This
module decides, in one place, what may come in:

- :class:`InputLimits`: the largest download or upload (bytes), the largest image (pixels,
  read from the file's header before anything is decoded), one deadline for a whole download,
  which hosts a URL may reach (see :mod:`florence_helpers.boundary.fetching`) and which folders
  a local path may name.
- :func:`check_local_path`: a local path resolved (symbolic links followed) and, when
  :attr:`InputLimits.allowed_folders` is set, refused outside those folders.
- :func:`read_file`: a local data file's bytes (a dataset, a configuration), read only from a
  regular file of a bounded size: never a FIFO, a device such as ``/dev/zero`` or a sparse file
  of a terabyte.
- :func:`check_number` and :func:`check_text`: settings checked for type and range (NaN and
  infinity included) with a message that names the setting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import reprlib
import stat
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

DEFAULT_MAX_MB = 50.0
"""The largest download accepted by default, in megabytes."""


DEFAULT_MAX_PIXELS = 89_478_485
"""The largest image decoded by default, in pixels (Pillow's own warning limit, about 9459
pixels square). Florence-2 sees every image at 768x768, so a smaller copy loses nothing."""


DEFAULT_TIMEOUT_S = 60.0
"""How long a whole download may take by default, in seconds."""


MAX_REDIRECTS = 5


MAX_DATA_FILE_BYTES = 2**30
"""The largest data file read whole (a COCO or JSONL dataset, a label file): 1 GiB. COCO 2017's
largest annotation file is 448 MB; parsing a JSON file takes several times its size in memory."""


MAX_CONFIG_FILE_BYTES = 16 * 2**20
"""The largest configuration file read (``config.json``, ``adapter_config.json``, a weight
index): 16 MiB, a hundred times the largest that transformers or peft write."""


class InputError(ValueError):
    """An outside input refused by the limits: the message says which and why."""


class SettingError(ValueError):
    """A setting of the wrong type or outside its range; the message names the setting."""


class TooLargeError(InputError):
    """A download or upload past its size cap."""


class ForbiddenAddressError(InputError):
    """A URL whose host is an address the limits do not allow (loopback, private, ...)."""


def check_number(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    integer: bool = False,
    above: bool = False,
) -> float | int:
    """``value`` as a number of the right kind and range, or a :class:`SettingError`.

    Args:
        value: What was given. Booleans, strings, NaN and infinities are refused.
        name: The setting's name, for the message.
        minimum: The smallest value allowed (or, with ``above``, the value it must exceed).
        maximum: The largest value allowed.
        integer: Require a whole number (an ``int``, or a float such as ``3.0``).
        above: ``minimum`` itself is not allowed.

    Example:
        >>> check_number(3, "num_beams", minimum=1, maximum=8, integer=True)
        3
        >>> check_number(float("nan"), "timeout", minimum=0, above=True)
        Traceback (most recent call last):
        ...
        florence_helpers.boundary.inputs.SettingError: timeout must be a finite number, got nan.
    """
    kind = "a whole number" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        and not _is_numpy_number(value)
    ):
        raise SettingError(f"{name} must be {kind}, got {type(value).__name__} {shown(value)}.")
    try:
        finite = math.isfinite(float(value))
    except OverflowError:  # an int past float's range: out of any range we accept
        raise SettingError(f"{name} is out of range, got {shown(value)}.") from None
    if not finite:
        raise SettingError(f"{name} must be a finite number, got {value!r}.")
    if integer:
        if float(value) != int(value):
            raise SettingError(f"{name} must be a whole number, got {value!r}.")
        value = int(value)
    if minimum is not None and (value <= minimum if above else value < minimum):
        bound = f"more than {minimum:g}" if above else f"at least {minimum:g}"
        raise SettingError(f"{name} must be {bound}, got {shown(value)}.")
    if maximum is not None and value > maximum:
        raise SettingError(f"{name} must be at most {maximum:g}, got {shown(value)}.")
    return value


def shown(value: Any, width: int = 60, *, plain: bool = False) -> str:
    """``value`` for a message about an outside value: its repr, cut to ``width`` characters.

    A string is shown as itself with ``plain``. Values Python cannot write (an int of over
    4300 digits, a list nested too deep) are named by their type instead.
    """
    try:
        text = value if plain and isinstance(value, str) else reprlib.repr(value)
    except (ValueError, RecursionError):
        return f"(a {type(value).__name__} too large to write out)"
    return text if len(text) <= width else text[: width - 3] + "..."


def _is_numpy_number(value: Any) -> bool:
    kind = type(value)
    return kind.__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iuf"


def is_unicode(text: str) -> bool:
    """False for text holding lone surrogates (undecodable bytes, or a JSON ``"\\ud800"``),
    which cannot be written as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: Any, name: str, *, max_chars: int | None = None) -> str | None:
    """``value`` as a string (None and "" stay None), or a :class:`SettingError`.

    Numbers, lists and bytes are refused rather than turned into text: ``5`` is not the
    phrase "5", and ``b"cat"`` would be written as ``"b'cat'"``.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SettingError(f"{name} must be text, got {type(value).__name__} {shown(value)}.")
    if not is_unicode(value):
        raise SettingError(f"{name} is not valid Unicode text.")
    if max_chars is not None and len(value) > max_chars:
        raise SettingError(f"{name} is too long: {len(value):,} characters; at most {max_chars:,}.")
    return value


_HOST_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?\.?")


def allowed_host(entry: Any) -> tuple[str, int | None]:
    """An ``allowed_hosts`` entry as (host name or network, port or None for every port).

    Raises:
        SettingError: Not a host name, address or network, optionally with ``:port``.
    """
    text = entry.strip().lower() if isinstance(entry, str) else ""
    host, port = text, None
    bracketed = re.fullmatch(r"\[([^\]]+)\](?::(\d{1,5}))?", text)
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_network(host, strict=False)
        fits = True
    except ValueError:
        fits = bool(_HOST_NAME.fullmatch(host)) and ":" not in host
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536 or "/" in host):
        fits = False
    if not fits:
        raise SettingError(
            f"allowed_hosts holds {shown(entry)}: give a host name, an address or a network "
            "(images.local, 127.0.0.1, 10.0.0.0/8), optionally with :port (127.0.0.1:8001)."
        )
    return host, None if port is None else int(port)


@dataclasses.dataclass(frozen=True)
class InputLimits:
    """What an outside image may cost, and where it may come from.

    Attributes:
        max_mb: The largest download (or upload), in megabytes.
        max_pixels: The largest image decoded, in pixels (width times height), checked from
            the file's header before decoding. ``None`` leaves only Pillow's own guard.
        timeout: The longest a whole download may take, in seconds: name lookup,
            connecting, headers, every redirect and the body together.
        allowed_hosts: Host names (``"images.local"``) or addresses and networks
            (``"127.0.0.1"``, ``"10.0.0.0/8"``) a URL may reach although they are loopback,
            private, link-local or otherwise not public, on every port; with a port
            (``"127.0.0.1:8001"``, ``"[::1]:8001"``, ``"images.local:8080"``) on that port
            only. Empty by default: only public addresses are contacted.
        allowed_folders: Folders local paths must lie in (after following symbolic links);
            ``None`` (the default) allows any path, an empty tuple none at all.
        max_redirects: Redirects followed, at most.

    Example:
        >>> InputLimits(max_mb=10, allowed_hosts=("127.0.0.1",)).max_mb
        10
    """

    max_mb: float = DEFAULT_MAX_MB
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    timeout: float = DEFAULT_TIMEOUT_S
    allowed_hosts: tuple[str, ...] = ()
    allowed_folders: tuple[str | os.PathLike, ...] | None = None
    max_redirects: int = MAX_REDIRECTS

    def __post_init__(self) -> None:
        check_number(self.max_mb, "max_mb", minimum=0, above=True)
        if self.max_pixels is not None:
            check_number(self.max_pixels, "max_pixels", minimum=1, integer=True)
        check_number(self.timeout, "timeout", minimum=0, above=True)
        check_number(self.max_redirects, "max_redirects", minimum=0, maximum=20, integer=True)
        if isinstance(self.allowed_hosts, str):
            raise SettingError("allowed_hosts must be a list of host names or networks.")
        for host in self.allowed_hosts:
            allowed_host(host)
        folders = self.allowed_folders
        if folders is not None and (isinstance(folders, str | os.PathLike)):
            raise SettingError("allowed_folders must be a list of folders.")

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1e6)

    def with_overrides(self, **changes: Any) -> InputLimits:
        """A copy with the given fields changed (``None`` values are left as they are)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def is_url(source: str) -> bool:
    """Whether ``source`` is fetched (``http://`` or ``https://``), not a local path.

    The one definition every caller uses: ``pics://cat.png`` is the local file ``pics:/cat.png``
    (as the operating system reads it), and ``file://`` URLs name local files.
    """
    return source[:8].lower().startswith(("http://", "https://"))


def local_path(source: str) -> str:
    """The local path a source names: a ``file://`` URL's path, or the text itself."""
    if source[:7].lower() == "file://":
        try:
            return urllib.request.url2pathname(urllib.parse.urlparse(source).path)
        except ValueError:  # "file://[/x": not a URL (an unmatched bracket); a plain name then
            return source
    return source


def expand_path(path: str | bytes | os.PathLike) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded, as the shell would (bytes are
    decoded as the file system does).

    ``~name`` of a user this machine does not know stays as written (``Path.expanduser``
    raises RuntimeError there): it then names a file that is simply not found.
    """
    return Path(os.path.expanduser(os.fsdecode(os.fspath(path))))


def check_local_path(path: str | os.PathLike, limits: InputLimits | None = None) -> Path:
    """``path`` with ``~`` expanded; refused outside :attr:`InputLimits.allowed_folders`.

    The check follows symbolic links (a link inside an allowed folder pointing outside it is
    refused) and ``..``.

    Raises:
        InputError: The path lies outside every allowed folder.
    """
    if "\x00" in os.fspath(path):
        raise InputError("A file path cannot hold a NUL character.")
    expanded = expand_path(path)
    folders = (limits or InputLimits()).allowed_folders
    if folders is None:
        return expanded
    real = os.path.realpath(expanded)
    for folder in folders:
        root = os.path.realpath(expand_path(folder))
        try:
            if os.path.commonpath([real, root]) == root:
                return expanded
        except ValueError:  # another drive on Windows
            continue
    if not folders:
        raise InputError(
            f"Did not read {path}: this server reads no local files (start it with "
            "--allow-folder DIR to allow a folder)."
        )
    raise InputError(
        f"Did not read {path}: it is outside the folders this server may read "
        f"({', '.join(str(f) for f in folders)})."
    )


def read_file(
    path: str | os.PathLike,
    *,
    max_bytes: int | None = MAX_DATA_FILE_BYTES,
    follow_links: bool = True,
) -> bytes:
    """A local file's bytes, read from the descriptor that was checked.

    The file is opened without blocking and everything is decided on the open descriptor: it
    must be a regular file (a FIFO would block a reader forever, ``/dev/zero`` never ends) of
    at most ``max_bytes`` (a sparse file takes no disk space whatever size it claims).

    Args:
        path: The file.
        max_bytes: The largest size read; None for any size (the user's own files, such as
            a label file that grows with every job).
        follow_links: False refuses a symbolic link (its target may be any file of the user's).

    Raises:
        FileNotFoundError: There is no such file.
        InputError: It is not a regular file, is larger than ``max_bytes``, is a symbolic link
            where ``follow_links`` is false, or cannot be read; the message names it.

    Example:
        >>> try:
        ...     read_file("/dev/zero")
        ... except InputError as error:
        ...     print(error)
        Cannot read /dev/zero: it is not a regular file.
    """
    name = os.fsdecode(os.fspath(path))
    with open_regular(path, follow_links=follow_links) as handle:
        size = os.fstat(handle.fileno()).st_size
        limit = max_bytes if max_bytes is not None else math.inf
        if size > limit:
            raise InputError(_too_large(name, size, limit))
        try:
            data = handle.read(size)
            while more := handle.read(1 << 20):  # it grew since fstat: read on, to the limit
                data += more
                if len(data) > limit:
                    raise InputError(_too_large(name, len(data), limit))
        except OSError as error:
            raise InputError(f"Cannot read {name}: {error.strerror or error}.") from None
    return data


def open_regular(path: str | os.PathLike, *, follow_links: bool = True) -> BinaryIO:
    """A local file opened for reading, checked on the open descriptor to be a regular file:
    opened without blocking, so a FIFO is refused instead of waiting for a writer for ever.

    Raises:
        FileNotFoundError: There is no such file.
        InputError: It is not a regular file, is a symbolic link where ``follow_links`` is
            false, or cannot be opened; the message names it.
    """
    name = os.fsdecode(os.fspath(path))
    if "\x00" in name:
        raise InputError("A file path cannot hold a NUL character.")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(expand_path(name), flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"File not found: {name}") from None
    except OSError as error:
        if not follow_links and os.path.islink(expand_path(name)):
            raise InputError(f"Did not read {name}: it is a symbolic link.") from None
        raise InputError(f"Cannot read {name}: {error.strerror or error}.") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        if stat.S_ISDIR(mode):
            raise InputError(f"Cannot read {name}: it is a directory, not a file.")
        raise InputError(f"Cannot read {name}: it is not a regular file.")
    return os.fdopen(descriptor, "rb")


def read_head(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The first ``max_bytes`` of a local regular file of any size, checked as
    :func:`read_file` checks it (not a FIFO, a device or a directory).

    Raises:
        FileNotFoundError: There is no such file.
        InputError: It is not a regular file, or cannot be read.
    """
    with open_regular(path) as handle:
        try:
            return handle.read(max_bytes)
        except OSError as error:
            name = os.fsdecode(os.fspath(path))
            raise InputError(f"Cannot read {name}: {error.strerror or error}.") from None


def _too_large(name: str, size: int, limit: float) -> str:
    return (
        f"Did not read {name}: it holds {_bytes(size)}, more than the {_bytes(limit)} read at most."
    )


def _bytes(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
