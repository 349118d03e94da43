"""What the server accepts and who it answers: :class:`ServeSettings`, and the names it shows
(tasks, the model without its file path).
"""

import dataclasses
import os

from ..boundary.inputs import InputLimits, check_number
from ..language.tasks import TASKS

API_KEY_ENV_VAR = "FLORENCE_API_KEY"
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclasses.dataclass
class ServeSettings:
    """How the server batches, what a request may cost, and who and what it may reach.

    Attributes:
        max_batch: Requests decoded together in one ``generate`` call, at most.
        max_wait_ms: How long the first request of a batch waits for others to join it.
        max_queue: Requests in flight at once once their body has arrived (decoding,
            waiting, running); past that, 503 with ``Retry-After``, before the body is read
            when the queue is already full. Bodies still arriving hold no place in it (slow
            clients cannot fill it); together they may hold 8 times ``max_image_mb``.
        max_image_mb: The largest image accepted, uploaded or downloaded, in megabytes.
        max_image_pixels: The largest image decoded, in pixels, read from its header first.
        max_pixels_in_flight: All images held at once, in pixels: past it, 503.
        url_timeout_s: How long fetching an image URL may take, redirects included.
        request_timeout_s: How long a request may take from its first byte to its answer.
        shutdown_timeout_s: How long shutting down waits for requests in progress.
        header_timeout_s: How long a connection may take to send a request's headers (a
            client that sends nothing, or a byte at a time, is disconnected), and the longest
            pause while it sends a body.
        max_connections: Connections open at once, at most; past that, 503.
        max_beams: The largest ``num_beams`` a request may ask for.
        max_new_tokens: The largest ``max_new_tokens`` a request may ask for.
        max_text_chars: The longest ``text`` or ``prompt``, in characters (checked before
            tokenising; the model's own limit in tokens is checked after).
        max_classes: The most class names the MCP ``detect`` tool takes (one query each).
        api_key: Requests must carry it (``Authorization: Bearer KEY`` or ``X-API-Key``);
            None: no key asked.
        server_names: Host names clients reach the server by (the Host header). Empty: the
            loopback names when listening on loopback, else the listening address.
        cors_origins: Web origins whose pages may call the server (``https://app.example``);
            empty: CORS off, and cross-origin browser requests refused.
        docs: Serve /docs and /openapi.json.
        fetch_hosts: Non-public hosts or networks a ``url`` may reach, on every port or, as
            ``host:port``, on one (see :class:`~florence_helpers.boundary.inputs.InputLimits`);
            empty: public addresses only.
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
    header_timeout_s: float = 10.0
    max_connections: int = 512
    max_beams: int = 8
    max_new_tokens: int = 1024
    max_text_chars: int = 4000
    max_classes: int = 32
    api_key: str | None = None
    server_names: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    docs: bool = False
    fetch_hosts: tuple[str, ...] = ()
    allowed_folders: tuple[str, ...] = ()
    fetch_workers: int = 4
    decode_workers: int = 2

    def __post_init__(self) -> None:
        whole = (
            "max_batch",
            "max_queue",
            "max_beams",
            "max_new_tokens",
            "max_text_chars",
            "max_classes",
        )
        for name in (*whole, "fetch_workers", "decode_workers"):
            check_number(getattr(self, name), name, minimum=1, integer=True)
        for name in ("max_image_pixels", "max_pixels_in_flight"):
            check_number(getattr(self, name), name, minimum=1, integer=True)
        check_number(self.max_wait_ms, "max_wait_ms", minimum=0)
        check_number(self.max_connections, "max_connections", minimum=1, integer=True)
        timeouts = ("url_timeout_s", "request_timeout_s", "shutdown_timeout_s", "header_timeout_s")
        for name in ("max_image_mb", *timeouts):
            check_number(getattr(self, name), name, minimum=0, above=True)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string, or None for no key.")
        self.input_limits()  # an allowed host that cannot be read is refused at startup

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
