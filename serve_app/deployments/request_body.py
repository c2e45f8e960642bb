"""Reading a request's body in the ingress: bounded in bytes and in time.

A body is refused as soon as it passes the byte limit (memory stays bounded), and a client that
sends it too slowly gets ``body_timeout`` when ``body_timeout_s`` has passed, so a thousand
clients trickling a byte a second cannot hold the ingress's slots. The whole body is one
deadline rather than a minimum rate: it bounds a slot's time whatever the client's pattern.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from serve_app.config import LimitsConfig
from serve_app.errors import BodyTimeout, InvalidOption, TooManyBytes


async def within(timeout_s: float, reading):
    """``await reading``, or BodyTimeout when the client takes longer than ``timeout_s``."""
    try:
        return await asyncio.wait_for(reading, timeout_s)
    except asyncio.TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None


async def image_request(request: Request, limits: LimitsConfig) -> tuple[bytes, dict, bool]:
    """(image bytes, options, wants JSON) from a raw, multipart or JSON body."""
    data, values, kind = await request_fields(request, limits)
    if data is None and kind == "multipart":
        raise InvalidOption("the multipart form needs the image file in field 'image'")
    if data is None and kind == "json":
        raise InvalidOption("JSON field 'image' must hold the base64 image")
    return data or b"", values, kind == "json"


async def request_fields(request: Request, limits: LimitsConfig) -> tuple[bytes | None, dict, str]:
    """(the image bytes or None, the other fields, the body's kind: "multipart", "json" or "raw")
    from the query string and a raw, multipart or JSON body. A job may leave the image out for
    an ``image_url``."""
    values = dict(request.query_params)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        _body_limit(request, limits, length_required=True)  # the form parser reads the rest itself
        try:
            form = await request.form(max_files=1, max_fields=32)
        except MultiPartException as exc:  # a malformed form: the client's error, never ours
            raise InvalidOption(f"the multipart body is malformed: {exc.message}") from None
        upload = form.get("image")
        values.update({k: v for k, v in form.items() if k != "image" and isinstance(v, str)})
        return (await upload.read() if isinstance(upload, UploadFile) else None), values, "multipart"
    body = await raw_body(request, limits)
    if content_type.startswith("application/json"):
        document = json_object(body)
        values.update({k: v for k, v in document.items() if k != "image"})
        return (base64_field(document["image"], "image") if "image" in document else None), values, "json"
    return body or None, values, "raw"


async def raw_body(request: Request, limits: LimitsConfig) -> bytes:
    """The body, refused as soon as it passes the byte limit."""
    limit = _body_limit(request, limits)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooManyBytes(f"the request body passes the {limits.max_bytes}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _body_limit(request: Request, limits: LimitsConfig, *, length_required: bool = False) -> int:
    """The most body bytes accepted; refuses a declared length beyond it before reading any."""
    limit = limits.max_bytes * 4 // 3 + 4096  # room for base64 or multipart framing
    declared = request.headers.get("content-length", "")
    if length_required and not declared.isdigit():
        raise InvalidOption("a multipart upload needs a Content-Length header")
    if declared.isdigit() and int(declared) > limit:
        raise TooManyBytes(f"the request body is {declared} bytes; the limit is {limits.max_bytes}")
    return limit


def json_object(body: bytes) -> dict:
    try:
        document = json.loads(body)
    except ValueError:
        raise InvalidOption("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidOption("the JSON body must be an object")
    return document


def base64_field(value, field: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidOption(f"JSON field {field!r} must hold the base64 image")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidOption(f"JSON field {field!r} is not valid base64") from None
