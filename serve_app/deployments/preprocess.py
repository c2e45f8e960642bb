"""CPU deployment: all of a request's work besides the networks.

Header limits and the one decode; cutting tiles and stitching them back; pasting faces; the one
encode. Everything it runs is numpy and OpenCV (``serve_app.imageio``, ``serve_app.cpu``): the
process never imports torch. Several of these replicas run beside each GPU replica, so this
work is spread over the node's cores while the GPU replicas only feed their GPU, and the
ingress never handles pixels.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.api import Restored, RestoreOptions
from serve_app.config import AppArgs, RuntimeConfig
from serve_app.cpu.restore import restore, timed
from serve_app.deployments.failures import typed_error
from serve_app.deployments.heap import freeze_heap, keep_freed_memory, memory_usage
from serve_app.deployments.logs import quiet_client_errors
from serve_app.deployments.threads import Workers
from serve_app.errors import Overloaded, RequestTimeout, RestoreError
from serve_app.imageio import Metadata, check_array, decode, default_output_format, encode, probe
from serve_app.metrics import observe_steps
from serve_app.video.pipeline import Segment, Stopped, VideoOutput, encode_segment


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
        self.args, self.networks = args, _GpuDeployments(upscaler, faces)
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

    def stats(self) -> dict:
        return {"pid": os.getpid(), "memory": memory_usage()}

    async def restore_bytes(self, data: bytes, options: RestoreOptions, deadline: float | None = None) -> Encoded:
        try:
            _check_deadline(deadline)
            timings: dict[str, float] = {}
            limits = self.runtime.limits
            with timed(timings, "decode"):
                # the output's size checked from the header, before any pixel is decoded
                header = probe(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
                options = options.fitted(*header.upright_size, limits.max_output_pixels)
                decoded = await self.workers.cpu(decode, data, max_bytes=limits.max_bytes,
                                                 max_pixels=limits.max_pixels, header=header)
            result = await self._restore(decoded.pixels, options, timings, deadline)
            fmt = options.format or default_output_format(header.format)
            metadata = Metadata.carried(header.icc, header.exif) if options.keep_metadata else None
            with timed(timings, "encode"):
                encoded = await self.workers.cpu(encode, result.pixels, fmt, quality=options.quality,
                                                 helper=self.workers.cpu_pool,  # a free thread takes half
                                                 metadata=metadata)
            observe_steps(timings, result.faces)
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
            result = await self._restore(pixels, options, {}, deadline)
            observe_steps(result.timings_ms, result.faces)
            return result
        except Exception as exc:  # noqa: BLE001
            raise _typed(exc) from None

    async def restore_video_segment(self, segment: Segment, data: bytes, options: RestoreOptions,
                                    output: VideoOutput, size: tuple[int, int], window: int, party: str):
        """One segment of a video job (``data`` its file's bytes), as a stream: every half second
        the frames encoded since the last item, then the segment's encoding as bytes. Its frames
        go through this replica's restoration, so their tiles join the GPU's batches, taking
        turns there as ``party`` (the job) beside still pictures."""
        loop, stop = asyncio.get_running_loop(), threading.Event()
        encoded: asyncio.Queue[int] = asyncio.Queue()
        networks = self.networks.for_party(party)

        def submit(frame: np.ndarray):
            return asyncio.run_coroutine_threadsafe(self._video_frame(frame, options, networks, stop), loop)

        def on_frames(n: int) -> None:
            if stop.is_set():
                raise Stopped()
            loop.call_soon_threadsafe(encoded.put_nowait, n)

        def run() -> bytes:  # decoding and encoding on threads of their own, beside the event loop
            with tempfile.TemporaryDirectory(prefix="video-segment-") as work:
                local = replace(segment, path=Path(work) / segment.path.name)
                local.path.write_bytes(data)
                target = Path(work) / "restored.mp4"
                encode_segment(local, target, size, submit, output=output, window=window, on_frames=on_frames)
                return target.read_bytes()

        task = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                frames = 0
                while not encoded.empty():
                    frames += encoded.get_nowait()
                yield frames  # 0 as well: the caller looks for a cancel with each item
            yield task.result()
        except Exception as exc:  # noqa: BLE001
            raise _typed(exc) from None
        finally:
            stop.set()  # the caller went (a cancel) or the stream ended: the threads stop at their next frame
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _video_frame(self, frame: np.ndarray, options: RestoreOptions, networks: _GpuDeployments,
                           stop: threading.Event) -> np.ndarray:
        """A frame restored; a graph at capacity makes it wait its turn, as a job waits, until
        its segment is stopped (the encoding thread waits on this frame and would not see it)."""
        while not stop.is_set():
            try:
                pixels = check_array(frame, max_pixels=self.runtime.limits.max_pixels)
                deadline = time.time() + self.runtime.request_timeout_s
                return (await self._restore(pixels, options, {}, deadline, networks)).pixels
            except Exception as exc:  # noqa: BLE001  anything but overload goes up
                error = _typed(exc)
                if not isinstance(error, Overloaded):
                    raise error from None
                await asyncio.sleep(error.retry_after_s)
        raise Stopped()

    async def _restore(self, pixels: np.ndarray, options: RestoreOptions, timings: dict,
                       deadline: float | None, networks: _GpuDeployments | None = None) -> Restored:
        return await restore(pixels, options, networks or self.networks, tile=self.args.tile,
                             max_output_pixels=self.runtime.limits.max_output_pixels, cpu=self.workers.cpu,
                             timings=timings, deadline=deadline)


class _GpuDeployments:
    """The networks as the GPU deployments run them, behind their handles; the work of one
    ``party`` (a video job) takes its turns in their batches as one."""

    def __init__(self, upscaler: DeploymentHandle, faces: DeploymentHandle, party: str | None = None):
        self.upscaler, self.face_handle, self.party = upscaler, faces, party

    def for_party(self, party: str) -> _GpuDeployments:
        return _GpuDeployments(self.upscaler, self.face_handle, party)

    async def upscale(self, model: str, denoise: float | None, inputs: np.ndarray, deadline: float | None):
        return await self.upscaler.forward.remote(model, denoise, inputs, deadline, self.party)

    async def faces(self, work: np.ndarray, options: RestoreOptions, deadline: float | None):
        return await self.face_handle.restore.remote(work, options.face_model, options.face_strength,
                                                     options.only_center_face, options.aligned, deadline, self.party)


def _check_deadline(deadline: float | None) -> None:
    """Refuse a request that spent its whole time in queues before reaching this replica."""
    if deadline is not None and time.time() >= deadline:
        raise RequestTimeout("the request spent the service's whole request timeout in queues")


def _typed(exc: BaseException) -> BaseException:
    error = typed_error(exc)
    return error if isinstance(error, RestoreError) else exc
