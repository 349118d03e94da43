"""What a request to the server may hold, checked field by field before the model sees it.

:func:`read_fields` turns a body (JSON, or a multipart/urlencoded form) into plain fields and
the image's source, refusing anything malformed with a :class:`RequestError` that names the
field and carries the HTTP status. :func:`check_request` turns the fields into a
:class:`~florence_helpers.serve.batching.Job`: the task, its text or region, and generation settings
within the server's bounds. Every field has one type: text fields are strings (a number or a
list is refused, not turned into text), numbers are numbers or numeric strings (a form sends
strings), a region is four numbers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from typing import Any

from ..boundary.fetching import check_url
from ..boundary.inputs import InputError, SettingError, check_text
from ..language.prompts import TaskInputError, build_prompt
from ..language.regions import RegionError
from ..language.tasks import InputKind, UnknownTaskError, custom_task, task_spec
from ..model.inference import check_generation_settings, check_prompt_lengths
from ..model.loading import FlorenceModel
from .batching import Job

TEXT_FIELDS = ("task", "text", "prompt", "parse", "url", "image")
REQUEST_FIELDS = (*TEXT_FIELDS, "region", "num_beams", "max_new_tokens", "scores")
"""The fields a run request may hold; others are left out as soon as the body is read."""
MAX_JSON_STRUCTURE = 4096
"""A JSON body's bytes outside its strings, at most (keys and values, as strings, aside)."""
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


class RequestError(ValueError):
    """A request the server refuses: the field at fault, the message and the HTTP status."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


async def read_fields(request: Any, max_image_bytes: int) -> tuple[dict[str, Any], Any]:
    """The fields of a request and its image source: encoded bytes or an http(s) URL.

    Args:
        request: The Starlette request (its body already capped in size by the server).
        max_image_bytes: The largest image, uploaded or decoded from base64.

    Raises:
        RequestError: A body that is not JSON or a form, fields of the wrong type, no image
            or two, an image too large, a URL that is not http(s).
    """
    # The media type alone, without parameters such as charset: "application/jsonx" is not JSON.
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        # Parsed on a thread: a large body of many keys takes a second, and the event loop
        # answers every other client meanwhile.
        fields, upload = await asyncio.to_thread(_json_fields, await request.body()), None
    elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        fields, upload = await _form_fields(request, max_image_bytes)
    else:
        raise RequestError(
            "body",
            "Send a JSON body (with an image as base64 or a data: URL, or a url) or "
            "multipart/form-data (an image upload).",
            415,
        )
    for name in TEXT_FIELDS:
        try:
            fields[name] = check_text(fields.get(name), name)
        except SettingError as error:
            raise RequestError(name, str(error)) from None
    return fields, _image_source(fields, upload, max_image_bytes)


def _json_fields(body: bytes) -> dict[str, Any]:
    """The request's fields from a JSON body: its known fields only.

    Parsed JSON takes far more memory than its text (a 26 MB list of ``{}`` became 0.6 GB of
    Python objects), so a body is refused unless, its strings left out, it is a few kB: a
    request is a handful of fields, and its one large value (a base64 image) is a string.
    """
    if len(_JSON_STRING.sub(b'""', body)) > MAX_JSON_STRUCTURE:
        raise RequestError(
            "body",
            f"The JSON body holds more than a request's fields (over {MAX_JSON_STRUCTURE:,} "
            "bytes outside its strings).",
            400,
        )
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError("body", "The body is not valid JSON.", 400) from None
    if not isinstance(fields, dict):
        raise RequestError("body", "The JSON body must be an object of fields.", 400)
    return {name: fields[name] for name in REQUEST_FIELDS if name in fields}


async def _form_fields(request: Any, limit: int) -> tuple[dict[str, Any], bytes | None]:
    """A form's text fields and its uploaded image's bytes (Starlette parses the form)."""
    try:
        form = await request.form(max_files=1, max_fields=32, max_part_size=limit + 1)
    except Exception:  # noqa: BLE001 - a malformed or oversized form, in Starlette's words
        raise RequestError(
            "body", "The form could not be read (malformed or too large).", 400
        ) from None
    if len(form.getlist("image")) > 1:  # a text field and an upload of one name, or two
        raise RequestError("image", "Give one image: an upload, an image field or a url.", 400)
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        return fields, None
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise RequestError("image", f"The image is larger than the {limit / 1e6:g} MB limit.", 413)
    return fields, data


def _image_source(fields: dict[str, Any], upload: bytes | None, limit: int) -> Any:
    """The uploaded bytes, base64 bytes, a data: URL's bytes, or the http(s) URL."""
    given = [name for name in ("image", "url") if fields.get(name)] + (
        ["upload"] if upload is not None else []
    )
    if len(given) > 1:
        raise RequestError("image", "Give one image: an upload, an image field or a url.", 400)
    if upload is not None:
        data = upload
    elif fields.get("image"):
        data = _base64_image(fields["image"], limit)
    elif fields.get("url"):
        url = fields["url"]
        if url.lower().startswith("data:"):
            return _base64_image(url, limit)
        try:
            check_url(url)
        except InputError as error:
            raise RequestError("url", str(error), 400) from None
        return url
    else:
        raise RequestError(
            "image",
            "No image: upload one as 'image', or give 'image' as base64 or a data: URL, or "
            "a 'url'.",
            400,
        )
    if len(data) > limit:
        raise RequestError("image", f"The image is larger than the {limit / 1e6:g} MB limit.", 413)
    return data


def _base64_image(value: str, limit: int) -> bytes:
    """The bytes of a base64 image or a ``data:image/...;base64,`` URL."""
    text = value.strip()
    if text.lower().startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise RequestError("image", "A data: URL must be base64: data:image/png;base64,...")
    if len(text) > limit * 4 // 3 + 4:
        raise RequestError("image", f"The image is larger than the {limit / 1e6:g} MB limit.", 413)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image", "The image field is not valid base64.", 400) from None


def check_request(
    florence: FlorenceModel,
    image: Any,
    *,
    task: str | None,
    text: str | None = None,
    region: Any = None,
    prompt: str | None = None,
    parse: str | None = "text",
    num_beams: Any = 3,
    max_new_tokens: Any = 1024,
    scores: Any = False,
    max_beams: int = 8,
    max_tokens: int = 1024,
    max_text_chars: int = 4000,
) -> Job:
    """Turn the fields of a request into a checked :class:`Job`, or raise :class:`RequestError`
    naming the field at fault. ``image`` is already a loaded PIL image."""
    fields = {"text": text, "prompt": prompt, "task": task, "parse": parse}
    for field, value in fields.items():
        # A task or result kind is a name: its refusal may quote it, so it stays short.
        limit = _NAME_CHARS if field in ("task", "parse") else max_text_chars
        try:
            fields[field] = check_text(value, field, max_chars=limit)
        except SettingError as error:
            raise RequestError(field, str(error)) from None
    text = fields["text"]
    spec = _spec(fields["task"], fields["prompt"], fields["parse"] or "text")
    box = _region(region)
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
    beams = _integer(num_beams, "num_beams", max_beams)
    tokens = _integer(max_new_tokens, "max_new_tokens", max_tokens)
    try:
        check_generation_settings(beams, tokens)
        check_prompt_lengths(florence, [build_prompt(spec, image.size, text, box)], tokens)
    except TaskInputError as error:
        field = "max_new_tokens" if "max_new_tokens" in str(error) else "text"
        field = "num_beams" if str(error).startswith("num_beams") else field
        raise RequestError(field, str(error)) from None
    settings = (("max_new_tokens", tokens), ("num_beams", beams), ("scores", _flag(scores)))
    return Job(image=image, spec=spec, text=text, region=box, settings=settings)


_NAME_CHARS = 100  # the longest task name, <REFERRING_EXPRESSION_SEGMENTATION>, has 35


def _spec(task: str | None, prompt: str | None, parse: str) -> Any:
    task = task if task not in ("", None) else None
    prompt = prompt if prompt not in ("", None) else None
    if (task is None) == (prompt is None):
        raise RequestError("task", "Give a task (e.g. CAPTION) or a prompt, not both or neither.")
    if prompt is not None:
        try:
            return custom_task(prompt, result=parse)
        except ValueError as error:
            raise RequestError("parse", str(error)) from None
    try:
        return task_spec(task)
    except UnknownTaskError as error:
        raise RequestError("task", str(error), 400) from None


def _region(value: Any) -> tuple[float, ...] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, list | tuple):
        raise RequestError("region", f"A region is four numbers x1, y1, x2, y2, got {value!r}.")
    try:
        numbers = tuple(_number(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(
            "region", f"A region is four numbers x1, y1, x2, y2 in pixels, got {value!r:.80}."
        ) from None
    if len(numbers) != 4:
        raise RequestError(
            "region", f"A region is four numbers x1, y1, x2, y2 in pixels, got {len(numbers)}."
        )
    return numbers


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(value)
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(value)
    return number


def _integer(value: Any, field: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RequestError(field, f"{field} must be a whole number, got {value!r:.40}.")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(field, f"{field} must be a whole number, got {value!r:.40}.") from None
    if not number.is_integer():
        raise RequestError(field, f"{field} must be a whole number, got {value!r:.40}.")
    if number > maximum:
        raise RequestError(field, f"{field} must be at most {maximum} here, got {value!r:.40}.")
    return int(number)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise RequestError("scores", f"scores must be true or false, got {value!r:.40}.")
