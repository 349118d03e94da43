"""Serve Florence-2 over HTTP, batching the requests that arrive together, behind one guard.

``python -m florence_helpers serve`` (or :func:`create_app` in your own ASGI server) starts a
FastAPI app on uvicorn with one loaded model:

- ``POST /v1/run``: an image (a multipart upload named ``image``; or, in a JSON body, ``image``
  as base64 or a ``data:`` URL, or a ``url``) and a ``task`` (with ``text`` or ``region``
  where the task takes them, or a ``prompt`` of your own with ``parse``), ``num_beams``,
  ``max_new_tokens``, ``scores``; answers with the result's JSON (:meth:`Result.to_dict`).
- ``GET /v1/tasks``: the tasks, what each takes and gives back.
- ``GET /healthz``: ``ok`` and how many requests are waiting (and, to a client with the key,
  the model's name, device and dtype; never a file path).

Requests for the same task and settings that arrive within ``max_wait_ms`` of each other run in
one ``generate`` call (:mod:`florence_helpers.batching`). What a request may cost and reach is
decided before the work it asks for (:class:`ServeSettings`):

- **Who may ask**: an optional API key (``Authorization: Bearer KEY`` or ``X-API-Key``,
  compared in constant time); only the Host names the server is known by (a DNS-rebinding
  page cannot reach it); no cross-origin browser requests unless their origin is allowed
  (CORS is off by default); /docs and /openapi.json off unless asked.
- **What it may cost**: every body has a size cap, chunked ones too, and a deadline; an
  image's pixels are read from its header and checked (alone, and against all images in
  flight) before it is decoded; text length, beams and tokens have upper bounds; when
  ``max_queue`` requests are in flight a new one is answered 503 before its body is read;
  a request whose client left is dropped; each request has a deadline; shutdown has one too.
- **What it may fetch**: a ``url`` is fetched under :mod:`florence_helpers.inputs`' policy
  (http/https only; public addresses only on every hop unless allowed; one deadline), on its
  own threads, so slow URLs never hold up uploads; errors never repeat what the remote said.

Every refusal is ``{"error": {"field": ..., "message": ...}}`` with a 4xx or 5xx status, also
404 and 405. The app needs the ``serve`` extra: ``pip install "florence-helpers[serve]"``.
TLS is not its job: put it behind a reverse proxy to expose it beyond one machine.
"""

# No "from __future__ import annotations" here: FastAPI reads the endpoints' annotations.
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from .batching import Batcher, Job, QueueFull, ShuttingDown
from .images import (
    ImageLoadError,
    ImageTooLargeError,
    image_size,
    load_image,
    too_large_message,
)
from .inputs import (
    ForbiddenAddressError,
    InputError,
    InputLimits,
    TooLargeError,
    check_number,
    fetch_url,
)
from .model import FlorenceModel
from .prompts import TaskInputError
from .regions import RegionError
from .serve_requests import RequestError, check_request, read_fields
from .tasks import TASKS

__all__ = [  # Batcher, Job, RequestError and check_request were first defined here
    "API_KEY_ENV_VAR",
    "Batcher",
    "Job",
    "QueueFull",
    "RequestError",
    "ServeSettings",
    "Server",
    "ShuttingDown",
    "check_request",
    "create_app",
    "mcp_server",
    "running_server",
    "serve",
    "start_server",
    "task_list",
]
logger = logging.getLogger(__name__)
API_KEY_ENV_VAR = "FLORENCE_API_KEY"
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclasses.dataclass
class ServeSettings:
    """How the server batches, what a request may cost, and who and what it may reach.

    Attributes:
        max_batch: Requests decoded together in one ``generate`` call, at most.
        max_wait_ms: How long the first request of a batch waits for others to join it.
        max_queue: Requests in flight at once (reading, decoding, waiting, running); past
            that, 503 with ``Retry-After`` before the body is read.
        max_image_mb: The largest image accepted, uploaded or downloaded, in megabytes.
        max_image_pixels: The largest image decoded, in pixels, read from its header first.
        max_pixels_in_flight: All images held at once, in pixels: past it, 503.
        url_timeout_s: How long fetching an image URL may take, redirects included.
        request_timeout_s: How long a request may take from its first byte to its answer.
        shutdown_timeout_s: How long shutting down waits for requests in progress.
        max_beams: The largest ``num_beams`` a request may ask for.
        max_new_tokens: The largest ``max_new_tokens`` a request may ask for.
        max_text_chars: The longest ``text`` or ``prompt``, in characters (checked before
            tokenising; the model's own limit in tokens is checked after).
        api_key: Requests must carry it (``Authorization: Bearer KEY`` or ``X-API-Key``);
            None: no key asked.
        server_names: Host names clients reach the server by (the Host header). Empty: the
            loopback names when listening on loopback, else the listening address.
        cors_origins: Web origins whose pages may call the server (``https://app.example``);
            empty: CORS off, and cross-origin browser requests refused.
        docs: Serve /docs and /openapi.json.
        fetch_hosts: Non-public hosts or networks a ``url`` may reach (see
            :class:`~florence_helpers.inputs.InputLimits`); empty: public addresses only.
        allowed_folders: For the MCP tools: folders whose images they may read (empty: none).
        fetch_workers: URLs fetched at once (their own threads, apart from decoding).
        decode_workers: Images decoded at once.
    """

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_image_mb: float = 20.0
    max_image_pixels: int = 40_000_000
    max_pixels_in_flight: int = 200_000_000
    url_timeout_s: float = 30.0
    request_timeout_s: float = 120.0
    shutdown_timeout_s: float = 30.0
    max_beams: int = 8
    max_new_tokens: int = 1024
    max_text_chars: int = 4000
    api_key: str | None = None
    server_names: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    docs: bool = False
    fetch_hosts: tuple[str, ...] = ()
    allowed_folders: tuple[str, ...] = ()
    fetch_workers: int = 4
    decode_workers: int = 2

    def __post_init__(self) -> None:
        whole = ("max_batch", "max_queue", "max_beams", "max_new_tokens", "max_text_chars")
        for name in (*whole, "fetch_workers", "decode_workers"):
            check_number(getattr(self, name), name, minimum=1, integer=True)
        for name in ("max_image_pixels", "max_pixels_in_flight"):
            check_number(getattr(self, name), name, minimum=1, integer=True)
        check_number(self.max_wait_ms, "max_wait_ms", minimum=0)
        for name in ("max_image_mb", "url_timeout_s", "request_timeout_s", "shutdown_timeout_s"):
            check_number(getattr(self, name), name, minimum=0, above=True)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string, or None for no key.")

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1e6)

    @property
    def max_body_bytes(self) -> int:
        """An image as base64 (4/3 of its bytes) and the other fields."""
        return self.max_image_bytes * 4 // 3 + 64_000

    def input_limits(self) -> InputLimits:
        """The limits every image of a request is read under."""
        return InputLimits(
            max_mb=self.max_image_mb,
            max_pixels=self.max_image_pixels,
            timeout=self.url_timeout_s,
            allowed_hosts=tuple(self.fetch_hosts),
            allowed_folders=tuple(self.allowed_folders),
        )


class _PixelBudget:
    """Pixels of all images held at once: a reservation is refused past the total."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._lock = threading.Lock()

    def reserve(self, pixels: int) -> bool:
        with self._lock:
            if self.used + pixels > self.total:
                return False
            self.used += pixels
            return True

    def release(self, pixels: int) -> None:
        with self._lock:
            self.used -= pixels


def _error(field: str, message: str, status: int, **headers: str) -> Any:
    from fastapi.responses import JSONResponse

    body = {"error": {"field": field, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def task_list() -> list[dict[str, str]]:
    """What ``GET /v1/tasks`` answers: each task's name, token, input and result."""
    return [
        {
            "name": spec.name,
            "token": spec.token,
            "input": spec.input.value,
            "result": spec.result.value,
            "description": spec.description,
        }
        for spec in TASKS.values()
    ]


def model_name(model_id: str) -> str:
    """A model as the server shows it: a hub id as it is, a local folder by its name only."""
    return os.path.basename(os.path.normpath(model_id)) if os.path.isdir(model_id) else model_id


class _Guard:
    """ASGI middleware deciding, before any work, who may ask and what a request may cost."""

    def __init__(self, app: Any, settings: ServeSettings, names: tuple[str, ...] | None) -> None:
        self.app, self.settings, self.names = app, settings, names
        self.in_flight = 0

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
        if admitted:
            if self.in_flight >= self.settings.max_queue:
                busy = f"{self.in_flight} requests are in progress. Try again shortly."
                await _error("", f"The server is busy: {busy}", 503, **{"Retry-After": "1"})(
                    scope, receive, send
                )
                return
            self.in_flight += 1
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._body(headers, receive)
                if not isinstance(body, bytes):
                    await body(scope, receive, send)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            if admitted:
                self.in_flight -= 1

    def _refusal(self, scope: Any, headers: Any) -> Any:
        host = _host_name(headers.get("host", ""))
        if self.names is not None and host not in self.names:
            return _error(
                "host", "This server does not answer to that host name (the Host header).", 400
            )
        origin = headers.get("origin")
        if origin and origin not in self.settings.cors_origins and not _same_origin(origin, host):
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
        """The whole body, or an error response: too large (chunked too) or too slow."""
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return _error("body", f"The request is larger than the {limit / 1e6:g} MB limit.", 413)
        chunks, size = [], 0

        async def read() -> Any:
            nonlocal size
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return _error(
                        "body", f"The request is larger than the {limit / 1e6:g} MB limit.", 413
                    )
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)

        try:
            body = await asyncio.wait_for(read(), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            return _error("body", "The request body did not arrive in time.", 408)
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


def _same_origin(origin: str, host: str) -> bool:
    import urllib.parse

    try:
        return (urllib.parse.urlsplit(origin).hostname or "").lower() == host
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


class _Service:
    """What the run endpoint needs: the batcher, the thread pools and the pixel budget."""

    def __init__(self, florence: FlorenceModel, settings: ServeSettings) -> None:
        self.florence, self.settings = florence, settings
        self.limits = settings.input_limits()
        self.batcher = Batcher(
            florence,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
        )
        self.fetching = concurrent.futures.ThreadPoolExecutor(
            settings.fetch_workers, thread_name_prefix="florence-fetch"
        )
        self.decoding = concurrent.futures.ThreadPoolExecutor(
            settings.decode_workers, thread_name_prefix="florence-decode"
        )
        self.budget = _PixelBudget(settings.max_pixels_in_flight)

    def close(self) -> None:
        self.batcher.close(self.settings.shutdown_timeout_s)
        self.fetching.shutdown(wait=False, cancel_futures=True)
        self.decoding.shutdown(wait=False, cancel_futures=True)

    async def answer(self, request: Any) -> Any:
        """The run endpoint: read, check, reserve, decode, queue, wait; or a refusal."""
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        reserved, future = 0, None
        try:
            fields, source = await read_fields(request, self.settings.max_image_bytes)
            if isinstance(source, str):
                source = await self._in(self.fetching, self._fetch, source, deadline, "url")
            width, height = await self._in(self.decoding, image_size, source, deadline, "image")
            if width * height > self.settings.max_image_pixels:
                message = too_large_message("the image", width * height, self.limits.max_pixels)
                raise RequestError("image", message, 413)
            if not self.budget.reserve(width * height):
                return _error("", "The server is busy with large images.", 503, **_RETRY)
            reserved = width * height
            image = await self._in(self.decoding, self._decode, source, deadline, "image")
            job = await self._in(self.decoding, self._job, (image, fields), deadline, "")
            future = self.batcher.submit(job)
        except RequestError as bad:
            return _error(bad.field, bad.message, bad.status)
        except QueueFull as full:
            return _error("", f"The server is busy: {full} Try again shortly.", 503, **_RETRY)
        except ShuttingDown as closing:
            return _error("", str(closing), 503, **{"Retry-After": "5"})
        finally:
            if reserved and future is None:
                self.budget.release(reserved)
        future.add_done_callback(lambda _: self.budget.release(reserved))
        return await self._wait(future, request, deadline)

    async def _in(self, pool: Any, work: Any, value: Any, deadline: float, field: str) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(pool, work, value), max(deadline - loop.time(), 0.001)
            )
        except asyncio.TimeoutError:
            raise RequestError(field, "The request took too long.", 504) from None
        except ImageTooLargeError as bad:
            raise RequestError(field, str(bad), 413) from None
        except ImageLoadError as bad:
            raise RequestError(field, str(bad), 400) from None

    def _fetch(self, url: str) -> bytes:
        try:
            return fetch_url(url, self.limits)
        except ForbiddenAddressError:
            raise ImageLoadError(
                f"Did not fetch {url}: its host is not a public address, and this server "
                "fetches images only from public ones."
            ) from None
        except TooLargeError as error:
            raise ImageTooLargeError(str(error)) from None
        except InputError as error:
            raise ImageLoadError(str(error)) from None

    def _decode(self, data: bytes) -> Any:
        return load_image(data, limits=self.limits)

    def _job(self, loaded: tuple[Any, dict[str, Any]]) -> Any:
        image, fields = loaded
        settings = self.settings
        return check_request(
            self.florence,
            image,
            task=fields.get("task"),
            text=fields.get("text"),
            region=fields.get("region"),
            prompt=fields.get("prompt"),
            parse=fields.get("parse"),
            num_beams=fields.get("num_beams", 3),
            max_new_tokens=fields.get("max_new_tokens", settings.max_new_tokens),
            scores=fields.get("scores", False),
            max_beams=settings.max_beams,
            max_tokens=settings.max_new_tokens,
            max_text_chars=settings.max_text_chars,
        )

    async def _wait(self, future: Any, request: Any, deadline: float) -> Any:
        """The answer; a 504 past the deadline; nothing run for a client that left."""
        loop = asyncio.get_running_loop()
        waiting = asyncio.wrap_future(future)
        while True:
            left = deadline - loop.time()
            if left <= 0:
                future.cancel()
                return _error("", "The request took too long.", 504)
            done, _ = await asyncio.wait({waiting}, timeout=min(left, 0.25))
            if done:
                break
            if await request.is_disconnected():
                future.cancel()  # dropped unless the worker has started it already
                return _error("", "The client left.", 499)
        try:
            return waiting.result().to_dict()
        except (TaskInputError, RegionError, ImageLoadError) as bad:
            return _error("", str(bad), 422)
        except ShuttingDown as closing:
            return _error("", str(closing), 503, **{"Retry-After": "5"})


_RETRY = {"Retry-After": "1"}


def create_app(
    florence: FlorenceModel, settings: ServeSettings | None = None, *, host: str = "127.0.0.1"
) -> Any:
    """The FastAPI app serving ``florence``. Run it with uvicorn (``serve`` does).

    ``host`` is the address it will listen on: it decides the Host names answered by
    default (see :attr:`ServeSettings.server_names`).

    Example:
        >>> app = create_app(load_model(), ServeSettings(max_batch=16))  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    try:
        from fastapi import FastAPI, Request
    except ImportError:
        raise ImportError(
            'Serving needs the optional packages of the "serve" extra: '
            'pip install "florence-helpers[serve]".'
        ) from None
    settings = settings or ServeSettings()
    state: dict[str, _Service] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        state["service"] = _Service(florence, settings)
        app.state.batcher = state["service"].batcher
        try:
            yield
        finally:
            # Uvicorn has already waited for the requests in progress (up to its timeout).
            await asyncio.to_thread(state["service"].close)

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Florence-2", version="1", lifespan=lifespan, **docs)
    _add_middleware(app, settings, server_names(settings, host))
    _add_error_handlers(app)

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        service = state.get("service")
        health: dict[str, Any] = {
            "status": "ok",
            "waiting": service.batcher.waiting if service else 0,
        }
        if settings.api_key is None or _key_matches(request.headers, settings.api_key):
            health["model"] = model_name(florence.model_id)
            health["device"] = str(florence.device)
            health["dtype"] = str(florence.dtype).removeprefix("torch.")
        return health

    @app.get("/v1/tasks")
    async def tasks() -> list[dict[str, str]]:
        return task_list()

    @app.post("/v1/run")
    async def run_task(request: Request) -> Any:
        return await state["service"].answer(request)

    return app


def _add_middleware(app: Any, settings: ServeSettings, names: tuple[str, ...] | None) -> None:
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(_Guard, settings=settings, names=names)  # added last: runs first


def _add_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Any, exc: HTTPException) -> Any:
        messages = {404: "No such endpoint.", 405: "That method is not allowed here."}
        message = messages.get(exc.status_code, str(exc.detail))
        return _error("", message, exc.status_code, **(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Any, exc: RequestValidationError) -> Any:
        return _error("body", "The request does not have the expected form.", 422)

    @app.exception_handler(Exception)
    async def unexpected(request: Any, exc: Exception) -> Any:
        logger.exception("Unexpected error answering %s", request.url.path)
        return _error("", "An unexpected error occurred; the server's log has the details.", 500)


def _uvicorn_config(app: Any, host: str, port: int, settings: ServeSettings, level: str) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=level,
        timeout_graceful_shutdown=max(int(settings.shutdown_timeout_s), 1),
        server_header=False,
    )


def serve(
    florence: FlorenceModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
) -> None:
    """Serve ``florence`` until interrupted (what ``python -m florence_helpers serve`` runs)."""
    import uvicorn

    settings = settings or ServeSettings()
    app = create_app(florence, settings, host=host)
    uvicorn.Server(_uvicorn_config(app, host, port, settings, "info")).run()


class Server:
    """A server running in a background thread of this process (see :func:`start_server`)."""

    def __init__(
        self, florence: FlorenceModel, host: str, port: int, settings: ServeSettings | None
    ) -> None:
        import socket

        import uvicorn

        settings = settings or ServeSettings()
        if port == 0:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.app = create_app(florence, settings, host=host)
        self._server = uvicorn.Server(_uvicorn_config(self.app, host, port, settings, "warning"))
        self._thread = threading.Thread(target=self._server.run, name="florence-server")
        self._thread.daemon = True
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The server did not start on {host}:{port}.")
            time.sleep(0.02)

    @property
    def batches(self) -> int:
        """How many ``run`` calls the server has made (fewer than requests when it batched)."""
        return self.app.state.batcher.batches

    def stop(self) -> None:
        """Stop listening, answer every accepted request, and end the thread."""
        self._server.should_exit = True
        self._thread.join(60)

    def __repr__(self) -> str:
        return f"Server({self.url!r})"


def start_server(
    florence: FlorenceModel,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    settings: ServeSettings | None = None,
) -> Server:
    """Serve ``florence`` from a background thread of this process, for a notebook or a test.

    ``port=0`` picks a free port; ``server.url`` says which. ``server.stop()`` ends it,
    answering every request it accepted first.

    Example:
        >>> server = start_server(florence)  # doctest: +SKIP
        >>> httpx.get(f"{server.url}/healthz").json()["status"]  # doctest: +SKIP
        'ok'
        >>> server.stop()  # doctest: +SKIP
    """
    return Server(florence, host, port, settings)


@contextlib.contextmanager
def running_server(
    florence: FlorenceModel,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    settings: ServeSettings | None = None,
) -> Iterator[str]:
    """:func:`start_server` as a ``with`` block; yields the base URL, stops at its end."""
    server = start_server(florence, host=host, port=port, settings=settings)
    try:
        yield server.url
    finally:
        server.stop()


def mcp_server(florence: FlorenceModel, settings: ServeSettings | None = None) -> Any:
    """The MCP server (see :func:`florence_helpers.mcp_tools.mcp_server`)."""
    from .mcp_tools import mcp_server as build

    return build(florence, settings)
