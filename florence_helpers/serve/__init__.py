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
one ``generate`` call (:mod:`florence_helpers.serve.batching`). What a request may cost and reach is
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
- **What it may fetch**: a ``url`` is fetched under :mod:`florence_helpers.boundary.inputs`' policy
  (http/https only; public addresses only on every hop unless allowed; one deadline), on its
  own threads, so slow URLs never hold up uploads; errors never repeat what the remote said.

Every refusal is ``{"error": {"field": ..., "message": ...}}`` with a 4xx or 5xx status, also
404 and 405. The app needs the ``serve`` extra: ``pip install "florence-helpers[serve]"``.
TLS is not its job: put it behind a reverse proxy to expose it beyond one machine.
Modules: ``settings`` (``ServeSettings``), ``guard`` (who may ask, what a request may cost),
``requests`` (the fields of a request, checked), ``batching`` (the worker queue), ``app`` (the
FastAPI app and the ways to run it), ``mcp_tools`` (the MCP server).

Layer 4: may import ``language``, ``boundary``, ``drawing`` and ``model``; not ``labelling``.
"""

from .app import Server, create_app, running_server, serve, start_server
from .batching import Batcher, Job, QueueFull, ShuttingDown
from .mcp_tools import mcp_server
from .requests import RequestError, check_request
from .settings import API_KEY_ENV_VAR, ServeSettings, model_name, task_list

__all__ = [
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
    "model_name",
    "running_server",
    "serve",
    "start_server",
    "task_list",
]
