"""Serve Florence-2 over HTTP, batching the requests that arrive together.

``python -m florence_helpers serve`` (or :func:`create_app` in your own ASGI server) starts a
FastAPI app on uvicorn with one loaded model:

- ``POST /v1/run``: an image (a multipart upload named ``image``, or a ``url`` field) and a
  ``task`` (with ``text`` or ``region`` where the task takes them, or a ``prompt`` of your own
  with ``parse``), ``num_beams``, ``max_new_tokens``, ``scores``; answers with the result's JSON
  (:meth:`Result.to_dict`). The same fields also come as a JSON body, with ``url``.
- ``GET /v1/tasks``: the tasks, what each takes and gives back.
- ``GET /healthz``: the model, its device and dtype, and how many requests are waiting.

Requests for the same task and settings that arrive within ``max_wait_ms`` of each other run in
one ``generate`` call (up to ``max_batch``); each still gets exactly its own answer. When more
than ``max_queue`` requests wait, a new one is answered 503 with ``Retry-After`` instead of the
queue growing without bound. Every bad request gets a 4xx and a JSON error naming the field:
``{"error": {"field": "text", "message": "..."}}``; never a traceback, never a dead server.
On shutdown the server stops taking requests and answers every accepted one before it exits.

The app needs the ``serve`` extra: ``pip install "florence-helpers[serve]"``.
"""

# No "from __future__ import annotations" here: FastAPI reads the endpoints' annotations.
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

from .images import ImageLoadError, load_image
from .inference import check_generation_settings, check_prompt_lengths, run
from .model import FlorenceModel
from .prompts import TaskInputError, build_prompt
from .regions import RegionError
from .tasks import TASKS, InputKind, TaskSpec, UnknownTaskError, custom_task, task_spec


@dataclasses.dataclass
class ServeSettings:
    """How the server batches and what it accepts.

    Attributes:
        max_batch: Requests decoded together in one ``generate`` call, at most.
        max_wait_ms: How long the first request of a batch waits for others to join it.
        max_queue: Requests waiting at once, at most; past that, 503 with ``Retry-After``.
        max_image_mb: The largest image accepted, uploaded or downloaded, in megabytes.
        url_timeout_s: How long downloading an image URL may take, in seconds.
    """

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_image_mb: float = 20.0
    url_timeout_s: float = 30.0


class RequestError(ValueError):
    """A request the server refuses: the field at fault, the message and the HTTP status."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


class QueueFull(RuntimeError):
    """More requests are waiting than ``max_queue``."""


class ShuttingDown(RuntimeError):
    """The server is closing and takes no new requests."""


@dataclasses.dataclass
class Job:
    """One checked request waiting for its answer."""

    image: Any
    spec: TaskSpec
    text: str | None
    region: tuple[float, ...] | None
    settings: tuple[tuple[str, Any], ...]  # generation settings, hashable
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with the same key can share one ``run`` call."""
        return (self.spec, self.settings)


class Batcher:
    """Runs jobs on one model in a worker thread, several of the same kind per ``run`` call."""

    def __init__(self, florence: FlorenceModel, settings: ServeSettings | None = None) -> None:
        self.florence = florence
        self.settings = settings or ServeSettings()
        self._pending: list[Job] = []
        self._condition = threading.Condition()
        self._closing = False
        self._busy = 0
        self.batches = 0  # run() calls made, for the curious (and the tests)
        self._thread = threading.Thread(target=self._work, name="florence-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job; its future gets the result, or the error that job met."""
        with self._condition:
            if self._closing:
                raise ShuttingDown("The server is shutting down.")
            if len(self._pending) + self._busy >= self.settings.max_queue:
                raise QueueFull(f"{len(self._pending) + self._busy} requests are waiting.")
            self._pending.append(job)
            self._condition.notify()
        return job.future

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._pending) + self._busy

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs; finish every accepted one; stop the worker."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._condition:
                    self._busy -= len(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job and those of its kind that arrive within ``max_wait_ms``."""
        with self._condition:
            while not self._pending:
                if self._closing:
                    return None
                self._condition.wait()
            first = self._pending[0]
            deadline = time.monotonic() + self.settings.max_wait_ms / 1000
            while True:
                same = [job for job in self._pending if job.key == first.key]
                left = deadline - time.monotonic()
                if len(same) >= self.settings.max_batch or left <= 0 or self._closing:
                    break
                self._condition.wait(left)
            batch = same[: self.settings.max_batch]
            for job in batch:
                self._pending.remove(job)
            self._busy += len(batch)
            return batch

    def _run(self, batch: list[Job]) -> None:
        first = batch[0]
        settings = dict(first.settings)
        self.batches += 1
        try:
            results = run(
                self.florence,
                [job.image for job in batch],
                first.spec,
                [job.text for job in batch] if first.text is not None else None,
                region=[job.region for job in batch] if first.region is not None else None,
                batch_size=len(batch),
                progress=False,
                **settings,
            )
        except Exception:  # noqa: BLE001 - one job may spoil the batch: answer each alone
            for job in batch:
                self._run_alone(job, settings)
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _run_alone(self, job: Job, settings: dict[str, Any]) -> None:
        try:
            result = run(
                self.florence,
                job.image,
                job.spec,
                job.text,
                region=job.region,
                progress=False,
                **settings,
            )
        except Exception as error:  # noqa: BLE001 - the error is this job's answer
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


def check_request(
    florence: FlorenceModel,
    image: Any,
    *,
    task: str | None,
    text: str | None = None,
    region: Any = None,
    prompt: str | None = None,
    parse: str = "text",
    num_beams: Any = 3,
    max_new_tokens: Any = 1024,
    scores: Any = False,
) -> Job:
    """Turn the fields of a request into a checked :class:`Job`, or raise :class:`RequestError`
    naming the field at fault. ``image`` is already a loaded PIL image."""
    task = task if task not in ("", None) else None
    prompt = prompt if prompt not in ("", None) else None
    if (task is None) == (prompt is None):
        raise RequestError("task", "Give a task (e.g. CAPTION) or a prompt, not both or neither.")
    if prompt is not None:
        try:
            spec = custom_task(prompt, result=parse)
        except ValueError as error:
            raise RequestError("parse", str(error)) from None
    else:
        try:
            spec = task_spec(task)
        except UnknownTaskError as error:
            raise RequestError("task", str(error), 400) from None
    box = _region(region)
    text = text if text not in ("", None) else None
    try:
        build_prompt(spec, image.size, text=text, region=box)
    except RegionError as error:
        raise RequestError("region", str(error)) from None
    except TaskInputError as error:
        if text is not None:
            field = "text"
        elif box is not None:
            field = "region"
        else:  # something missing: what the task takes
            field = "region" if spec.input is InputKind.REGION else "text"
        raise RequestError(field, str(error)) from None
    beams, tokens = _integer(num_beams, "num_beams"), _integer(max_new_tokens, "max_new_tokens")
    try:
        check_generation_settings(beams, tokens)
    except TaskInputError as error:
        raise RequestError(str(error).split()[0], str(error)) from None
    try:
        check_prompt_lengths(florence, [build_prompt(spec, image.size, text, box)], tokens)
    except TaskInputError as error:
        field = "max_new_tokens" if "max_new_tokens" in str(error) else "text"
        raise RequestError(field, str(error)) from None
    settings = (("max_new_tokens", tokens), ("num_beams", beams), ("scores", _flag(scores)))
    return Job(image=image, spec=spec, text=text, region=box, settings=settings)


def _region(value: Any) -> tuple[float, ...] | None:
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise RequestError(
            "region", f"A region is four numbers x1, y1, x2, y2 in pixels, got {value!r}."
        ) from None
    if len(numbers) != 4:
        raise RequestError(
            "region", f"A region is four numbers x1, y1, x2, y2 in pixels, got {len(numbers)}."
        )
    return numbers


def _integer(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise RequestError(field, f"{field} must be a whole number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(field, f"{field} must be a whole number, got {value!r}.") from None
    if not number.is_integer():
        raise RequestError(field, f"{field} must be a whole number, got {value!r}.")
    return int(number)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise RequestError("scores", f"scores must be true or false, got {value!r}.")


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


def create_app(florence: FlorenceModel, settings: ServeSettings | None = None) -> Any:
    """The FastAPI app serving ``florence``. Run it with uvicorn (``serve`` does).

    Example:
        >>> app = create_app(load_model(), ServeSettings(max_batch=16))  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
    except ImportError:
        raise ImportError(
            'Serving needs the optional packages of the "serve" extra: '
            'pip install "florence-helpers[serve]".'
        ) from None
    settings = settings or ServeSettings()
    state: dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        state["batcher"] = Batcher(florence, settings)
        app.state.batcher = state["batcher"]
        try:
            yield
        finally:
            # Uvicorn has already waited for the requests in progress; nothing is dropped.
            await asyncio.to_thread(state["batcher"].close)

    app = FastAPI(title="Florence-2", version="1", lifespan=lifespan)

    def error(field: str, message: str, status: int, **headers: str) -> Any:
        body = {"error": {"field": field, "message": message}}
        return JSONResponse(body, status_code=status, headers=headers or None)

    @app.exception_handler(Exception)
    async def unexpected(request: Any, exc: Exception) -> Any:
        return error("", f"{type(exc).__name__}: {exc}", 500)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        batcher = state.get("batcher")
        return {
            "status": "ok",
            "model": florence.model_id,
            "device": str(florence.device),
            "dtype": str(florence.dtype).removeprefix("torch."),
            "waiting": batcher.waiting if batcher else 0,
        }

    @app.get("/v1/tasks")
    async def tasks() -> list[dict[str, str]]:
        return task_list()

    @app.post("/v1/run")
    async def run_task(request: Request) -> Any:
        limit = int(settings.max_image_mb * 1e6)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 64_000:
            return error(
                "image", f"The request is larger than the {settings.max_image_mb:g} MB limit.", 413
            )
        try:
            fields, image = await _read_request(request, settings, limit)
            job = await asyncio.to_thread(
                check_request,
                florence,
                image,
                task=fields.get("task"),
                text=fields.get("text"),
                region=fields.get("region"),
                prompt=fields.get("prompt"),
                parse=fields.get("parse") or "text",
                num_beams=fields.get("num_beams", 3),
                max_new_tokens=fields.get("max_new_tokens", 1024),
                scores=fields.get("scores", False),
            )
            future = state["batcher"].submit(job)
        except RequestError as bad:
            return error(bad.field, bad.message, bad.status)
        except QueueFull as full:
            return error(
                "", f"The server is busy: {full} Try again shortly.", 503, **{"Retry-After": "1"}
            )
        except ShuttingDown as closing:
            return error("", str(closing), 503, **{"Retry-After": "5"})
        try:
            result = await asyncio.wrap_future(future)
        except (TaskInputError, RegionError, ImageLoadError) as bad:
            return error("", str(bad), 422)
        return result.to_dict()

    return app


async def _read_request(request: Any, settings: ServeSettings, limit: int) -> tuple[dict, Any]:
    """The request's fields and its image (uploaded or downloaded, decoded)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("application/json"):
        try:
            fields = await request.json()
        except ValueError:
            raise RequestError("body", "The body is not valid JSON.", 400) from None
        if not isinstance(fields, dict):
            raise RequestError("body", "The JSON body must be an object of fields.", 400)
        upload = None
    elif kind.startswith("multipart/form-data") or kind.startswith(
        "application/x-www-form-urlencoded"
    ):
        try:
            form = await request.form(max_part_size=limit + 1)
        except Exception as bad:  # noqa: BLE001 - a malformed or oversized form
            raise RequestError("body", f"The form could not be read: {bad}", 400) from None
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        upload = form.get("image")
        upload = None if isinstance(upload, str) else upload
    else:
        raise RequestError(
            "body", "Send multipart/form-data (an image upload) or a JSON body with a url.", 415
        )
    url = fields.get("url")
    if upload is not None and url:
        raise RequestError("image", "Give an uploaded image or a url, not both.", 400)
    if upload is not None:
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise RequestError(
                "image", f"The image is larger than the {settings.max_image_mb:g} MB limit.", 413
            )
        source: Any = data
    elif url:
        if not str(url).startswith(("http://", "https://")):
            raise RequestError("url", "Only http:// and https:// image URLs are fetched.", 400)
        source = str(url)
    else:
        raise RequestError("image", "No image: upload one as 'image', or give a 'url'.", 400)
    try:
        image = await asyncio.to_thread(
            load_image, source, max_mb=settings.max_image_mb, timeout=settings.url_timeout_s
        )
    except ImageLoadError as bad:
        field = "url" if isinstance(source, str) else "image"
        status = 413 if "limit" in str(bad) else 400
        raise RequestError(field, str(bad), status) from None
    return fields, image


def serve(
    florence: FlorenceModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
) -> None:
    """Serve ``florence`` until interrupted (what ``python -m florence_helpers serve`` runs)."""
    import uvicorn

    uvicorn.run(create_app(florence, settings), host=host, port=port, log_level="info")


class Server:
    """A server running in a background thread of this process (see :func:`start_server`)."""

    def __init__(self, florence: FlorenceModel, host: str, port: int, settings: Any) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.app = create_app(florence, settings)
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning")
        self._server = uvicorn.Server(config)
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
    """An MCP server (the official ``mcp`` SDK) whose tools run Florence-2 on an image.

    Tools: ``caption`` (one sentence, a few, or a paragraph), ``detect`` (objects, or the class
    names you give), ``read_text`` (each line with its quadrilateral) and ``ground`` (the boxes
    of a phrase). Each takes an image path or an http(s) URL, and runs through the same checks
    and batching as the HTTP server. ``python -m florence_helpers mcp`` serves it over stdio.
    """
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from .detection import check_classes, merge_detections

    batcher = Batcher(florence, settings)
    limits = batcher.settings
    server = MCPServer(
        "florence-2", instructions="Florence-2 vision tools: pass an image path or URL."
    )

    def picture(image: str) -> Any:
        try:
            return load_image(image, max_mb=limits.max_image_mb, timeout=limits.url_timeout_s)
        except ImageLoadError as error:  # the client's mistake: its message goes back to it
            raise ToolError(str(error)) from None

    def answer(image: str, task: str, text: str | None = None) -> Any:
        try:
            job = check_request(florence, picture(image), task=task, text=text)
        except RequestError as error:
            raise ToolError(f"{error.field}: {error.message}") from None
        return batcher.submit(job).result()

    @server.tool()
    def caption(image: str, detail: str = "sentence") -> str:
        """Describe an image. detail: "sentence", "detailed" (a few sentences) or "paragraph"."""
        tasks = {"sentence": "CAPTION", "detailed": "DETAILED_CAPTION"}
        return answer(image, tasks.get(detail, "MORE_DETAILED_CAPTION")).text

    @server.tool()
    def detect(image: str, classes: list[str] | None = None) -> dict[str, Any]:
        """Find objects: every object it knows (no classes), or each of the class names given.
        Boxes are x1, y1, x2, y2 in pixels."""
        if not classes:
            found = answer(image, "OD")
        else:
            try:
                names = check_classes(classes)
                loaded = picture(image)
                jobs = [
                    check_request(florence, loaded, task="OPEN_VOCABULARY_DETECTION", text=name)
                    for name in names
                ]
            except (TaskInputError, RequestError) as error:
                raise ToolError(str(error)) from None
            results = [batcher.submit(job).result() for job in jobs]
            found = merge_detections(results, names)
        return {"labels": found.labels, "boxes": found.boxes.round(1).tolist()}

    @server.tool()
    def read_text(image: str) -> list[dict[str, Any]]:
        """Read the text of an image: each line with its four corners (x, y) in pixels."""
        lines = answer(image, "OCR_WITH_REGION")
        return [
            {"text": text, "quad": quad.round(1).tolist()}
            for text, quad in zip(lines.texts, lines.quads, strict=True)
        ]

    @server.tool()
    def ground(image: str, phrase: str) -> dict[str, Any]:
        """Find what a phrase describes: its boxes, x1, y1, x2, y2 in pixels."""
        found = answer(image, "OPEN_VOCABULARY_DETECTION", phrase)
        return {"phrase": phrase, "boxes": found.boxes.round(1).tolist()}

    server.florence_batcher = batcher  # type: ignore[attr-defined]
    return server
