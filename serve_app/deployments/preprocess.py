"""CPU deployment: all of a request's work besides the networks.

Header limits and the one decode; cutting tiles and stitching them back; pasting faces; the one
encode. Everything it runs is numpy and OpenCV (``serve_app.imageio``, ``serve_app.cpu``): the
process never imports torch. Several of these replicas run beside each GPU replica, so this
work is spread over the node's cores while the GPU replicas only feed their GPU, and the
ingress never handles pixels.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.api import Restored, RestoreOptions
from serve_app.config import AppArgs, RuntimeConfig
from serve_app.cpu.paste import face_canvas, paste_faces, to_bgr8
from serve_app.cpu.tiles import TilePlanner
from serve_app.deployments.failures import typed_error
from serve_app.deployments.heap import freeze_heap, keep_freed_memory
from serve_app.deployments.logs import quiet_client_errors
from serve_app.deployments.threads import Workers
from serve_app.errors import InvalidOption, RequestTimeout, RestoreError, TooManyPixels
from serve_app.imageio import check_array, decode, default_output_format, encode
from serve_app.imageio.codec import mode_of
from serve_app.weights import get_spec


@dataclass
class Encoded:
    """A restored picture as the HTTP answer carries it."""

    data: bytes
    format: str
    width: int
    height: int
    faces: int
    timings_ms: dict[str, float]


@serve.deployment
class PreprocessDeployment:
    def __init__(self, args: AppArgs, upscaler: DeploymentHandle, faces: DeploymentHandle):
        keep_freed_memory()  # each request's buffers reuse the last one's pages
        quiet_client_errors()
        self.args, self.upscaler, self.faces = args, upscaler, faces
        self.runtime = RuntimeConfig()
        self.workers = Workers(cpu_threads=self.runtime.cpu_threads, device_lanes=0)
        # Parallelism comes from replicas and their threads; OpenCV's own pool would oversubscribe.
        cv2.setNumThreads(1)
        freeze_heap()

    def reconfigure(self, user_config: dict) -> None:
        runtime = RuntimeConfig.model_validate(user_config)
        if runtime.cpu_threads != self.runtime.cpu_threads:
            self.workers = Workers(cpu_threads=runtime.cpu_threads, device_lanes=0)
        self.runtime = runtime

    def ping(self) -> bool:
        return True

    async def restore_bytes(self, data: bytes, options: RestoreOptions, deadline: float | None = None) -> Encoded:
        try:
            _check_deadline(deadline)
            timings: dict[str, float] = {}
            with _timed(timings, "decode"):
                decoded = await self.workers.cpu(decode, data, max_bytes=self.runtime.limits.max_bytes,
                                                 max_pixels=self.runtime.limits.max_pixels)
            result = await self._restore(decoded.pixels, options, timings, deadline)
            fmt = options.format or default_output_format(decoded.header.format)
            with _timed(timings, "encode"):
                encoded = await self.workers.cpu(encode, result.pixels, fmt, quality=options.quality,
                                                 helper=self.workers.cpu_pool)  # a free thread takes half
            return Encoded(encoded, fmt, result.width, result.height, result.faces, timings)
        except Exception as exc:  # noqa: BLE001  a lost GPU replica is named here, where it is seen
            raise _typed(exc) from None

    async def restore_array(self, image: np.ndarray | bytes, options: RestoreOptions,
                            deadline: float | None = None) -> Restored:
        try:
            _check_deadline(deadline)
            limits = self.runtime.limits
            if isinstance(image, (bytes, bytearray)):
                pixels = (await self.workers.cpu(decode, bytes(image), max_bytes=limits.max_bytes,
                                                 max_pixels=limits.max_pixels)).pixels
            else:
                pixels = check_array(image, max_pixels=limits.max_pixels)
            return await self._restore(pixels, options, {}, deadline)
        except Exception as exc:  # noqa: BLE001
            raise _typed(exc) from None

    async def _restore(self, pixels: np.ndarray, options: RestoreOptions, timings: dict,
                       deadline: float | None) -> Restored:
        scale = options.scale
        out_pixels = int(pixels.shape[0] * scale) * int(pixels.shape[1] * scale)
        if out_pixels > self.runtime.limits.max_output_pixels:
            raise TooManyPixels(f"the result would be {out_pixels} pixels; the limit is "
                                f"{self.runtime.limits.max_output_pixels}")
        self.args.check_offered(upscaler=options.upscaler,  # before any work goes to a GPU replica
                                face_model=options.face_model if options.face_enhance else None)
        with _timed(timings, "restore"):
            if options.face_enhance:
                out, faces = await self._faces(pixels, options, timings, deadline)
            elif options.upscaler is None:
                raise InvalidOption("model 'none' restores faces only: set face_enhance=true")
            else:
                out, faces = await self._upscale(pixels, options, timings, deadline), 0
        return Restored(out, out.shape[1], out.shape[0], mode_of(out), faces, timings)

    async def _upscale(self, pixels: np.ndarray, options: RestoreOptions, timings: dict,
                       deadline: float | None) -> np.ndarray:
        model = options.upscaler
        planner = TilePlanner(get_spec(model).scale, self.runtime.tile)
        with _timed(timings, "tiles"):
            job = await self.workers.cpu(planner.prepare, pixels, scale=options.scale,
                                         alpha_upsampler=options.alpha_upsampler)
        outputs = await self.upscaler.forward.remote(model, options.denoise, np.stack(job.inputs()), deadline)
        with _timed(timings, "stitch"):
            return await self.workers.cpu(planner.finish, job, list(outputs))

    async def _faces(self, pixels: np.ndarray, options: RestoreOptions, timings: dict,
                     deadline: float | None) -> tuple[np.ndarray, int]:
        work = await self.workers.cpu(to_bgr8, pixels)
        faces = asyncio.ensure_future(self.faces.restore.remote(
            work, options.face_model, options.face_strength, options.only_center_face, options.aligned, deadline))
        # The canvas needs no face: it is made (the background through the upscaler) while the
        # faces are restored, and only the pasting waits for them. A face request the face
        # replica refuses (its weights missing, say) stops the background at once.
        steps = [faces]
        if not options.aligned:
            steps.append(asyncio.ensure_future(self._canvas(pixels, options, timings, deadline)))
        try:
            await asyncio.wait(steps, return_when=asyncio.FIRST_EXCEPTION)
            for step in steps:
                if step.done() and step.exception() is not None:
                    raise step.exception()
            (found, restored, masks), *canvas = await asyncio.gather(*steps)
        finally:
            for step in steps:  # after a failure or our own cancellation, nothing goes on without us
                step.cancel()
        with _timed(timings, "paste"):
            result = await self.workers.cpu(paste_faces, pixels, found, restored, masks, scale=options.scale,
                                            aligned=options.aligned, canvas=canvas[0] if canvas else None)
        return result.image, result.faces_restored

    async def _canvas(self, pixels: np.ndarray, options: RestoreOptions, timings: dict,
                      deadline: float | None) -> np.ndarray:
        background = None
        if options.upscaler is not None:
            background = await self._upscale(pixels, options, timings, deadline)
        with _timed(timings, "canvas"):
            return await self.workers.cpu(face_canvas, pixels, scale=options.scale, background=background)


def _check_deadline(deadline: float | None) -> None:
    """Refuse a request that spent its whole time in queues before reaching this replica."""
    if deadline is not None and time.time() >= deadline:
        raise RequestTimeout("the request spent the service's whole request timeout in queues")


def _typed(exc: BaseException) -> BaseException:
    error = typed_error(exc)
    return error if isinstance(error, RestoreError) else exc


@contextmanager
def _timed(timings: dict[str, float], name: str):
    started = time.perf_counter()
    yield
    timings[name] = (time.perf_counter() - started) * 1e3
