"""``python -m florence_helpers serve`` and ``... mcp``: their options, checked before the
model loads, then the server (:mod:`florence_helpers.serve`,
:mod:`florence_helpers.serve.mcp_tools`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence

from ..boundary.inputs import SettingError


def _parser(mcp: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m florence_helpers {'mcp' if mcp else 'serve'}",
        description="Serve Florence-2 as MCP tools over stdio (caption, detect, read_text, ground)."
        if mcp
        else "Serve Florence-2 over HTTP: POST /v1/run, GET /v1/tasks, GET /healthz.",
    )
    parser.add_argument("--model", help="hub id or local directory")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto")
    if not mcp:
        _http_options(parser)
    else:
        parser.add_argument(
            "--allow-folder",
            action="append",
            default=[],
            metavar="DIR",
            help="a folder whose images the tools may read (repeatable; default: none)",
        )
    parser.add_argument("--max-batch", type=int, default=8, help="requests per generate call")
    parser.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill"
    )
    parser.add_argument("--max-queue", type=int, default=64, help="requests in flight, at most")
    parser.add_argument("--max-image-mb", type=float, default=20.0, help="largest image (MB)")
    parser.add_argument(
        "--max-image-pixels", type=int, default=40_000_000, help="largest image (pixels)"
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a non-public host or network image URLs may reach, on every port or as "
        "HOST:PORT on one (e.g. 10.0.0.0/8, 127.0.0.1:8001); repeatable",
    )
    return parser


def _http_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        help="require this key from every client (better: set $FLORENCE_API_KEY, which "
        "other users of this machine cannot read from the process list)",
    )
    parser.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name clients reach the server by (the Host header); repeatable",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin whose pages may call the server, e.g. https://app.example",
    )
    parser.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    parser.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds a request may take"
    )


def serve_main(argv: Sequence[str], mcp: bool = False) -> int:
    """Check the options, load the model, serve until interrupted."""
    from .common import _load, _Refused

    args = _parser(mcp).parse_args(argv)
    try:  # the "serve" extra: say so now, not after the model has loaded
        if mcp:
            import mcp as _sdk  # noqa: F401
        else:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
    except ImportError:
        raise _Refused(
            'serving needs the "serve" extra: pip install "florence-helpers[serve]"', 2
        ) from None
    settings = _settings(args, mcp)
    from .common import _checked_device

    _checked_device(args)
    florence = _load(args)
    if mcp:
        from ..serve.mcp_tools import mcp_server

        mcp_server(florence, settings).run("stdio")
        return 0
    from ..serve.app import serve

    _warn_if_exposed(args.host, settings)
    serve(florence, host=args.host, port=args.port, settings=settings)
    return 0


def _settings(args: argparse.Namespace, mcp: bool):  # noqa: ANN202 - ServeSettings, lazily
    from ..serve.settings import API_KEY_ENV_VAR, ServeSettings

    extra = {}
    if mcp:
        extra["allowed_folders"] = tuple(args.allow_folder)
    else:
        extra.update(
            api_key=args.api_key or os.environ.get(API_KEY_ENV_VAR) or None,
            server_names=tuple(args.server_name),
            cors_origins=tuple(args.cors_origin),
            docs=args.docs,
            request_timeout_s=args.request_timeout,
        )
    try:
        return ServeSettings(
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
            max_image_mb=args.max_image_mb,
            max_image_pixels=args.max_image_pixels,
            fetch_hosts=tuple(args.allow_host),
            **extra,
        )
    except (SettingError, ValueError) as error:
        raise SettingError(f"{error}") from None


def _warn_if_exposed(host: str, settings) -> None:  # noqa: ANN001
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and settings.api_key is None:
        print(
            f"warning: listening on {host} without an API key: anyone who can reach this "
            "address can use the model. Set $FLORENCE_API_KEY (or --api-key), and put the "
            "server behind a reverse proxy with TLS.",
            file=sys.stderr,
        )
