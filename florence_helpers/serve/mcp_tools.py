"""Florence-2 as MCP tools (the official ``mcp`` SDK), for assistants that call tools.

``python -m florence_helpers mcp --allow-folder DIR`` serves them over stdio. Each tool takes
an image path or an http(s) URL and runs through the same checks and batching as the HTTP
server (:mod:`florence_helpers.serve`). Local paths are read only under the folders the user
allowed (none by default); URLs follow the same policy as the server's (public addresses only,
unless allowed; size, pixel and time limits).
"""

from __future__ import annotations

from typing import Any

from ..boundary.images import ImageLoadError, load_image
from ..language.prompts import TaskInputError
from ..model.loading import FlorenceModel
from .batching import Batcher
from .requests import RequestError, check_request
from .settings import ServeSettings


def mcp_server(florence: FlorenceModel, settings: ServeSettings | None = None) -> Any:
    """An MCP server whose tools run Florence-2 on an image.

    Tools: ``caption`` (one sentence, a few, or a paragraph), ``detect`` (objects, or the class
    names you give), ``read_text`` (each line with its quadrilateral) and ``ground`` (the boxes
    of a phrase). ``settings.allowed_folders`` lists the folders whose images the tools may
    read (empty: none, only URLs); ``settings.fetch_hosts`` the non-public hosts URLs may
    reach.
    """
    from mcp.server.mcpserver import MCPServer

    tools = _Tools(florence, settings or ServeSettings())
    server = MCPServer(
        "florence-2", instructions="Florence-2 vision tools: pass an image path or URL."
    )
    _register(server, tools)
    server.florence_batcher = tools.batcher  # type: ignore[attr-defined]
    return server


class _Tools:
    """What every tool does first: read the image under the limits, check the request, queue
    it; a mistake becomes a ``ToolError`` whose message goes back to the client."""

    def __init__(self, florence: FlorenceModel, settings: ServeSettings) -> None:
        self.florence, self.settings = florence, settings
        self.limits = settings.input_limits()
        self.batcher = Batcher(
            florence,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
        )

    def picture(self, image: str) -> Any:
        from mcp.server.mcpserver.exceptions import ToolError

        try:
            return load_image(image, limits=self.limits)
        except ImageLoadError as error:  # the client's mistake: its message goes back to it
            raise ToolError(str(error)) from None

    def job(self, loaded: Any, task: str, text: str | None = None) -> Any:
        from mcp.server.mcpserver.exceptions import ToolError

        try:
            return check_request(
                self.florence,
                loaded,
                task=task,
                text=text,
                max_new_tokens=self.settings.max_new_tokens,
                max_beams=self.settings.max_beams,
                max_tokens=self.settings.max_new_tokens,
                max_text_chars=self.settings.max_text_chars,
            )
        except RequestError as error:
            raise ToolError(f"{error.field}: {error.message}") from None

    def answer(self, image: str, task: str, text: str | None = None) -> Any:
        (answer,) = self.results([self.job(self.picture(image), task, text)])
        return answer

    def results(self, jobs: list[Any]) -> list[Any]:
        """The jobs' answers within one request deadline for them all; an error the client
        can read. On any failure every job of the call is cancelled: none runs for nobody."""
        import time
        from concurrent.futures import TimeoutError as Late

        from mcp.server.mcpserver.exceptions import ToolError

        deadline = time.monotonic() + self.settings.request_timeout_s
        futures: list[Any] = []
        try:
            futures += [self.batcher.submit(job) for job in jobs]
            return [f.result(timeout=max(deadline - time.monotonic(), 0)) for f in futures]
        except Late:
            raise ToolError(
                f"The answer took more than {self.settings.request_timeout_s:g} s."
            ) from None
        except (TaskInputError, ImageLoadError) as error:
            raise ToolError(str(error)) from None
        finally:
            for future in futures:
                future.cancel()  # a no-op for those done or running

    def detect(self, image: str, classes: list[str]) -> Any:
        from mcp.server.mcpserver.exceptions import ToolError

        from ..model.detection import check_classes, merge_detections

        try:
            names = check_classes(classes, max_classes=self.settings.max_classes)
        except TaskInputError as error:
            raise ToolError(str(error)) from None
        loaded = self.picture(image)
        jobs = [self.job(loaded, "OPEN_VOCABULARY_DETECTION", name) for name in names]
        return merge_detections(self.results(jobs), names)


def _register(server: Any, tools: _Tools) -> None:
    """The four tools, as the client sees them: names, typed arguments, docstrings."""

    @server.tool()
    def caption(image: str, detail: str = "sentence") -> str:
        """Describe an image. detail: "sentence", "detailed" (a few sentences) or "paragraph"."""
        tasks = {"sentence": "CAPTION", "detailed": "DETAILED_CAPTION"}
        return tools.answer(image, tasks.get(detail, "MORE_DETAILED_CAPTION")).text

    @server.tool()
    def detect(image: str, classes: list[str] | None = None) -> dict[str, Any]:
        """Find objects: every object it knows (no classes), or each of the class names given.
        Boxes are x1, y1, x2, y2 in pixels."""
        found = tools.answer(image, "OD") if not classes else tools.detect(image, classes)
        return {"labels": found.labels, "boxes": found.boxes.round(1).tolist()}

    @server.tool()
    def read_text(image: str) -> list[dict[str, Any]]:
        """Read the text of an image: each line with its four corners (x, y) in pixels."""
        lines = tools.answer(image, "OCR_WITH_REGION")
        return [
            {"text": text, "quad": quad.round(1).tolist()}
            for text, quad in zip(lines.texts, lines.quads, strict=True)
        ]

    @server.tool()
    def ground(image: str, phrase: str) -> dict[str, Any]:
        """Find what a phrase describes: its boxes, x1, y1, x2, y2 in pixels."""
        found = tools.answer(image, "OPEN_VOCABULARY_DETECTION", phrase)
        return {"phrase": phrase, "boxes": found.boxes.round(1).tolist()}
