"""The server as a hostile client meets it: keys, Host names, origins, caps, deadlines.

Every server is a real uvicorn on 127.0.0.1; listeners that must never be contacted count the
connections they accept. The model call is replaced by a counter where only the boundary is
under test (what is refused must never reach the model).
"""

import base64
import concurrent.futures
import io
import json
import socket
import threading
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from florence_helpers import run
from florence_helpers.serve import app as serve_app
from florence_helpers.serve import batching
from florence_helpers.serve.app import running_server, start_server
from florence_helpers.serve.settings import ServeSettings, model_name
from florence_helpers.testing import force_answers

pytest.importorskip("fastapi")
from loopback import Listener, http_reply  # noqa: E402

TIMEOUT = 60
KEY = "s3cret-key"


def picture(width: int = 120, height: int = 60) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (width % 255, 90, 160)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def calls(monkeypatch, florence):
    """Each model call, answered with a forced short detection."""
    made = []

    def forced(florence_, images, task, text=None, **kwargs):
        batch = images if isinstance(images, list) else [images]
        made.append(len(batch))
        answers = ["car<loc_1><loc_2><loc_300><loc_400>"] * len(batch)
        kwargs["logits_processor"] = force_answers(florence_.processor, answers)
        return run(florence_, images, task, text, **kwargs)

    monkeypatch.setattr(batching, "run", forced)
    return made


def upload(url: str, data: bytes | None = None, headers=None, **fields) -> httpx.Response:
    files = {"image": ("p.png", data or picture(), "image/png")}
    return httpx.post(
        f"{url}/v1/run",
        files=files,
        data={"task": "OD", "num_beams": "1", **fields},
        headers=headers,
        timeout=TIMEOUT,
    )


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


# --- who may ask -------------------------------------------------------------------------------


def test_an_api_key_is_required_and_compared_exactly(florence, calls):
    with running_server(florence, settings=ServeSettings(api_key=KEY)) as url:
        none = upload(url)
        wrong = upload(url, headers={"Authorization": "Bearer s3cret-kez"})
        bearer = upload(url, headers={"Authorization": f"Bearer {KEY}"})
        header = upload(url, headers={"X-API-Key": KEY})
        tasks = httpx.get(f"{url}/v1/tasks")
        health = httpx.get(f"{url}/healthz").json()
        health_with_key = httpx.get(f"{url}/healthz", headers={"X-API-Key": KEY}).json()
    assert (none.status_code, error_of(none)["field"]) == (401, "authorization")
    assert none.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401 and tasks.status_code == 401
    assert bearer.status_code == 200 and header.status_code == 200
    assert calls == [1, 1]  # refused requests never reached the model
    assert set(health) == {"status", "waiting"}
    assert {"model", "device", "dtype"} <= set(health_with_key)


def test_only_the_servers_own_host_names_are_answered(florence, calls):
    with running_server(florence) as url:
        port = url.rsplit(":", 1)[1]
        rebound = upload(url, headers={"Host": f"attacker.example:{port}"})
        localhost = upload(url, headers={"Host": f"localhost:{port}"})
    named = ServeSettings(server_names=("florence.internal",))
    with running_server(florence, settings=named) as url:
        by_name = upload(url, headers={"Host": "florence.internal"})
        by_address = upload(url)
    assert (rebound.status_code, error_of(rebound)["field"]) == (400, "host")
    assert localhost.status_code == 200 and by_name.status_code == 200
    assert by_address.status_code == 400
    assert calls == [1, 1]


def test_cross_origin_browser_requests_are_refused_unless_allowed(florence, calls):
    evil = {"Origin": "http://evil.example"}
    with running_server(florence) as url:
        forged = upload(url, headers=evil)
        same = upload(url, headers={"Origin": url})
    allowed = ServeSettings(cors_origins=("https://app.example",))
    with running_server(florence, settings=allowed) as url:
        app = upload(url, headers={"Origin": "https://app.example"})
        preflight = httpx.options(
            f"{url}/v1/run",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        other = upload(url, headers=evil)
    assert (forged.status_code, error_of(forged)["field"]) == (403, "origin")
    assert same.status_code == 200 and app.status_code == 200
    assert app.headers["access-control-allow-origin"] == "https://app.example"
    assert preflight.status_code == 200 and other.status_code == 403
    assert calls == [1, 1]


def test_docs_are_off_unless_asked_and_every_status_has_the_error_body(florence):
    with running_server(florence) as url:
        docs = httpx.get(f"{url}/docs")
        schema = httpx.get(f"{url}/openapi.json")
        wrong_method = httpx.get(f"{url}/v1/run")
        nowhere = httpx.post(f"{url}/nowhere")
    with running_server(florence, settings=ServeSettings(docs=True)) as url:
        shown = httpx.get(f"{url}/openapi.json")
    for response, status in ((docs, 404), (schema, 404), (wrong_method, 405), (nowhere, 404)):
        assert response.status_code == status
        assert set(response.json()) == {"error"} and response.json()["error"]["message"]
    assert shown.status_code == 200 and "/v1/run" in shown.json()["paths"]


def test_health_shows_no_file_path(florence, tiny_model_dir):
    with running_server(florence) as url:
        health = httpx.get(f"{url}/healthz").json()
    assert health["model"] == tiny_model_dir.name == model_name(str(tiny_model_dir))
    assert str(tiny_model_dir.parent) not in str(health)
    assert model_name("florence-community/Florence-2-base") == "florence-community/Florence-2-base"


# --- what a request may cost -------------------------------------------------------------------


def test_a_chunked_body_past_the_cap_is_refused(florence, calls):
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    with running_server(florence, settings=ServeSettings(max_image_mb=0.1)) as url:
        response = httpx.post(
            f"{url}/v1/run", content=chunks(), headers={"Content-Type": "application/json"}
        )
        alive = httpx.get(f"{url}/healthz")
    assert (response.status_code, error_of(response)["field"]) == (413, "body")
    assert alive.status_code == 200 and calls == []


def test_deeply_nested_json_and_fields_of_the_wrong_type_get_a_4xx(florence, calls):
    image = base64.b64encode(picture()).decode()
    cases = [
        (b"[" * 100_000 + b"]" * 100_000, 400, "body"),
        ({"task": "OPEN_VOCABULARY_DETECTION", "text": 5, "image": image}, 422, "text"),
        ({"task": "OPEN_VOCABULARY_DETECTION", "text": ["a", "b"], "image": image}, 422, "text"),
        ({"task": 7, "image": image}, 422, "task"),
        ({"task": "OD", "num_beams": 1000, "image": image}, 422, "num_beams"),
        ({"task": "OD", "num_beams": [1], "image": image}, 422, "num_beams"),
        ({"task": "OD", "max_new_tokens": 1e300, "image": image}, 422, "max_new_tokens"),
        ({"task": "REGION_TO_CATEGORY", "region": {"x": 1}, "image": image}, 422, "region"),
        ({"task": "REGION_TO_CATEGORY", "region": [1, 2, "nan", 4], "image": image}, 422, "region"),
        (
            {"task": "REGION_TO_CATEGORY", "region": [10**400, 0, 1, 1], "image": image},
            422,
            "region",
        ),
        ({"task": "OD", "image": "not base64!"}, 400, "image"),
        ({"task": "OD", "image": "data:image/png,raw"}, 422, "image"),
        # A task or result kind of 1 MB was echoed whole in the refusal (tenth hostile review).
        ({"task": "X" * 1_000_000, "image": image}, 422, "task"),
        ({"prompt": "hi", "parse": "x" * 1_000_000, "image": image}, 422, "parse"),
    ]
    with running_server(florence) as url:
        responses = []
        for body, _, _ in cases:
            if isinstance(body, bytes):
                responses.append(
                    httpx.post(
                        f"{url}/v1/run", content=body, headers={"Content-Type": "application/json"}
                    )
                )
            else:
                responses.append(httpx.post(f"{url}/v1/run", json=body))
    for response, (_, status, field) in zip(responses, cases, strict=True):
        assert (response.status_code, error_of(response)["field"]) == (status, field), response.text
        assert len(response.content) < 2000
    assert calls == []


def test_images_come_as_base64_or_data_urls_with_the_same_answer(florence, calls):
    encoded = base64.b64encode(picture()).decode()
    with running_server(florence) as url:
        uploaded = upload(url).json()
        as_base64 = httpx.post(
            f"{url}/v1/run", json={"task": "OD", "num_beams": 1, "image": encoded}
        ).json()
        as_data_url = httpx.post(
            f"{url}/v1/run",
            json={"task": "OD", "num_beams": 1, "url": f"data:image/png;base64,{encoded}"},
        ).json()
    assert uploaded == as_base64 == as_data_url


def test_an_upload_and_an_image_field_of_one_name_are_two_images(florence, calls):
    encoded = base64.b64encode(picture()).decode()
    with running_server(florence) as url:
        both = upload(url, image=encoded)
    assert both.status_code == 400 and "Give one image" in error_of(both)["message"]
    assert calls == []


def test_a_pixel_bomb_is_refused_before_decoding(florence, calls, monkeypatch):
    buffer = io.BytesIO()
    Image.new("1", (13000, 13000)).save(buffer, "PNG")
    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a: decoded.append(1) or real(*a))
    with running_server(florence) as url:
        started = time.monotonic()
        response = upload(url, data=buffer.getvalue())
        took = time.monotonic() - started
    assert (response.status_code, error_of(response)["field"]) == (413, "image")
    assert "megapixels" in error_of(response)["message"] and took < 5
    assert decoded == [] and calls == []


def test_images_in_flight_share_one_pixel_budget(florence, calls):
    settings = ServeSettings(max_image_pixels=10_000, max_pixels_in_flight=15_000)
    release = threading.Event()
    with running_server(florence, settings=settings) as url:
        batching.run, real = (lambda *a, **k: release.wait(30) and real(*a, **k)), batching.run
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                first = pool.submit(upload, url, picture(100, 90))  # 9,000 pixels, held
                time.sleep(1.0)
                second = upload(url, picture(100, 90))  # 9,000 more: past the budget
                release.set()
                first = first.result()
        finally:
            batching.run = real
    assert first.status_code == 200
    assert second.status_code == 503 and "large images" in error_of(second)["message"]


def test_a_huge_prompt_is_refused_before_tokenising(florence, calls, monkeypatch):
    tokenised = []
    tokenizer = type(florence.processor.tokenizer)
    real = tokenizer.__call__
    monkeypatch.setattr(tokenizer, "__call__", lambda *a, **k: tokenised.append(1) or real(*a, **k))
    text = "cat " * 1_250_000  # 5 MB
    with running_server(florence) as url:
        started = time.monotonic()
        response = upload(url, task="OPEN_VOCABULARY_DETECTION", text=text)
        took = time.monotonic() - started
    assert (response.status_code, error_of(response)["field"]) == (422, "text")
    assert "too long" in error_of(response)["message"] and took < 10
    assert tokenised == [] and calls == []


def test_a_huge_custom_prompt_is_refused_naming_the_prompt(florence, calls):
    from florence_helpers.serve.requests import RequestError, check_request

    image = Image.new("RGB", (32, 32))
    with pytest.raises(RequestError) as refused:
        check_request(florence, image, task=None, prompt="cat " * 2000, max_text_chars=4000)
    assert refused.value.field == "prompt" and "too long" in str(refused.value)
    job = check_request(florence, image, task=None, prompt="What is this? ", max_text_chars=4000)
    assert job is not None and calls == []


def test_load_is_shed_before_the_body_is_read(florence, monkeypatch):
    release, headers_read = threading.Event(), []
    monkeypatch.setattr(batching, "run", lambda *a, **k: release.wait(30) and run(*a, **k))
    real = serve_app.image_size
    monkeypatch.setattr(serve_app, "image_size", lambda d: headers_read.append(1) or real(d))
    settings = ServeSettings(max_queue=1, max_batch=1, max_wait_ms=0)
    with running_server(florence, settings=settings) as url:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            busy = pool.submit(upload, url, max_new_tokens="2")
            time.sleep(1.0)
            before = len(headers_read)
            shed = upload(url, max_new_tokens="2")
            release.set()
            assert busy.result().status_code == 200
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
    assert before == 1  # the busy request's image was looked at, by this very probe
    assert len(headers_read) == before  # the shed request's image never was


def test_a_request_whose_client_left_is_dropped(florence, calls, monkeypatch):
    release = threading.Event()
    real = batching.run
    monkeypatch.setattr(batching, "run", lambda *a, **k: release.wait(30) and real(*a, **k))
    settings = ServeSettings(max_batch=1, max_wait_ms=0)
    server = start_server(florence, settings=settings)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(upload, server.url, max_new_tokens="2")
            time.sleep(0.8)
            with pytest.raises(httpx.ReadTimeout):  # this client gives up and leaves
                httpx.post(
                    f"{server.url}/v1/run",
                    files={"image": ("p.png", picture(130))},
                    data={"task": "OD", "num_beams": "1"},
                    timeout=1.0,
                )
            time.sleep(0.8)  # the server notices the disconnect
            # The left request leaves the queue at once, with its decoded image (ninth hostile
            # review: such requests stayed queued, holding their pixels past the budget).
            assert server.app.state.batcher.waiting == 1
            assert server.app.state.batcher.dropped == 1
            release.set()
            assert running.result().status_code == 200
        time.sleep(0.5)
        assert server.app.state.batcher.dropped == 1
        assert calls == [1]  # only the first request ran
    finally:
        server.stop()


def test_each_request_has_a_deadline(florence, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(batching, "run", lambda *a, **k: release.wait(30) and run(*a, **k))
    with running_server(florence, settings=ServeSettings(request_timeout_s=1)) as url:
        started = time.monotonic()
        late = upload(url, max_new_tokens="2")
        took = time.monotonic() - started
        release.set()
    assert late.status_code == 504 and took < 5


def test_slow_urls_never_hold_up_uploads(florence, calls):
    drip = Listener(reply=lambda path: http_reply("200 OK", picture()), delay=0.5, step=1)
    settings = ServeSettings(fetch_hosts=("127.0.0.1",), fetch_workers=2, url_timeout_s=3)
    try:
        with running_server(florence, settings=settings) as url:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                slow = [
                    pool.submit(
                        httpx.post,
                        f"{url}/v1/run",
                        json={"task": "OD", "url": f"{drip.url}/{i}.png"},
                        timeout=TIMEOUT,
                    )
                    for i in range(4)
                ]
                time.sleep(0.5)
                started = time.monotonic()
                quick = upload(url)
                took = time.monotonic() - started
                health = httpx.get(f"{url}/healthz")
                slow = [f.result() for f in slow]
    finally:
        drip.close()
    assert quick.status_code == 200 and took < 5, took
    assert health.status_code == 200
    assert {r.status_code for r in slow} == {400} and all(
        "more than 3 s" in error_of(r)["message"] for r in slow
    )


def test_a_url_never_reaches_another_local_port_directly_or_by_redirect(florence, calls):
    hidden = Listener("127.0.0.2", reply=lambda path: http_reply("200 OK", picture()))
    redirector = Listener(reply=lambda path: http_reply("302 Found", Location=f"{hidden.url}/p"))
    try:
        with running_server(florence) as url:
            direct = (
                httpx.post(  # a path with "limit" in it: the status comes from the error's kind
                    f"{url}/v1/run", json={"task": "OD", "url": f"{hidden.url}/limits-pixels.png"}
                )
            )
            named = httpx.post(
                f"{url}/v1/run", json={"task": "OD", "url": f"http://localhost:{hidden.port}/"}
            )
        settings = ServeSettings(fetch_hosts=("127.0.0.1",))  # the redirector only
        with running_server(florence, settings=settings) as url:
            redirected = httpx.post(
                f"{url}/v1/run", json={"task": "OD", "url": f"{redirector.url}/r"}
            )
    finally:
        hidden.close()
        redirector.close()
    for response in (direct, named, redirected):
        assert (response.status_code, error_of(response)["field"]) == (400, "url")
        assert "not a public address" in error_of(response)["message"]
        assert "allowed_hosts" not in error_of(response)["message"]  # no advice on settings
    assert hidden.accepted == 0 and redirector.accepted == 1 and calls == []


def test_shutdown_does_not_wait_on_a_slow_client_past_its_timeout(florence):
    settings = ServeSettings(shutdown_timeout_s=1, request_timeout_s=60)
    server = start_server(florence, settings=settings)
    host, port = server.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    slow.sendall(
        b"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )  # and then nothing more
    time.sleep(0.3)
    started = time.monotonic()
    server.stop()
    took = time.monotonic() - started
    slow.close()
    assert took < 6, took


# --- request parsing, fuzzed -------------------------------------------------------------------

HUGE_INTEGERS = st.integers(min_value=2**1024, max_value=10**4000) | st.integers(
    min_value=-(10**4000), max_value=-(2**1024)
)  # past float's range, within what Python's JSON reads
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | HUGE_INTEGERS | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FIELDS = st.dictionaries(
    st.sampled_from(
        ["task", "text", "prompt", "parse", "region", "num_beams", "max_new_tokens", "scores"]
    ),
    JSON_VALUES,
)


def fake_request(body: bytes, kind: str = "application/json"):
    from starlette.requests import Request

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/run",
        "headers": [(b"content-type", kind.encode())],
    }
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


@settings(max_examples=150, deadline=None)
@given(FIELDS, st.sampled_from(["image", "url", "both", "none"]))
def test_any_json_fields_give_a_job_or_a_request_error_naming_a_field(florence, fields, source):
    import asyncio
    import json

    from florence_helpers.serve.requests import RequestError, check_request, read_fields

    encoded = base64.b64encode(picture()).decode()
    body = dict(fields)
    if source in ("image", "both"):
        body["image"] = encoded
    if source in ("url", "both"):
        body["url"] = "http://example.com/a.png"
    try:
        parsed, image = asyncio.run(read_fields(fake_request(json.dumps(body).encode()), 10**6))
        if isinstance(image, bytes):
            job = check_request(
                florence,
                Image.open(io.BytesIO(image)).convert("RGB"),
                task=parsed.get("task"),
                text=parsed.get("text"),
                region=parsed.get("region"),
                prompt=parsed.get("prompt"),
                parse=parsed.get("parse"),
                num_beams=parsed.get("num_beams", 3),
                max_new_tokens=parsed.get("max_new_tokens", 64),
                scores=parsed.get("scores", False),
            )
            assert 1 <= dict(job.settings)["num_beams"] <= 8
            assert job.text is None or isinstance(job.text, str)
    except RequestError as error:
        assert error.field and error.message and 400 <= error.status < 500


@settings(max_examples=150, deadline=None)
@given(JSON_VALUES)
def test_any_region_gives_a_job_or_a_request_error_naming_the_region(florence, region):
    from florence_helpers.serve.requests import RequestError, check_request

    image = Image.new("RGB", (64, 48))
    try:
        job = check_request(florence, image, task="REGION_TO_CATEGORY", region=region)
    except RequestError as error:
        assert error.field == "region" and error.status == 422, error
    else:
        assert "<loc_" in job.prompt


# --- cases from a hostile review ----------------------------------------------------------


def test_a_connection_that_sends_no_headers_is_closed(florence):
    settings = ServeSettings(header_timeout_s=1)
    server = start_server(florence, settings=settings)
    host, port = server.url.removeprefix("http://").split(":")
    try:
        idle = socket.create_connection((host, int(port)))
        dripping = socket.create_connection((host, int(port)))
        dripping.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        idle.settimeout(10)
        dripping.settimeout(10)
        started = time.monotonic()
        assert idle.recv(1) == b"" and dripping.recv(1) == b""  # closed by the server
        assert time.monotonic() - started < 5
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # others carry on
    finally:
        idle.close()
        dripping.close()
        server.stop()


def test_slow_bodies_hold_no_place_in_the_queue_and_a_long_pause_ends_one(florence, calls):
    # 64 clients sending their bodies at a byte a second refused every other request for as
    # long as they kept at it (twelfth hostile review).
    settings = ServeSettings(max_queue=2, header_timeout_s=2)
    server = start_server(florence, settings=settings)
    host, port = server.url.removeprefix("http://").split(":")
    slow = []
    try:
        for _ in range(4):
            connection = socket.create_connection((host, int(port)))
            connection.sendall(
                b"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            slow.append(connection)
        time.sleep(0.5)
        assert upload(server.url, max_new_tokens="2").status_code == 200
        slow[0].settimeout(10)
        started = time.monotonic()
        assert b" 408 " in slow[0].recv(200)  # a pause longer than header_timeout_s
        assert time.monotonic() - started < 5
    finally:
        for connection in slow:
            connection.close()
        server.stop()


def test_a_json_body_of_many_containers_is_refused_before_it_is_parsed(florence, calls):
    # 26 MB of [{}, {}, ...] beside an image became 0.6 GB of Python objects per request
    # (fourteenth hostile review); only the strings may be large.
    image = base64.b64encode(picture()).decode()
    with running_server(florence) as url:
        padded = httpx.post(
            f"{url}/v1/run",
            content=json.dumps({"task": "CAPTION", "image": image, "pad": [{}] * 200_000}),
            headers={"content-type": "application/json"},
            timeout=TIMEOUT,
        )
        assert padded.status_code == 400
        assert "more than a request's fields" in error_of(padded)["message"]
        plain = httpx.post(
            f"{url}/v1/run",
            json={"task": "CAPTION", "image": image, "note": "x" * 100_000, "max_new_tokens": 2},
            timeout=TIMEOUT,
        )
        assert plain.status_code == 200  # unknown fields are left out, large strings are fine


def test_a_body_sent_to_another_path_is_not_read(florence, calls):
    with running_server(florence) as url:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        try:
            sock.sendall(
                b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000000\r\n\r\n{"
            )  # a 100 MB body announced, one byte sent
            sock.settimeout(10)
            answer = sock.recv(4096)
        finally:
            sock.close()
    assert answer.startswith(b"HTTP/1.1 404")  # answered at once, nothing buffered


def test_a_page_on_another_port_of_the_same_host_is_another_origin(florence, calls):
    with running_server(florence) as url:
        other = url.rsplit(":", 1)[0] + ":9"
        response = upload(url, headers={"Origin": other})
    assert (response.status_code, error_of(response)["field"]) == (403, "origin")
    assert calls == []


def test_mcp_tools_keep_the_servers_token_cap_and_class_limit(florence, calls, tmp_path):
    import asyncio

    from florence_helpers.serve import mcp_server

    (tmp_path / "p.png").write_bytes(picture())
    settings = ServeSettings(max_new_tokens=64, max_classes=3, allowed_folders=(str(tmp_path),))
    tools = mcp_server(florence, settings)
    image = str(tmp_path / "p.png")
    from mcp.server.mcpserver.exceptions import ToolError

    caption = asyncio.run(tools.call_tool("caption", {"image": image}))
    assert not caption.is_error  # the token cap of 64 is what the tool asks for
    with pytest.raises(ToolError, match="more than the 3"):
        asyncio.run(tools.call_tool("detect", {"image": image, "classes": list("abcd")}))


def test_an_mcp_detect_that_times_out_cancels_every_class_job(florence, monkeypatch, tmp_path):
    # Only the first class's job was cancelled: the other 31 stayed queued with their image and
    # ran for nobody, and each class waited a whole deadline of its own (eleventh review).
    from mcp.server.mcpserver.exceptions import ToolError

    from florence_helpers.serve.mcp_tools import _Tools

    release = threading.Event()
    real = batching.run
    monkeypatch.setattr(batching, "run", lambda *a, **k: release.wait(30) and real(*a, **k))
    (tmp_path / "p.png").write_bytes(picture())
    settings = ServeSettings(
        allowed_folders=(str(tmp_path),), request_timeout_s=0.5, max_batch=1, max_wait_ms=0
    )
    tools = _Tools(florence, settings)
    try:
        started = time.monotonic()
        with pytest.raises(ToolError, match="took more than 0.5 s"):
            tools.detect(str(tmp_path / "p.png"), [f"class {i}" for i in range(8)])
        assert time.monotonic() - started < 5  # one deadline for the call, not one per class
        assert tools.batcher.waiting <= 1  # at most the one the worker had taken
        release.set()
        time.sleep(0.5)
        assert tools.batcher.batches <= 1
    finally:
        release.set()
        tools.batcher.close(5)
