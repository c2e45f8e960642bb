"""The HTTP ingress: parse requests, call the graph, map errors. It owns HTTP and nothing else."""
from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.api import RestoreOptions, parse_options
from serve_app.config import AppArgs
from serve_app.errors import InvalidOption, RestoreError, TooManyBytes
from serve_app.imageio import default_output_format
from serve_app.weights import MODELS, WeightsStore

log = logging.getLogger("ray.serve")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def _unwrap(exc: BaseException) -> BaseException:
    """A replica's exception arrives wrapped in a RayTaskError; its cause is the typed one."""
    return getattr(exc, "cause", None) or exc


@serve.deployment
class Ingress:
    def __init__(self, args: AppArgs, preprocess: DeploymentHandle, upscaler: DeploymentHandle,
                 faces: DeploymentHandle):
        self.args, self.store = args, WeightsStore(args.weights)
        self.preprocess, self.upscaler, self.faces = preprocess, upscaler, faces

    async def __call__(self, request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        route = {
            ("POST", "/v1/restore"): self.restore,
            ("POST", "/inference"): self.legacy_inference,
            ("GET", "/v1/models"): self.models,
            ("GET", "/healthz"): self.healthz,
        }.get((request.method, request.url.path))
        try:
            if route is None:
                response = JSONResponse({"error": "not_found", "detail": f"no route {request.url.path}"}, 404)
            else:
                response = await route(request)
        except Exception as exc:  # noqa: BLE001  (the one place errors become HTTP answers)
            response = self._error_response(_unwrap(exc), request_id)
        response.headers["x-request-id"] = request_id
        return response

    def _error_response(self, exc: BaseException, request_id: str) -> Response:
        if isinstance(exc, RestoreError):
            log.info("request %s refused: %s", request_id, exc.detail)
            return JSONResponse(exc.to_json(), exc.status)
        log.exception("request %s failed", request_id, exc_info=exc)
        return JSONResponse({"error": "internal", "detail": "internal error; see the server log"}, 500)

    async def _body(self, request: Request) -> bytes:
        """The body, refused as soon as it passes the byte limit (memory stays bounded)."""
        limit = self.args.limits.max_bytes * 4 // 3 + 4096  # room for base64 in JSON
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooManyBytes(f"the request body passes the {self.args.limits.max_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def restore(self, request: Request) -> Response:
        body = await self._body(request)
        values = dict(request.query_params)
        is_json = request.headers.get("content-type", "").startswith("application/json")
        if is_json:
            document = _json(body)
            values.update({k: v for k, v in document.items() if k != "image"})
            body = _b64(document.get("image"), "image")
        options = parse_options(values)
        image, faces, timings = await self._run(body, options)
        if is_json:
            return JSONResponse({"image": base64.b64encode(image["bytes"]).decode(), "format": image["format"],
                                 "width": image["width"], "height": image["height"], "faces": faces},
                                headers=timings)
        return Response(image["bytes"], media_type=CONTENT_TYPES[image["format"]], headers=timings)

    async def _run(self, data: bytes, options: RestoreOptions) -> tuple[dict, int, dict]:
        started = time.perf_counter()
        decoded = await self.preprocess.decode.remote(data)
        decoded_at = time.perf_counter()
        if options.face_enhance:
            upscale = options.scale or (MODELS[options.upscaler].scale if options.upscaler else 1)
            pixels, faces = await self.faces.restore.remote(
                decoded.pixels, options.face_model, options.upscaler, upscale, options.face_strength,
                options.only_center_face, options.aligned)
        elif options.upscaler is None:
            raise InvalidOption("model 'none' restores faces only: set face_enhance=true")
        else:
            pixels, faces = await self.upscaler.upscale.remote(
                decoded.pixels, options.upscaler, options.scale, options.denoise, options.alpha_upsampler), 0
        restored_at = time.perf_counter()
        fmt = options.format or default_output_format(decoded.header.format)
        encoded = await self.preprocess.encode.remote(pixels, fmt, options.quality)
        done = time.perf_counter()
        timings = {"x-timing-decode-ms": f"{(decoded_at - started) * 1e3:.1f}",
                   "x-timing-restore-ms": f"{(restored_at - decoded_at) * 1e3:.1f}",
                   "x-timing-encode-ms": f"{(done - restored_at) * 1e3:.1f}"}
        image = {"bytes": encoded, "format": fmt, "width": pixels.shape[1], "height": pixels.shape[0]}
        return image, faces, timings

    async def legacy_inference(self, request: Request) -> Response:
        """The original FastAPI deployment's contract: {"img_str", "tile", "half"} -> base64 PNG (x4)."""
        document = _json(await self._body(request))
        data = _b64(document.get("img_str"), "img_str")
        image, _, _ = await self._run(data, parse_options({"format": "png"}))
        return JSONResponse(base64.b64encode(image["bytes"]).decode())

    async def models(self, request: Request) -> Response:
        offered = set(self.args.upscalers) | set(self.args.face_models)
        return JSONResponse({"models": [
            {"name": spec.name, "kind": spec.kind, "scale": spec.scale, "offered": spec.name in offered,
             "description": spec.description, **self.store.status(spec)}
            for spec in MODELS.values()
        ]})

    async def healthz(self, request: Request) -> Response:
        try:
            up = await self.upscaler.status.remote()
            faces = await self.faces.status.remote()
        except Exception as exc:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "detail": str(_unwrap(exc))}, 503)
        return JSONResponse({"status": "ok", "load_failures": {**up["failures"], **faces["failures"]}})


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
