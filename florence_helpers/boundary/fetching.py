"""Downloads under the address policy: http/https only, every hop checked, one deadline.

Every hop (the first address and each redirect) is resolved and checked before it is
contacted, and the connection goes to the very address that was checked, so a name that
resolves differently a moment later (DNS rebinding) changes nothing. By default no loopback,
private, link-local, shared or metadata address is contacted;
:attr:`~florence_helpers.boundary.inputs.InputLimits.allowed_hosts` lets chosen hosts or
networks through. One deadline covers name lookup, connecting, the headers, every redirect and
the body (a watchdog breaks a connection that drips past it). Error messages never repeat what
a remote server said.
"""

from __future__ import annotations

import http.client
import ipaddress
import queue
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

from .inputs import (
    ForbiddenAddressError,
    InputError,
    InputLimits,
    TooLargeError,
    allowed_host,
    is_unicode,
)

_READ_CHUNK = 1 << 16
_REDIRECTS = {301, 302, 303, 307, 308}


_USER_AGENT = "florence-helpers"


_EMBEDDING_IPV4 = (
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64, well-known prefix (RFC 6052)
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT, RFC 2765)
)
"""IPv6 networks whose last 32 bits are an IPv4 address the packet is delivered to: on a
NAT64 network, ``64:ff9b::a00:1`` reaches 10.0.0.1."""
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
"""NAT64 for local use (RFC 8215): where its IPv4 address sits depends on the network, so
none of it counts as public."""
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
"""The only IPv6 space assigned for public unicast (RFC 4291): an address outside it, such as
the deprecated IPv4-compatible ``::10.0.0.1`` or site-local ``fec0::1`` (which Python's
``is_global`` calls global), is never public."""


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is a public unicast one (not loopback, private, link-local, shared,
    reserved, multicast or unspecified), looking inside the IPv6 forms that carry an IPv4
    address: IPv4-mapped, 6to4, Teredo, NAT64 and IPv4-translated ones.

    Example:
        >>> import ipaddress
        >>> is_public_address(ipaddress.ip_address("169.254.169.254"))
        False
        >>> is_public_address(ipaddress.ip_address("::ffff:127.0.0.1"))
        False
        >>> is_public_address(ipaddress.ip_address("64:ff9b::a00:1"))  # 10.0.0.1 over NAT64
        False
        >>> is_public_address(ipaddress.ip_address("::127.0.0.1"))  # IPv4-compatible, deprecated
        False
        >>> is_public_address(ipaddress.ip_address("93.184.215.14"))
        True
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return False
        inner = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        if any(address in network for network in _EMBEDDING_IPV4):
            inner.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        inner = [a for a in inner if a is not None]
        if any(not is_public_address(a) for a in inner):
            return False
        if address.ipv4_mapped is not None or any(address in n for n in _EMBEDDING_IPV4):
            return True  # the IPv4 address inside is public
        if address not in _GLOBAL_UNICAST:
            return False
    return bool(address.is_global) and not address.is_multicast


def _allowed_by_list(host: str, address: Any, port: int, allowed: Iterable[str]) -> bool:
    for entry in allowed:
        name, only_port = allowed_host(entry)
        if only_port is not None and only_port != port:
            continue
        if name == host:
            return True
        try:
            if address in ipaddress.ip_network(name, strict=False):
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


def _ascii_host(hostname: str, url: str) -> str:
    """A host name as DNS and the Host header carry it: IDNA for names beyond ASCII."""
    try:
        return hostname.lower().encode("idna").decode("ascii")
    except UnicodeError:
        raise InputError(f"Not a valid host name in {_short(url)}.") from None


def check_url(url: str, limits: InputLimits | None = None) -> urllib.parse.SplitResult:
    """Parse ``url`` and refuse what is never fetched: another scheme, no host, credentials.

    Raises:
        InputError: Naming the problem.
    """
    if not isinstance(url, str):
        raise InputError(f"A URL must be text, got {type(url).__name__}.")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise InputError("The URL holds spaces or control characters: percent-encode them.")
    if not is_unicode(url):
        raise InputError("The URL is not valid Unicode text.")
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
        florence_helpers.boundary.inputs.ForbiddenAddressError: Did not fetch ...: its host ...
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
    host = _ascii_host(parts.hostname, url)  # type: ignore[arg-type]
    https = parts.scheme.lower() == "https"
    port = parts.port or (443 if https else 80)
    try:
        addresses = _resolve(host, port, deadline)
    except _HostNotFound:
        raise InputError(
            f"Could not download {_short(url)}: no such host {host.rstrip('.')!r}."
        ) from None
    checked = []
    for family, sockaddr in addresses:
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not is_public_address(address) and not _allowed_by_list(
            host, address, port, limits.allowed_hosts
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
    """Shuts down the connection it watches when the deadline passes (from a timer thread).

    It holds its own duplicate of the socket's descriptor: wrapping the socket for TLS moves
    the original descriptor into the TLS socket, and shutting down through the duplicate still
    ends a handshake or a read blocked on either. The duplicate is the watchdog's alone, so it
    can never shut down another connection that reused a closed descriptor's number.
    """

    def __init__(self, deadline: float) -> None:
        self.fired = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(deadline - time.monotonic(), 0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, raw: socket.socket) -> None:
        with self._lock:
            self._release()
            self._socket = raw.dup()
            if self.fired:
                _shutdown(self._socket)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._socket is not None:
                _shutdown(self._socket)

    def _release(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._release()


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
    # Written as ASCII: characters outside it (a path "/café.png") percent-encoded as UTF-8,
    # escapes already there kept.
    safe = "/%!$&'()*+,;=:@~-._"
    path = urllib.parse.quote(parts.path or "/", safe=safe)
    query = urllib.parse.quote(parts.query, safe=safe + "?")
    path = urllib.parse.urlunsplit(("", "", path, query, ""))
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
