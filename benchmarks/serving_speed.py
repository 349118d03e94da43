"""Requests per second through the HTTP service, against one-by-one calls, on this machine.

    python benchmarks/serving_speed.py [--concurrency 1,8,32] [--max-batch 8]

No weights are downloaded: the full-size Florence-2-base architecture is built with random
weights, in the dtype ``load_model()`` picks here, and every answer is forced to a 14-token
caption (3 beams), so each request does the work of a real one. The service runs in this
process (``start_server``) on 127.0.0.1; clients are threads sending image uploads with
httpx. The baseline is the same captions as one-by-one ``run`` calls without HTTP.
"""

from __future__ import annotations

import argparse
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from inference_speed import ANSWER_TOKENS, build, forced, in_dtype, processor_name
from PIL import Image

from florence_helpers import Task, run
from florence_helpers import batching as serving  # the worker queue calls run()
from florence_helpers.model.devices import cpu_has_native_bf16, resolve_dtype
from florence_helpers.serve.app import start_server
from florence_helpers.serve.settings import ServeSettings

TOKENS = ANSWER_TOKENS[Task.CAPTION]


def photos(count: int) -> list[bytes]:
    """``count`` JPEG uploads: noise pictures of 640x480 (each distinct)."""
    out = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 255, (480, 640, 3), dtype=torch.uint8, generator=generator)
        buffer = io.BytesIO()
        Image.fromarray(pixels.numpy()).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = resolve_dtype("auto", torch.device("cpu"))
    florence = in_dtype(build("base"), dtype)
    print(
        f"# Serving speed: {processor_name()}, {torch.get_num_threads()} torch threads, "
        f"native bf16: {'yes' if cpu_has_native_bf16() else 'no'}, {dtype}; "
        f"<CAPTION> of {TOKENS} tokens, 3 beams"
    )
    model_call = serving.run

    def forced_run(florence_, images, task, text=None, **kwargs):
        count = len(images) if isinstance(images, list) else 1
        kwargs["logits_processor"] = forced(florence_, [TOKENS] * count)
        return model_call(florence_, images, task, text, **kwargs)

    serving.run = forced_run  # every request's answer has the same, realistic length
    levels = [int(c) for c in args.concurrency.split(",")]
    uploads = photos(max(max(levels), 8))

    images = [Image.open(io.BytesIO(data)) for data in uploads[:8]]
    run(florence, images[0], Task.CAPTION, logits_processor=forced(florence, [TOKENS]))  # warm-up
    start = time.perf_counter()
    for image in images:
        run(florence, image, Task.CAPTION, logits_processor=forced(florence, [TOKENS]))
    alone = len(images) / (time.perf_counter() - start)
    print(f"one-by-one run() calls, no HTTP: {alone:6.2f} requests/s")

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    server = start_server(florence, settings=settings)
    try:

        def ask(data: bytes) -> int:
            files = {"image": ("photo.jpg", data, "image/jpeg")}
            response = httpx.post(
                f"{server.url}/v1/run", files=files, data={"task": "CAPTION"}, timeout=3600
            )
            return response.status_code

        for level in levels:
            requests = uploads[: max(level, 8)]
            before = server.batches
            start = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                codes = list(pool.map(ask, requests))
            rate = len(requests) / (time.perf_counter() - start)
            calls = server.batches - before
            assert codes == [200] * len(requests), codes
            print(
                f"concurrency {level:>3}: {rate:6.2f} requests/s ({rate / alone:.2f}x one-by-one), "
                f"{len(requests)} requests in {calls} generate calls"
            )
    finally:
        server.stop()
        serving.run = model_call


if __name__ == "__main__":
    main()
