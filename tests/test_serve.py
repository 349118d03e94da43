"""The HTTP service and the MCP tools: a real uvicorn server on 127.0.0.1, clients as a user's.

Answers are forced (through the real generate()) by the image's size, so that a request's answer
is known whatever the batch it ran in: the server's answers must equal sequential ``run`` calls.
All traffic stays on the loopback interface; request loops are bounded in count and time.
"""

import asyncio
import concurrent.futures
import io
import json
import os
import sys
import threading
import time

import httpx
import pytest
from PIL import Image

from florence_helpers import run
from florence_helpers.serve import batching
from florence_helpers.serve.app import running_server
from florence_helpers.serve.settings import ServeSettings
from florence_helpers.testing import force_answers

pytest.importorskip("fastapi")
TIMEOUT = 120


def picture(width: int) -> bytes:
    """A PNG of its own size: the size picks the forced answer."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, 60), (width % 255, 90, 160)).save(buffer, "PNG")
    return buffer.getvalue()


def answer_for(size: tuple[int, int]) -> str:
    return f"car<loc_{size[0] % 1000}><loc_100><loc_900><loc_800>"


@pytest.fixture
def forced_run(monkeypatch, florence):
    """The server's model call, with each image's answer forced by its size; counts calls."""
    calls = []

    def forced(florence_, images, task, text=None, **kwargs):
        batch = images if isinstance(images, list) else [images]
        answers = [answer_for(image.size) for image in batch]
        calls.append(len(batch))
        kwargs["logits_processor"] = force_answers(florence_.processor, answers)
        return run(florence_, images, task, text, **kwargs)

    monkeypatch.setattr(batching, "run", forced)
    return calls


def post(url: str, width: int, **fields: str) -> httpx.Response:
    data = {"task": "OD", "num_beams": "1", **fields}
    files = {"image": (f"{width}.png", picture(width), "image/png")}
    return httpx.post(f"{url}/v1/run", files=files, data=data, timeout=TIMEOUT)


def test_concurrent_requests_are_batched_and_get_their_own_answers(florence, forced_run):
    widths = list(range(100, 124))
    with running_server(florence, settings=ServeSettings(max_batch=8, max_wait_ms=200)) as url:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda w: post(url, w), widths))
    assert [r.status_code for r in responses] == [200] * len(widths)
    served = [r.json() for r in responses]
    alone = [
        run(
            florence,
            Image.open(io.BytesIO(picture(w))),
            "OD",
            num_beams=1,
            logits_processor=force_answers(florence.processor, answer_for((w, 60))),
        ).to_dict()
        for w in widths
    ]
    assert served == alone
    assert sum(forced_run) == len(widths) and len(forced_run) < len(widths)  # batched
    assert max(forced_run) <= 8


def test_requests_with_other_settings_are_not_mixed_into_one_batch(florence, forced_run):
    with running_server(florence, settings=ServeSettings(max_batch=8, max_wait_ms=300)) as url:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(post, url, 200, task="OPEN_VOCABULARY_DETECTION", text=f"car {i}")
                for i in range(3)
            ] + [pool.submit(post, url, 201, task="OD", num_beams="3")]
            responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["query"] for r in responses[:3]] == ["car 0", "car 1", "car 2"]
    assert "query" not in responses[3].json()


@pytest.mark.parametrize(
    ("fields", "status", "field", "message"),
    [
        ({"task": "NOPE"}, 400, "task", "Unknown Florence-2 task 'NOPE'"),
        ({"task": "OPEN_VOCABULARY_DETECTION"}, 422, "text", "needs text"),
        ({"task": "OD", "text": "a cat"}, 422, "text", "takes only the image"),
        ({"task": "REGION_TO_CATEGORY", "region": "1,2,3"}, 422, "region", "four numbers"),
        ({"task": "REGION_TO_CATEGORY", "region": "0,0,999,9"}, 422, "region", "outside"),
        ({"task": "REGION_TO_CATEGORY"}, 422, "region", "needs a region"),
        ({"num_beams": "0"}, 422, "num_beams", "at least 1"),
        ({"num_beams": "two"}, 422, "num_beams", "whole number"),
        ({"max_new_tokens": "99999"}, 422, "max_new_tokens", "at most 1024"),
        ({"scores": "maybe"}, 422, "scores", "true or false"),
        ({"task": "OPEN_VOCABULARY_DETECTION", "text": "cat " * 3000}, 422, "text", "too long"),
        ({"task": "", "prompt": "<FIND>", "parse": "shapes"}, 422, "parse", "shapes"),
        ({"task": "", "prompt": ""}, 422, "task", "not both"),
    ],
)
def test_bad_fields_get_a_4xx_naming_the_field(
    florence, forced_run, fields, status, field, message
):
    with running_server(florence) as url:
        response = post(url, 100, **fields)
        alive = httpx.get(f"{url}/healthz", timeout=TIMEOUT)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and message in error["message"]
    assert "Traceback" not in response.text and alive.status_code == 200


def test_bad_images_and_bodies_get_a_4xx(florence, forced_run):
    settings = ServeSettings(max_image_mb=0.05)
    with running_server(florence, settings=settings) as url:
        unreadable = httpx.post(
            f"{url}/v1/run", files={"image": ("x.png", b"not a picture")}, data={"task": "OD"}
        )
        big = Image.effect_noise((300, 300), 80).convert("RGB")
        buffer = io.BytesIO()
        big.save(buffer, "PNG")
        oversized = httpx.post(
            f"{url}/v1/run", files={"image": ("big.png", buffer.getvalue())}, data={"task": "OD"}
        )
        body = b"x" * 400_000
        too_large = httpx.post(
            f"{url}/v1/run", content=body, headers={"content-type": "application/json"}
        )
        not_json = httpx.post(
            f"{url}/v1/run", content=b"{oops", headers={"content-type": "application/json"}
        )
        no_image = httpx.post(f"{url}/v1/run", json={"task": "OD"})
        file_url = httpx.post(f"{url}/v1/run", json={"task": "OD", "url": "file:///etc/passwd"})
        plain = httpx.post(
            f"{url}/v1/run", content=b"hello", headers={"content-type": "text/plain"}
        )
        jsonx = httpx.post(  # a media type that merely starts like JSON's
            f"{url}/v1/run",
            content=b'{"task": "OD"}',
            headers={"content-type": "application/jsonx"},
        )
        charset = httpx.post(
            f"{url}/v1/run",
            content=b'{"task": "OD"}',
            headers={"content-type": "Application/JSON; charset=utf-8"},
        )
        alive = httpx.get(f"{url}/healthz")
    assert (unreadable.status_code, unreadable.json()["error"]["field"]) == (400, "image")
    assert oversized.status_code == 413 and "limit" in oversized.json()["error"]["message"]
    assert too_large.status_code == 413
    assert (not_json.status_code, not_json.json()["error"]["field"]) == (400, "body")
    assert (no_image.status_code, no_image.json()["error"]["field"]) == (400, "image")
    assert (file_url.status_code, file_url.json()["error"]["field"]) == (400, "url")
    assert plain.status_code == 415 and jsonx.status_code == 415
    assert (charset.status_code, charset.json()["error"]["field"]) == (400, "image")  # read
    assert alive.json()["status"] == "ok"


def test_an_image_url_is_fetched_with_the_servers_limits(florence, forced_run, tmp_path):
    import http.server

    (tmp_path / "p.png").write_bytes(picture(150))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = lambda *a, **k: Quiet(*a, directory=str(tmp_path), **k)  # noqa: E731
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        allowed = ServeSettings(fetch_hosts=("127.0.0.1",))  # loopback is refused by default
        with running_server(florence, settings=allowed) as url:
            image_url = f"http://127.0.0.1:{files.server_address[1]}/p.png"
            found = httpx.post(
                f"{url}/v1/run", json={"task": "OD", "url": image_url, "num_beams": 1}
            )
            missing = httpx.post(f"{url}/v1/run", json={"task": "OD", "url": image_url + "x"})
    finally:
        files.shutdown()
        files.server_close()
    assert found.status_code == 200 and found.json()["image_size"] == [150, 60]
    assert (missing.status_code, missing.json()["error"]["field"]) == (400, "url")


def test_a_full_queue_answers_503_with_retry_after(florence, monkeypatch):
    release = threading.Event()

    def slow(florence_, images, task, text=None, **kwargs):
        release.wait(30)
        return run(florence_, images, task, text, **kwargs)

    monkeypatch.setattr(batching, "run", slow)
    settings = ServeSettings(max_batch=1, max_wait_ms=0, max_queue=2)
    with running_server(florence, settings=settings) as url:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(post, url, 100 + i, max_new_tokens="4") for i in range(6)]
            time.sleep(1.0)
            release.set()
            responses = [f.result() for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 2 and codes.count(503) == 4
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]["message"]


def test_shutting_down_while_busy_answers_every_accepted_request(florence, monkeypatch):
    def slow(florence_, images, task, text=None, **kwargs):
        time.sleep(0.3)
        return run(florence_, images, task, text, **kwargs)

    monkeypatch.setattr(batching, "run", slow)
    settings = ServeSettings(max_batch=2, max_wait_ms=0)
    with running_server(florence, settings=settings) as url:
        pool = concurrent.futures.ThreadPoolExecutor(6)
        futures = [pool.submit(post, url, 100 + i, max_new_tokens="4") for i in range(6)]
        time.sleep(0.5)  # some answered, some waiting: then the server is told to stop
    responses = []
    for future in futures:
        try:
            responses.append(future.result(timeout=TIMEOUT))
        except httpx.ConnectError:
            responses.append(None)  # never accepted: the server had stopped listening
    pool.shutdown()
    accepted = [r for r in responses if r is not None]
    assert accepted and all(r.status_code in (200, 503) for r in accepted)
    assert all("error" in r.json() for r in accepted if r.status_code == 503)
    assert sum(r.status_code == 200 for r in accepted) >= 1


def test_the_mcp_tools_answer_through_the_sdk_client_over_stdio(tiny_model_dir, tmp_path):
    mcp = pytest.importorskip("mcp")
    from mcp.client.stdio import StdioServerParameters, stdio_client

    del mcp
    image = tmp_path / "p.png"
    image.write_bytes(picture(120))
    parameters = StdioServerParameters(
        command=sys.executable,
        args=["-m", "florence_helpers", "mcp", "--device", "cpu", "--allow-folder", str(tmp_path)],
        env={**os.environ, "FLORENCE_MODEL": str(tiny_model_dir)},
    )

    async def session() -> dict:
        from mcp import ClientSession

        async with stdio_client(parameters) as (read, write):
            async with ClientSession(read, write) as client:
                await client.initialize()
                tools = await client.list_tools()
                caption = await client.call_tool("caption", {"image": str(image)})
                detected = await client.call_tool(
                    "detect", {"image": str(image), "classes": ["car", "tree"]}
                )
                missing = await client.call_tool("read_text", {"image": str(tmp_path / "no.png")})
                return {
                    "tools": sorted(tool.name for tool in tools.tools),
                    "caption": caption,
                    "detected": detected,
                    "missing": missing,
                }

    found = asyncio.run(asyncio.wait_for(session(), TIMEOUT))
    assert found["tools"] == ["caption", "detect", "ground", "read_text"]
    assert not found["caption"].is_error
    assert found["caption"].content[0].type == "text"
    structured = found["detected"].structured_content or json.loads(
        found["detected"].content[0].text
    )
    assert set(structured) == {"labels", "boxes"}
    assert set(structured["labels"]) <= {"car", "tree"}
    assert found["missing"].is_error and "not found" in found["missing"].content[0].text
