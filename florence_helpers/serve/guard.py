"""The guard in front of the app: who may ask (API key, Host names, origins) and what a
request may cost before any work (body size and time, load shed before the body is read).
Every refusal is the ``{"error": ...}`` body.
"""

import asyncio
import functools
import hmac
import ipaddress
from typing import Any

from .settings import _LOOPBACK_NAMES, ServeSettings


def _error(field: str, message: str, status: int, **headers: str) -> Any:
    from fastapi.responses import JSONResponse

    body = {"error": {"field": field, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers or None)


_BODY_BUDGET_BODIES = 8
"""Bodies still arriving may hold this many largest bodies' bytes together; past it, 503."""


class _Guard:
    """ASGI middleware deciding, before any work, who may ask and what a request may cost."""

    def __init__(self, app: Any, settings: ServeSettings, names: tuple[str, ...] | None) -> None:
        self.app, self.settings, self.names = app, settings, names
        self.in_flight = 0  # admitted: the body has arrived (or none is read)
        self.buffered = 0  # bytes of bodies still arriving, all together

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        admitted = scope["path"] == "/v1/run"
        if admitted and self.in_flight >= self.settings.max_queue:  # shed before reading
            await self._busy()(scope, receive, send)
            return
        # Only the run endpoint reads a body; every other path answers without reading one
        # (uvicorn stops reading a socket whose data nobody takes). A body still arriving
        # holds no place in the queue: slow clients cannot fill it (64 bodies at a byte a
        # second refused every request), only the bytes they sent count, in their own budget.
        if admitted and scope["method"] == "POST":
            body = await self._body(headers, receive)
            if not isinstance(body, bytes):
                await body(scope, receive, send)
                return
            receive = _replay(body, receive)
        if admitted and self.in_flight >= self.settings.max_queue:
            await self._busy()(scope, receive, send)
            return
        self.in_flight += int(admitted)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= int(admitted)

    def _busy(self) -> Any:
        busy = f"{self.in_flight} requests are in progress. Try again shortly."
        return _error("", f"The server is busy: {busy}", 503, **{"Retry-After": "1"})

    def _refusal(self, scope: Any, headers: Any) -> Any:
        host = _host_name(headers.get("host", ""))
        if self.names is not None and host not in self.names:
            return _error(
                "host", "This server does not answer to that host name (the Host header).", 400
            )
        origin = headers.get("origin")
        same = _same_origin(origin, headers.get("host", ""), scope.get("scheme", "http"))
        if origin and origin not in self.settings.cors_origins and not same:
            return _error("origin", "Requests from web pages of other origins are refused.", 403)
        key = self.settings.api_key
        if key is None or scope["path"] == "/healthz":
            return None
        if scope["method"] == "OPTIONS" and self.settings.cors_origins:
            return None  # a CORS preflight carries no key
        if not _key_matches(headers, key):
            return _error(
                "authorization",
                "A valid API key is needed: send 'Authorization: Bearer KEY' or 'X-API-Key'.",
                401,
                **{"WWW-Authenticate": "Bearer"},
            )
        return None

    async def _body(self, headers: Any, receive: Any) -> Any:
        """The whole body, or an error response: too large (chunked too), too slow (a pause
        longer than ``header_timeout_s``, or longer than ``request_timeout_s`` in all), or
        past the bytes all arriving bodies may hold together."""
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return _error("body", f"The request is larger than the {limit / 1e6:g} MB limit.", 413)
        chunks, size = [], 0

        async def read() -> Any:
            nonlocal size
            while True:
                message = await asyncio.wait_for(receive(), self.settings.header_timeout_s)
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                self.buffered += len(chunk)
                if size > limit:
                    return _error(
                        "body", f"The request is larger than the {limit / 1e6:g} MB limit.", 413
                    )
                if self.buffered > _BODY_BUDGET_BODIES * limit:
                    return _error(
                        "", "The server is busy receiving other requests. Try again shortly.",
                        503, **{"Retry-After": "1"},
                    )  # fmt: skip
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)

        try:
            body = await asyncio.wait_for(read(), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            return _error("body", "The request body did not arrive in time.", 408)
        finally:
            self.buffered -= size
        return body if body is not None else _error("body", "The client left.", 400)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replayed() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _same_origin(origin: str | None, host: str, scheme: str) -> bool:
    """Whether a page's origin is this server itself: the same scheme, host and port."""
    import urllib.parse

    if not origin:
        return False
    default = {"http": 80, "https": 443}
    try:
        page = urllib.parse.urlsplit(origin)
        served = urllib.parse.urlsplit(f"{scheme}://{host.strip()}")
        return (
            page.scheme.lower() == scheme
            and (page.hostname or "").lower() == (served.hostname or "").lower()
            and (page.port or default.get(scheme)) == (served.port or default.get(scheme))
        )
    except ValueError:
        return False


def _key_matches(headers: Any, key: str) -> bool:
    given = headers.get("x-api-key")
    authorization = headers.get("authorization", "")
    if given is None and authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def server_names(settings: ServeSettings, host: str) -> tuple[str, ...] | None:
    """The Host names the server answers to; None (any) only when listening on every
    address with no names given."""
    if settings.server_names:
        return tuple(_host_name(n) for n in settings.server_names)
    if host in ("0.0.0.0", "::", ""):
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return _LOOPBACK_NAMES
    except ValueError:
        pass
    return (*_LOOPBACK_NAMES, _host_name(host))


@functools.cache
def timed_protocol(header_timeout: float) -> type:
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a whole request's
    headers ``header_timeout`` seconds after it opened or after its last answer: a client that
    connects and sends nothing, or a byte a second, cannot hold a socket for ever (uvicorn
    itself has no such limit)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no request under way
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol
