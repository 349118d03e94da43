"""The one way in: the limits and checks every outside input passes before it is used.

Paths, URLs, uploaded bytes, settings and request fields all come from someone else. This
module decides, in one place, what may come in:

- :class:`InputLimits`: the largest download or upload (bytes), the largest image (pixels,
  read from the file's header before anything is decoded), one deadline for a whole download,
  which hosts a URL may reach and which folders a local path may name.
- :func:`fetch_url`: downloads over ``http``/``https`` only. Every hop (the first address and
  each redirect) is resolved and checked before it is contacted, and the connection goes to
  the very address that was checked. By default no loopback, private, link-local, shared or
  metadata address is contacted; :attr:`InputLimits.allowed_hosts` lets chosen hosts or
  networks through. One deadline covers name lookup, connecting, the headers, every redirect
  and the body. Error messages never repeat what a remote server said.
- :func:`check_local_path`: a local path resolved (symbolic links followed) and, when
  :attr:`InputLimits.allowed_folders` is set, refused outside those folders.
- :func:`check_number` and :func:`check_text`: settings checked for type and range (NaN and
  infinity included) with a message that names the setting.

It imports nothing from the rest of the package: every other module may use it.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import math
import os
import queue
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_MAX_MB = 50.0
"""The largest download accepted by default, in megabytes."""
DEFAULT_MAX_PIXELS = 89_478_485
"""The largest image decoded by default, in pixels (Pillow's own warning limit, about 9459
pixels square). Florence-2 sees every image at 768x768, so a smaller copy loses nothing."""
DEFAULT_TIMEOUT_S = 60.0
"""How long a whole download may take by default, in seconds."""
MAX_REDIRECTS = 5
_READ_CHUNK = 1 << 16
_REDIRECTS = {301, 302, 303, 307, 308}
_USER_AGENT = "florence-helpers"


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
        florence_helpers.inputs.SettingError: timeout must be a finite number, got nan.
    """
    kind = "a whole number" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        and not _is_numpy_number(value)
    ):
        raise SettingError(f"{name} must be {kind}, got {type(value).__name__} {value!r}.")
    if not math.isfinite(float(value)):
        raise SettingError(f"{name} must be a finite number, got {value!r}.")
    if integer:
        if float(value) != int(value):
            raise SettingError(f"{name} must be a whole number, got {value!r}.")
        value = int(value)
    if minimum is not None and (value <= minimum if above else value < minimum):
        bound = f"more than {minimum:g}" if above else f"at least {minimum:g}"
        raise SettingError(f"{name} must be {bound}, got {value!r}.")
    if maximum is not None and value > maximum:
        raise SettingError(f"{name} must be at most {maximum:g}, got {value!r}.")
    return value


def _is_numpy_number(value: Any) -> bool:
    kind = type(value)
    return kind.__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iuf"


def check_text(value: Any, name: str, *, max_chars: int | None = None) -> str | None:
    """``value`` as a string (None and "" stay None), or a :class:`SettingError`.

    Numbers, lists and bytes are refused rather than turned into text: ``5`` is not the
    phrase "5", and ``b"cat"`` would be written as ``"b'cat'"``.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SettingError(f"{name} must be text, got {type(value).__name__} {value!r:.60}.")
    if max_chars is not None and len(value) > max_chars:
        raise SettingError(f"{name} is {len(value):,} characters long; at most {max_chars:,}.")
    return value


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
            private, link-local or otherwise not public. Empty by default: only public
            addresses are contacted.
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
            if not isinstance(host, str) or not host.strip():
                raise SettingError(f"allowed_hosts holds {host!r}: give host names or networks.")
        folders = self.allowed_folders
        if folders is not None and (isinstance(folders, str | os.PathLike)):
            raise SettingError("allowed_folders must be a list of folders.")

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1e6)

    def with_overrides(self, **changes: Any) -> InputLimits:
        """A copy with the given fields changed (``None`` values are left as they are)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# --- addresses ------------------------------------------------------------------------------


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is a public unicast one (not loopback, private, link-local, shared,
    reserved, multicast or unspecified), looking inside IPv4-mapped, 6to4 and Teredo ones.

    Example:
        >>> import ipaddress
        >>> is_public_address(ipaddress.ip_address("169.254.169.254"))
        False
        >>> is_public_address(ipaddress.ip_address("::ffff:127.0.0.1"))
        False
        >>> is_public_address(ipaddress.ip_address("93.184.215.14"))
        True
    """
    if isinstance(address, ipaddress.IPv6Address):
        inner = [address.ipv4_mapped, address.sixtofour]
        inner += list(address.teredo or ())
        if any(a is not None and not is_public_address(a) for a in inner):
            return False
        if address.ipv4_mapped is not None:
            return is_public_address(address.ipv4_mapped)
    return bool(address.is_global) and not address.is_multicast


def _allowed_by_list(host: str, address: Any, allowed: Iterable[str]) -> bool:
    for entry in allowed:
        entry = entry.strip().lower().strip("[]")
        if entry == host:
            return True
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def _resolve(host: str, port: int, deadline: float) -> list[tuple[Any, tuple[Any, ...]]]:
    """The host's addresses (family, sockaddr), looked up within the deadline."""
    try:  # an address literal needs no lookup
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        return [(family, (str(literal), port))]
    answers: queue.Queue = queue.Queue(maxsize=1)

    def lookup() -> None:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            answers.put([(family, sockaddr) for family, _, _, _, sockaddr in found])
        except (OSError, UnicodeError) as error:
            answers.put(error)

    # getaddrinfo has no timeout of its own: a daemon thread keeps the deadline.
    threading.Thread(target=lookup, name="florence-dns", daemon=True).start()
    try:
        found = answers.get(timeout=max(deadline - time.monotonic(), 0.001))
    except queue.Empty:
        raise TimeoutError from None
    if isinstance(found, Exception):
        raise _HostNotFound from None
    return found


class _HostNotFound(Exception):
    pass


def check_url(url: str, limits: InputLimits | None = None) -> urllib.parse.SplitResult:
    """Parse ``url`` and refuse what is never fetched: another scheme, no host, credentials.

    Raises:
        InputError: Naming the problem.
    """
    if not isinstance(url, str):
        raise InputError(f"A URL must be text, got {type(url).__name__}.")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise InputError("The URL holds spaces or control characters: percent-encode them.")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise InputError(f"Not a valid URL: {_short(url)}.") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InputError(f"Only http:// and https:// URLs are fetched, not {_short(url)}.")
    if not parts.hostname:
        raise InputError(f"The URL {_short(url)} names no host.")
    if parts.username is not None or parts.password is not None:
        raise InputError("URLs with a user name or password are not fetched.")
    del port  # parsed only to refuse a bad port
    return parts


def fetch_url(url: str, limits: InputLimits | None = None) -> bytes:
    """Download ``url`` under ``limits``: checked addresses, one deadline, a size cap.

    Raises:
        ForbiddenAddressError: The URL (or a redirect) leads to an address not allowed.
        InputError: Anything else that stops the download; the message says what, in this
            package's words only.

    Example:
        >>> fetch_url("http://127.0.0.1:8000/cat.jpg")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        florence_helpers.inputs.ForbiddenAddressError: Did not fetch ...: its host 127.0.0.1 is ...
    """
    limits = limits or InputLimits()
    deadline = time.monotonic() + limits.timeout
    current = url
    for _hop in range(limits.max_redirects + 1):
        parts = check_url(current, limits)
        try:
            status, location, body = _get(parts, current, limits, deadline)
        except TimeoutError:
            raise InputError(
                f"Could not download {_short(url)}: it took more than {limits.timeout:g} s "
                "(give a longer timeout to wait longer)."
            ) from None
        if status in _REDIRECTS:
            if not location:
                raise InputError(f"Could not download {_short(url)}: a redirect without a target.")
            current = urllib.parse.urljoin(current, location)
            continue
        if status != 200:
            raise InputError(
                f"Could not download {_short(url)}: the server answered HTTP {status}, not an "
                "image."
            )
        return body
    raise InputError(
        f"Could not download {_short(url)}: more than {limits.max_redirects} redirects."
    )


def _get(
    parts: urllib.parse.SplitResult, url: str, limits: InputLimits, deadline: float
) -> tuple[int, str | None, bytes]:
    """One GET: (status, redirect target, body of a 200)."""
    host = parts.hostname.lower()  # type: ignore[union-attr]
    https = parts.scheme.lower() == "https"
    port = parts.port or (443 if https else 80)
    try:
        addresses = _resolve(host, port, deadline)
    except _HostNotFound:
        raise InputError(f"Could not download {_short(url)}: no such host {host}.") from None
    checked = []
    for family, sockaddr in addresses:
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not is_public_address(address) and not _allowed_by_list(
            host, address, limits.allowed_hosts
        ):
            raise ForbiddenAddressError(
                f"Did not fetch {_short(url)}: its host {host} is a loopback, private or "
                "otherwise non-public address. To allow it: load_image(url, "
                f"limits=InputLimits(allowed_hosts=({host!r},))), or --allow-host {host} on "
                "the command line."
            )
        checked.append((family, sockaddr))
    # A watchdog breaks the connection at the deadline: a server dripping its handshake,
    # headers or body one byte at a time cannot hold a download past it.
    guard = _Watchdog(deadline)
    try:
        connection = _connect(checked, host, port, https, deadline, url, guard)
        try:
            return _exchange(connection, parts, url, limits, guard)
        finally:
            connection.close()
    except (http.client.HTTPException, OSError) as error:
        if guard.fired or time.monotonic() >= deadline:
            raise TimeoutError from None
        if isinstance(error, TimeoutError | socket.timeout):
            raise TimeoutError from None
        raise InputError(
            f"Could not download {_short(url)}: the connection broke before the whole answer "
            "arrived."
        ) from None
    finally:
        guard.cancel()


class _Watchdog:
    """Shuts down the socket it watches when the deadline passes (from a timer thread)."""

    def __init__(self, deadline: float) -> None:
        self.fired = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(deadline - time.monotonic(), 0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, raw: socket.socket) -> None:
        with self._lock:
            self._socket = raw
            if self.fired:
                _shutdown(raw)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._socket is not None:
                _shutdown(self._socket)

    def cancel(self) -> None:
        self._timer.cancel()


def _shutdown(raw: socket.socket) -> None:
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _exchange(
    connection: _PinnedConnection,
    parts: urllib.parse.SplitResult,
    url: str,
    limits: InputLimits,
    guard: _Watchdog,
) -> tuple[int, str | None, bytes]:
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    connection.http.request(
        "GET", path, headers={"User-Agent": _USER_AGENT, "Accept": "image/*", "Connection": "close"}
    )
    response = connection.http.getresponse()
    if response.status in _REDIRECTS:
        return response.status, response.getheader("Location"), b""
    if response.status != 200:
        return response.status, None, b""
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes:
        raise TooLargeError(_too_big(url, int(declared), limits.max_mb))
    data = bytearray()
    while True:
        chunk = response.read1(_READ_CHUNK)
        if guard.fired:  # the watchdog broke the connection: what came is not all
            raise TimeoutError
        if not chunk:
            break
        data += chunk
        if len(data) > limits.max_bytes:
            raise TooLargeError(_too_big(url, len(data), limits.max_mb, at_least=True))
    if declared and declared.isdigit() and len(data) < int(declared):
        raise InputError(
            f"Could not download {_short(url)}: the connection closed after {len(data):,} of "
            f"{int(declared):,} bytes."
        )
    return 200, None, bytes(data)


class _PinnedConnection:
    """An HTTP(S) connection to one checked address, named by its host for Host and TLS."""

    def __init__(self, raw: socket.socket, host: str, port: int, https: bool) -> None:
        self.raw = raw
        kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
        self.http = kind(host, port)
        sock: socket.socket = raw
        if https:
            context = ssl.create_default_context()
            sock = context.wrap_socket(raw, server_hostname=host)
        self.http.sock = sock  # connected already: http.client will not connect again

    def close(self) -> None:
        self.http.close()
        self.raw.close()


def _connect(
    addresses: Sequence[tuple[Any, tuple[Any, ...]]],
    host: str,
    port: int,
    https: bool,
    deadline: float,
    url: str,
    guard: _Watchdog,
) -> _PinnedConnection:
    for family, sockaddr in addresses:
        left = deadline - time.monotonic()
        if left <= 0 or guard.fired:
            raise TimeoutError
        raw = socket.socket(family, socket.SOCK_STREAM)
        guard.watch(raw)
        raw.settimeout(min(left, 10.0))
        try:
            raw.connect(sockaddr)
            raw.settimeout(max(min(deadline - time.monotonic(), 10.0), 0.001))
            return _PinnedConnection(raw, host, port, https)
        except ssl.SSLError:
            raw.close()
            if guard.fired:
                raise TimeoutError from None
            raise InputError(
                f"Could not download {_short(url)}: the secure connection (TLS) failed; the "
                "server's certificate may not be valid for its name."
            ) from None
        except TimeoutError:
            raw.close()
            continue
        except OSError:
            raw.close()
            continue
    if time.monotonic() >= deadline:
        raise TimeoutError
    raise InputError(f"Could not download {_short(url)}: could not connect to {host}.")


def _too_big(url: str, size: int, max_mb: float, at_least: bool = False) -> str:
    return (
        f"Did not download {_short(url)}: it is {'more than ' if at_least else ''}"
        f"{size / 1e6:,.1f} MB, above the {max_mb:g} MB limit (give a larger max_mb to allow "
        "more)."
    )


def _short(url: str, limit: int = 200) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


# --- local paths ----------------------------------------------------------------------------


def check_local_path(path: str | os.PathLike, limits: InputLimits | None = None) -> Path:
    """``path`` with ``~`` expanded; refused outside :attr:`InputLimits.allowed_folders`.

    The check follows symbolic links (a link inside an allowed folder pointing outside it is
    refused) and ``..``.

    Raises:
        InputError: The path lies outside every allowed folder.
    """
    expanded = Path(os.fspath(path)).expanduser()
    folders = (limits or InputLimits()).allowed_folders
    if folders is None:
        return expanded
    real = os.path.realpath(expanded)
    for folder in folders:
        root = os.path.realpath(Path(os.fspath(folder)).expanduser())
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
