"""The FastAPI app (:func:`create_app`) and the ways to run it: :func:`serve` until
interrupted, or :func:`start_server` and :func:`running_server` in a background thread, for a
notebook or a test. :mod:`florence_helpers.serve` says what the service does and guards.
"""

# No "from __future__ import annotations" here: FastAPI reads the endpoints' annotations.
import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..boundary.fetching import fetch_url
from ..boundary.images import (
    ImageLoadError,
    ImageTooLargeError,
    image_size,
    load_image,
    too_large_message,
)
from ..boundary.inputs import (
    ForbiddenAddressError,
    InputError,
    TooLargeError,
)
from ..language.prompts import TaskInputError
from ..language.regions import RegionError
from ..model.loading import FlorenceModel
from .batching import Batcher, QueueFull, ShuttingDown
from .guard import _error, _Guard, _key_matches, server_names, timed_protocol
from .requests import RequestError, check_request, read_fields
from .settings import ServeSettings, model_name, task_list

logger = logging.getLogger(__name__)


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
        http=timed_protocol(settings.header_timeout_s),
        limit_concurrency=settings.max_connections,
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
