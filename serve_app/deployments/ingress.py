"""The HTTP ingress and the Python API: parse requests, admit them, call the graph, map errors.

It owns HTTP and nothing else; every pixel operation happens in the other deployments. Who may
call is decided here, before a body is read: an API key with the route's scope, within its rate
limits (``serve_app.access``). What it admits is bounded: ``max_in_flight`` requests in the graph at once (more get 503 ``overloaded``
at once, never a queue), each with a deadline of ``request_timeout_s`` that every deployment
downstream checks, and bodies that must arrive within ``body_timeout_s``.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from pathlib import Path
from typing import Awaitable, Callable, get_args

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from serve_app.access.keys import KeyRing
from serve_app.access.limits import RateLimiter
from serve_app.api import RestoreOptions, Restored, parse_options
from serve_app.config import ApiKeyConfig, AppArgs, RuntimeConfig, Scope
from serve_app.deployments.failures import typed_error
from serve_app.deployments.health import can_serve, graph_health
from serve_app.deployments.heap import freeze_heap, keep_freed_memory, memory_usage
from serve_app.deployments.logs import quiet_client_errors
from serve_app.deployments.jobs_api import JobsApi
from serve_app.deployments.request_body import (
    base64_field, image_request, json_object, raw_body, request_fields, within,
)
from serve_app.errors import (
    Draining, MethodNotAllowed, NotFound, Overloaded, RequestTimeout, RestoreError, WeightsUnavailable,
)
from serve_app.imageio import CONTENT_TYPES, encode, probe
from serve_app.metrics import count_request
from serve_app.openapi import openapi
from serve_app.video.probe import looks_like_video
from serve_app.weights import MODELS, WeightsStore

log = logging.getLogger("ray.serve")
PUBLIC, ANY_KEY = "public", "any key"  # what a route asks of its caller, besides a scope
_PAGE = (Path(__file__).parent.parent / "web" / "index.html").read_text()


def _listening_on() -> str:
    """The host Serve's HTTP proxies bind, as the controller holds it."""
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config.host


@serve.deployment
class Ingress:
    def __init__(self, args: AppArgs, preprocess: DeploymentHandle, upscaler: DeploymentHandle,
                 faces: DeploymentHandle, jobs_consumer: DeploymentHandle | None = None):
        keep_freed_memory()
        quiet_client_errors()
        # The GPU deployments' handles serve health and stats only; requests go through the CPU deployment.
        self.args, self.store, self.runtime = args, WeightsStore(args.weights), RuntimeConfig()
        self.preprocess, self.upscaler, self.faces = preprocess, upscaler, faces
        # path -> method -> (handler, the scope its caller's key needs: PUBLIC, ANY_KEY or a scope)
        self.routes: dict[str, dict[str, tuple[Callable[[Request], Awaitable[Response]], str]]] = {
            "/v1/restore": {"POST": (self._http_restore, "restore")},
            "/inference": {"POST": (self._http_legacy_inference, "restore")},
            "/v1/models": {"GET": (self._http_models, ANY_KEY)},
            "/v1/stats": {"GET": (self._http_stats, "admin")},
            "/healthz": {"GET": (self._http_healthz, PUBLIC)}, "/readyz": {"GET": (self._http_readyz, PUBLIC)},
            "/openapi.json": {"GET": (self._http_openapi, PUBLIC)}, "/": {"GET": (self._http_page, PUBLIC)}}
        self.keys = KeyRing(args.auth, _listening_on())  # refuses to serve beyond localhost without keys
        # Limits shared through the job queue's Redis where there is one.
        self.limiter = RateLimiter(args.jobs.broker_url)
        # Jobs need a broker: restore-serve starts one and sets args.jobs.broker_url.
        self.jobs = JobsApi(args, self._check_models) if args.jobs.broker_url else None
        self.in_flight = 0  # requests of this replica inside the graph now
        # model -> (why, until when): models a GPU replica said it cannot load, refused here at
        # once until its next background retry
        self.missing: dict[str, tuple[str, float]] = {}
        self._offered = [*args.upscalers, *args.face_models]
        self._anonymous = ApiKeyConfig(name="anonymous", hash="sha256:" + "0" * 64, scopes=list(get_args(Scope)),
                                       rate_limit=args.auth.rate_limit)
        freeze_heap()

    def reconfigure(self, user_config: dict) -> None:
        self.runtime = RuntimeConfig.model_validate(user_config)

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        path, method, error_code = request.url.path, request.method, None
        caller = None
        try:
            handler, scope = self._route(path, method)
            if scope != PUBLIC:
                request.state.caller = caller = self._caller(request, scope)
                await self.limiter.take(caller.name, caller.rate_limit, requests=1)
            response = await handler(request)
        except Exception as exc:  # noqa: BLE001  (the one place errors become HTTP answers)
            error = typed_error(exc)
            if not isinstance(error, RestoreError):
                log.error("%s %s failed", method, path, exc_info=exc)  # a fault: its traceback
                response = JSONResponse({"error": "internal", "detail": "internal error; see the server log"}, 500)
            else:
                error_code = error.code
                response = JSONResponse(error.to_json(), error.status, headers=error.headers())
        elapsed_ms = (time.perf_counter() - started) * 1e3
        count_request(self._route_name(path), response.status_code, getattr(request.state, "model", ""))
        response.headers["x-timing-total-ms"] = f"{elapsed_ms:.1f}"  # in the graph: client and proxy aside
        # One line a request (Serve's own access log is off; its JSON log adds the request id);
        # health checks only at DEBUG.
        level = logging.DEBUG if path in ("/healthz", "/readyz") else \
            logging.INFO if response.status_code < 500 else logging.WARNING
        log.log(level, "%s %s %d%s %.1f ms%s", method, path, response.status_code,
                f" {error_code}" if error_code else "", elapsed_ms, f" key={caller.name}" if caller else "",
                extra={"status": response.status_code, "error_code": error_code,
                       "api_key": caller.name if caller else None})
        return response

    def _route(self, path: str, method: str) -> tuple[Callable[[Request], Awaitable[Response]], str]:
        if path == "/v1/jobs" or path.startswith("/v1/jobs/"):
            return (lambda request: self._http_jobs(request, path)), "jobs"
        methods = self.routes.get(path)
        if methods is None:
            raise NotFound(f"no route {path}")
        if method not in methods:
            raise MethodNotAllowed(f"{path} takes {', '.join(methods)}, not {method}", tuple(methods))
        return methods[method]

    def _route_name(self, path: str) -> str:
        """The route a path took, ids left out, for the metrics' labels: a bounded set."""
        if path in self.routes or path == "/v1/jobs":
            return path
        parts = path.split("/")  # "", "v1", "jobs", id, then cancel or result
        if parts[:3] == ["", "v1", "jobs"] and (len(parts) == 4 or len(parts) == 5 and parts[4] in ("cancel", "result")):
            return "/".join(["/v1/jobs/{id}", *parts[4:]])
        return "other"

    def _caller(self, request: Request, scope: str) -> ApiKeyConfig:
        """The key the request carries, holding ``scope``; with no keys configured (localhost, or
        ``auth.required: false``), everyone is one caller, ``anonymous``, under ``auth.rate_limit``."""
        key = self.keys.caller(request.headers.get("authorization"), None if scope == ANY_KEY else scope)
        if key is None:
            return self._anonymous
        return key if key.rate_limit else key.model_copy(update={"rate_limit": self.args.auth.rate_limit})

    async def _charge_pixels(self, request: Request, data: bytes | None) -> None:
        """Take an upload's pixels from its caller's pixel bucket, from the header alone."""
        caller = request.state.caller
        # a video job is bounded by the video limits instead (docs/security.md)
        if data and caller.rate_limit.pixels_per_s and not looks_like_video(data):
            limits = self.runtime.limits
            pixels = probe(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels).pixels
            await self.limiter.take(caller.name, caller.rate_limit, pixels=pixels)

    async def _http_restore(self, request: Request) -> Response:
        self._check_room()  # before reading a body that would be refused anyway
        data, values, wants_json = await within(self.runtime.body_timeout_s,
                                                image_request(request, self.runtime.limits))
        options = parse_options(values)
        request.state.model = options.upscaler or "none"
        self._check_models(options)  # before the caller's pixels are charged
        await self._charge_pixels(request, data)
        result = await self._in_graph(options, lambda deadline: self.preprocess.restore_bytes.remote(
            data, options, deadline))
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
        self._check_room()
        document = json_object(await within(self.runtime.body_timeout_s, raw_body(request, self.runtime.limits)))
        data = base64_field(document.get("img_str"), "img_str")
        options = parse_options({"format": "png"})
        request.state.model = options.upscaler
        self._check_models(options)
        await self._charge_pixels(request, data)
        result = await self._in_graph(options, lambda deadline: self.preprocess.restore_bytes.remote(
            data, options, deadline))
        return JSONResponse(base64.b64encode(result.data).decode())

    async def _http_jobs(self, request: Request, path: str) -> Response:
        if self.jobs is None:
            raise NotFound("jobs are off: args.jobs.broker_url is unset (restore-serve sets it)")

        async def read_submit():
            self._check_room()
            limits = self.runtime.limits
            data, values, _ = await within(self.runtime.body_timeout_s, request_fields(request, limits))
            await self._charge_pixels(request, data)
            return data, values, limits

        caller = request.state.caller  # with no keys, everyone is the one anonymous caller and sees all
        keyed = caller is not self._anonymous
        return await self.jobs.http(request, [p for p in path[len("/v1/jobs"):].split("/") if p], read_submit,
                                    owner=caller.name if keyed else None,
                                    sees_all=not keyed or "admin" in caller.scopes)

    async def _http_models(self, request: Request) -> Response:
        offered = set(self.args.upscalers) | set(self.args.face_models)
        return JSONResponse({"models": [
            {"name": spec.name, "kind": spec.kind, "scale": spec.scale, "offered": spec.name in offered,
             "description": spec.description, **self.store.status(spec)}
            for spec in MODELS.values()
        ]})

    async def _http_healthz(self, request: Request) -> Response:
        """Liveness: 200 while the graph can serve at least one model (and while it drains: the
        process is alive and finishing its work); 503 with why otherwise."""
        body = await graph_health(self.upscaler, self.faces, self.preprocess, self._offered)
        short = {k: v for k, v in body.items() if k in ("status", "detail")}
        if self.runtime.draining and can_serve(body):
            short["status"] = "draining"
        return JSONResponse(short, 200 if can_serve(body) else 503)

    async def _http_readyz(self, request: Request) -> Response:
        """Readiness: each offered model, loaded or not and why, the devices and the deployments
        not healthy; 503 only while nothing can be served, or while draining."""
        if self.runtime.draining:
            return JSONResponse({"status": "draining", "in_flight": self.in_flight}, 503)
        body = await graph_health(self.upscaler, self.faces, self.preprocess, self._offered)
        return JSONResponse(body, 200 if can_serve(body) else 503)

    async def _http_openapi(self, request: Request) -> Response:
        return JSONResponse(openapi())

    async def _http_page(self, request: Request) -> Response:
        """The web page: static, and public (its calls carry the key the user types into it)."""
        return HTMLResponse(_PAGE, headers={"x-content-type-options": "nosniff", "x-frame-options": "DENY",
                                            "cache-control": "no-cache"})

    async def _http_stats(self, request: Request) -> Response:
        """What the replicas report of themselves: this ingress replica, and one of each other
        deployment, as Serve routes."""
        up, face, cpu = await asyncio.gather(self.upscaler.stats.remote(), self.faces.stats.remote(),
                                             self.preprocess.stats.remote())
        body = {"upscaler": up, "faces": face, "preprocess": cpu,
                "ingress": {"pid": os.getpid(), "in_flight": self.in_flight, "memory": memory_usage()}}
        return Response(json.dumps(body, default=str), media_type="application/json")  # numpy numbers, paths

    # ------------------------------------------------------------------ Python API
    async def restore(self, image: np.ndarray | bytes, **options) -> Restored:
        """Restore an array (as decode() returns it) or encoded bytes; the options of /v1/restore.

        From any Ray task or actor::

            handle = serve.get_app_handle("restore")
            result = handle.restore.remote(pixels, model="RealESRGAN_x4plus", face_enhance=True).result()
        """
        try:
            parsed = parse_options({k: v for k, v in options.items() if k not in ("format", "quality")})
            self._check_models(parsed)
            return await self._in_graph(parsed, lambda deadline: self.preprocess.restore_array.remote(
                image, parsed, deadline))
        except Exception as exc:  # noqa: BLE001  callers get our typed errors, as over HTTP
            error = typed_error(exc)
            raise error if isinstance(error, RestoreError) else exc

    async def submit_job(self, image: np.ndarray | bytes | None = None, *, image_url: str | None = None,
                         webhook: str | None = None, idempotency_key: str | None = None, **options) -> dict:
        """Queue a job (an array, encoded bytes or an image_url; the options of /v1/restore) and
        return it as GET /v1/jobs/{id} shows it; then ``get_job`` or ``cancel_job`` by its id."""
        data = image
        if isinstance(image, np.ndarray):
            data = await asyncio.to_thread(lambda: encode(image, "png"))
        values = {**options, **({"image_url": image_url} if image_url else {}),
                  **({"webhook": webhook} if webhook else {})}
        return (await self._jobs_call(self._require_jobs().submit, data, values, self.runtime.limits,
                                      idempotency_key))[0]

    async def get_job(self, job_id: str) -> dict:
        return await self._jobs_call(self._require_jobs().get, job_id)

    async def cancel_job(self, job_id: str) -> dict:
        return await self._jobs_call(self._require_jobs().cancel, job_id)

    async def list_jobs(self, status: str | None = None, cursor: str | None = None, limit: int = 50) -> dict:
        return await self._jobs_call(self._require_jobs().page, status, cursor, limit)

    def _require_jobs(self) -> JobsApi:
        if self.jobs is None:
            raise NotFound("jobs are off: args.jobs.broker_url is unset (restore-serve sets it)")
        return self.jobs

    async def _jobs_call(self, call, *args):
        try:
            return await call(*args)
        except Exception as exc:  # noqa: BLE001  callers get our typed errors, as over HTTP
            error = typed_error(exc)
            raise error if isinstance(error, RestoreError) else exc

    # ------------------------------------------------------------------ admission
    def _check_room(self) -> None:
        if self.runtime.draining:
            raise Draining("the service is shutting down; retry on another instance or later")
        if self.in_flight >= self.runtime.max_in_flight:
            raise Overloaded(f"this ingress replica holds {self.in_flight} requests, its limit; retry shortly")

    def _check_models(self, options: RestoreOptions) -> None:
        """Refuse a model this service does not offer, or one known to be missing, here at the
        edge: the replicas behind trust the options they are given."""
        face_model = options.face_model if options.face_enhance else None
        self.args.check_offered(upscaler=options.upscaler, face_model=face_model)
        for model in filter(None, (options.upscaler, face_model)):
            why, until = self.missing.get(model, ("", 0.0))
            if time.monotonic() < until:
                raise WeightsUnavailable(why)

    async def _in_graph(self, options: RestoreOptions, call: Callable[[float], Awaitable]):
        """``call(deadline)``'s answer, the request counted in flight meanwhile; RequestTimeout (the
        work downstream cancelled) once ``request_timeout_s`` has passed. The caller has checked
        ``options``' models (``_check_models``) before any work of its own."""
        self._check_room()
        self.in_flight += 1
        timeout = self.runtime.request_timeout_s
        response = call(time.time() + timeout)
        try:
            return await asyncio.wait_for(response, timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestTimeout() from None
        except Exception as exc:
            error = typed_error(exc)
            if isinstance(error, WeightsUnavailable) and error.model:
                self.missing[error.model] = (error.detail, time.monotonic() + self.args.weights.retry_interval_s)
            raise
        finally:
            self.in_flight -= 1
