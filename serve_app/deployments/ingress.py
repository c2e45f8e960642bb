"""The HTTP ingress and the Python API: parse requests, call the graph, map errors.

It owns HTTP and nothing else; every pixel operation happens in the other deployments.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.api import Restored, parse_options
from serve_app.config import AppArgs, RuntimeConfig
from serve_app.deployments.failures import typed_error
from serve_app.deployments.heap import freeze_heap, keep_freed_memory
from serve_app.errors import InvalidOption, Overloaded, RestoreError, TooManyBytes
from serve_app.weights import MODELS, WeightsStore

log = logging.getLogger("ray.serve")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@serve.deployment
class Ingress:
    def __init__(self, args: AppArgs, preprocess: DeploymentHandle, upscaler: DeploymentHandle,
                 faces: DeploymentHandle):
        keep_freed_memory()
        # The GPU deployments' handles serve /healthz only; requests go through the CPU deployment.
        self.args, self.store, self.runtime = args, WeightsStore(args.weights), RuntimeConfig()
        self.preprocess, self.upscaler, self.faces = preprocess, upscaler, faces
        freeze_heap()

    def reconfigure(self, user_config: dict) -> None:
        self.runtime = RuntimeConfig.model_validate(user_config)

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        route = {
            ("POST", "/v1/restore"): self._http_restore,
            ("POST", "/inference"): self._http_legacy_inference,
            ("GET", "/v1/models"): self._http_models,
            ("GET", "/healthz"): self._http_healthz,
        }.get((request.method, request.url.path))
        started = time.perf_counter()
        try:
            if route is None:
                response = JSONResponse({"error": "not_found", "detail": f"no route {request.url.path}"}, 404)
            else:
                response = await route(request)
        except Exception as exc:  # noqa: BLE001  (the one place errors become HTTP answers)
            response = self._error_response(typed_error(exc), request_id)
        elapsed_ms = (time.perf_counter() - started) * 1e3
        response.headers["x-request-id"] = request_id
        response.headers["x-timing-total-ms"] = f"{elapsed_ms:.1f}"  # in the graph: client and proxy aside
        log.info("request %s %s %s -> %d in %.1f ms", request_id, request.method, request.url.path,
                 response.status_code, elapsed_ms,
                 extra={"request_id": request_id, "status": response.status_code})
        return response

    def _error_response(self, exc: BaseException, request_id: str) -> Response:
        if isinstance(exc, RestoreError):
            log.info("request %s refused: %s %s", request_id, exc.code, exc.detail)
            headers = {"retry-after": "1"} if isinstance(exc, Overloaded) else None
            return JSONResponse(exc.to_json(), exc.status, headers=headers)
        log.error("request %s failed", request_id, exc_info=exc)
        return JSONResponse({"error": "internal", "detail": "internal error; see the server log"}, 500)

    def _body_limit(self, request: Request, *, length_required: bool = False) -> int:
        """The most body bytes accepted; refuses a declared length beyond it before reading any."""
        limit = self.runtime.limits.max_bytes * 4 // 3 + 4096  # room for base64 or multipart framing
        declared = request.headers.get("content-length", "")
        if length_required and not declared.isdigit():
            raise InvalidOption("a multipart upload needs a Content-Length header")
        if declared.isdigit() and int(declared) > limit:
            raise TooManyBytes(f"the request body is {declared} bytes; the limit is {self.runtime.limits.max_bytes}")
        return limit

    async def _body(self, request: Request) -> bytes:
        """The body, refused as soon as it passes the byte limit (memory stays bounded)."""
        limit = self._body_limit(request)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooManyBytes(f"the request body passes the {self.runtime.limits.max_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _read_request(self, request: Request) -> tuple[bytes, dict, bool]:
        """(image bytes, options, wants JSON) from a raw, multipart or JSON body."""
        values = dict(request.query_params)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            self._body_limit(request, length_required=True)  # the form parser reads the rest itself
            form = await request.form(max_files=1, max_fields=32)
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise InvalidOption("the multipart form needs the image file in field 'image'")
            values.update({k: v for k, v in form.items() if k != "image" and isinstance(v, str)})
            return await upload.read(), values, False
        body = await self._body(request)
        if content_type.startswith("application/json"):
            document = _json(body)
            values.update({k: v for k, v in document.items() if k != "image"})
            return _b64(document.get("image"), "image"), values, True
        return body, values, False

    async def _http_restore(self, request: Request) -> Response:
        data, values, wants_json = await self._read_request(request)
        options = parse_options(values)
        result = await self._with_timeout(self.preprocess.restore_bytes.remote(data, options))
        headers = {f"x-timing-{k}-ms": f"{v:.1f}" for k, v in result.timings_ms.items()}
        headers["x-faces-restored"] = str(result.faces)
        if wants_json:
            return JSONResponse({"image": base64.b64encode(result.data).decode(), "format": result.format,
                                 "width": result.width, "height": result.height, "faces": result.faces},
                                headers=headers)
        return Response(result.data, media_type=CONTENT_TYPES[result.format], headers=headers)

    async def _http_legacy_inference(self, request: Request) -> Response:
        """The original FastAPI deployment's contract: {"img_str", "tile", "half"} -> base64 PNG (x4).

        ``tile`` and ``half`` are accepted and ignored: tiling and precision are the service's own.
        """
        document = _json(await self._body(request))
        data = _b64(document.get("img_str"), "img_str")
        result = await self._with_timeout(self.preprocess.restore_bytes.remote(data, parse_options({"format": "png"})))
        return JSONResponse(base64.b64encode(result.data).decode())

    async def _http_models(self, request: Request) -> Response:
        offered = set(self.args.upscalers) | set(self.args.face_models)
        return JSONResponse({"models": [
            {"name": spec.name, "kind": spec.kind, "scale": spec.scale, "offered": spec.name in offered,
             "description": spec.description, **self.store.status(spec)}
            for spec in MODELS.values()
        ]})

    async def _http_healthz(self, request: Request) -> Response:
        """200 only when every deployment answers and every offered model is loaded."""
        try:
            up, faces, _ = await asyncio.wait_for(asyncio.gather(
                self.upscaler.stats.remote(), self.faces.stats.remote(), self.preprocess.ping.remote()), 10)
        except Exception as exc:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "detail": str(typed_error(exc))}, 503)
        failures = {**up["failures"], **faces["failures"]}
        if failures:
            return JSONResponse({"status": "degraded", "detail": "some models are not loaded",
                                 "models": failures}, 503)
        return JSONResponse({"status": "ok", "devices": {"upscaler": up["device"], "faces": faces["device"]}})

    # ------------------------------------------------------------------ Python API
    async def restore(self, image: np.ndarray | bytes, **options) -> Restored:
        """Restore an array (as decode() returns it) or encoded bytes; the options of /v1/restore.

        From any Ray task or actor::

            handle = serve.get_app_handle("restore")
            result = handle.restore.remote(pixels, model="RealESRGAN_x4plus", face_enhance=True).result()
        """
        try:
            parsed = parse_options({k: v for k, v in options.items() if k not in ("format", "quality")})
            return await self._with_timeout(self.preprocess.restore_array.remote(image, parsed))
        except Exception as exc:  # noqa: BLE001  callers get our typed errors, as over HTTP
            error = typed_error(exc)
            raise error if isinstance(error, RestoreError) else exc

    async def _with_timeout(self, response):
        """The graph's answer, or RequestTimeout (the work is cancelled) past the request timeout."""
        try:
            return await asyncio.wait_for(response, self.runtime.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise


def _json(body: bytes) -> dict:
    try:
        document = json.loads(body)
    except ValueError:
        raise InvalidOption("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidOption("the JSON body must be an object")
    return document


def _b64(value, field: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidOption(f"JSON field {field!r} must hold the base64 image")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidOption(f"JSON field {field!r} is not valid base64") from None
