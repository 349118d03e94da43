"""Florence-2 as MCP tools (the official ``mcp`` SDK), for assistants that call tools.

``python -m florence_helpers mcp --allow-folder DIR`` serves them over stdio. Each tool takes
an image path or an http(s) URL and runs through the same checks and batching as the HTTP
server (:mod:`florence_helpers.serve`). Local paths are read only under the folders the user
allowed (none by default); URLs follow the same policy as the server's (public addresses only,
unless allowed; size, pixel and time limits).
"""

from __future__ import annotations

from typing import Any

from .batching import Batcher
from .images import ImageLoadError, load_image
from .model import FlorenceModel
from .prompts import TaskInputError
from .serve import ServeSettings
from .serve_requests import RequestError, check_request


def mcp_server(florence: FlorenceModel, settings: ServeSettings | None = None) -> Any:
    """An MCP server whose tools run Florence-2 on an image.

    Tools: ``caption`` (one sentence, a few, or a paragraph), ``detect`` (objects, or the class
    names you give), ``read_text`` (each line with its quadrilateral) and ``ground`` (the boxes
    of a phrase). ``settings.allowed_folders`` lists the folders whose images the tools may
    read (empty: none, only URLs); ``settings.fetch_hosts`` the non-public hosts URLs may
    reach.
    """
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from .detection import check_classes, merge_detections

    settings = settings or ServeSettings()
    limits = settings.input_limits()
    batcher = Batcher(
        florence,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
    )
    server = MCPServer(
        "florence-2", instructions="Florence-2 vision tools: pass an image path or URL."
    )

    def picture(image: str) -> Any:
        try:
            return load_image(image, limits=limits)
        except ImageLoadError as error:  # the client's mistake: its message goes back to it
            raise ToolError(str(error)) from None

    def job(loaded: Any, task: str, text: str | None = None) -> Any:
        try:
            return check_request(
                florence,
                loaded,
                task=task,
                text=text,
                max_beams=settings.max_beams,
                max_tokens=settings.max_new_tokens,
                max_text_chars=settings.max_text_chars,
            )
        except RequestError as error:
            raise ToolError(f"{error.field}: {error.message}") from None

    def answer(image: str, task: str, text: str | None = None) -> Any:
        return batcher.submit(job(picture(image), task, text)).result()

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
            except TaskInputError as error:
                raise ToolError(str(error)) from None
            loaded = picture(image)
            jobs = [job(loaded, "OPEN_VOCABULARY_DETECTION", name) for name in names]
            results = [batcher.submit(each).result() for each in jobs]
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
