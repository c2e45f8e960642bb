"""One picture's restoration, step by step: the only orchestration of a request.

The CPU replicas run it with the GPU deployments' handles as the networks; tests, the
benchmark and notebooks run it with networks in their own process
(``serve_app.engines.local``). Either way the same CPU steps run in the same order: tiles cut,
the upscaler's outputs stitched, the face canvas made while the faces are restored, the faces
pasted. numpy and OpenCV only: the networks are behind ``Networks``.
"""
from __future__ import annotations

import asyncio
import sys
import time
from contextlib import contextmanager
from typing import Awaitable, Callable, Protocol

import numpy as np

from serve_app.api import Restored, RestoreOptions
from serve_app.config import TileConfig
from serve_app.cpu.paste import FoundFaces, face_canvas, paste_faces, to_bgr8
from serve_app.cpu.tiles import TilePlanner
from serve_app.imageio.codec import mode_of
from serve_app.weights.registry import get_spec

FaceSteps = tuple[FoundFaces, list[np.ndarray], list[np.ndarray]]  # where the faces are, restored, masks


class Networks(Protocol):
    """Whatever runs the networks: a GPU deployment's handle, or engines in this process."""

    async def upscale(self, model: str, denoise: float | None, inputs: np.ndarray,
                      deadline: float | None) -> np.ndarray:
        """N fixed-shape network inputs (``UpscaleJob.inputs``) -> their N outputs."""

    async def faces(self, work: np.ndarray, options: RestoreOptions, deadline: float | None) -> FaceSteps:
        """An 8-bit BGR picture (``to_bgr8``) -> its faces found, restored and their paste masks."""


async def inline(fn: Callable, *args, **kwargs):
    """Run a CPU step in the caller's thread (a replica passes its thread pool instead)."""
    return fn(*args, **kwargs)


async def restore(pixels: np.ndarray, options: RestoreOptions, networks: Networks, *, tile: TileConfig,
                  max_output_pixels: int = sys.maxsize, cpu: Callable[..., Awaitable] = inline,
                  timings: dict[str, float] | None = None, deadline: float | None = None) -> Restored:
    """``pixels`` (decoded and within the input limits) restored as ``options`` say. ``cpu`` runs
    each CPU step (a replica's thread pool keeps its event loop free); ``timings`` gets each
    step's milliseconds."""
    options = options.fitted(pixels.shape[1], pixels.shape[0], max_output_pixels)
    steps = _Steps(options, networks, tile, cpu, {} if timings is None else timings, deadline)
    with steps.timed("restore"):
        if options.face_enhance:
            out, faces = await steps.faces(pixels)
        else:
            out, faces = await steps.upscale(pixels), 0
    return Restored(out, out.shape[1], out.shape[0], mode_of(out), faces, steps.timings)


class _Steps:
    def __init__(self, options, networks, tile, cpu, timings, deadline):
        self.options, self.networks, self.tile, self.cpu = options, networks, tile, cpu
        self.timings, self.deadline = timings, deadline

    async def upscale(self, pixels: np.ndarray) -> np.ndarray:
        model = self.options.upscaler
        planner = TilePlanner(get_spec(model).scale, self.tile)
        with self.timed("tiles"):
            job = await self.cpu(planner.prepare, pixels, scale=self.options.scale,
                                 alpha_upsampler=self.options.alpha_upsampler)
        outputs = await self.networks.upscale(model, self.options.denoise, np.stack(job.inputs()), self.deadline)
        with self.timed("stitch"):
            return await self.cpu(planner.finish, job, list(outputs))

    async def faces(self, pixels: np.ndarray) -> tuple[np.ndarray, int]:
        options = self.options
        work = await self.cpu(to_bgr8, pixels)
        faces = asyncio.ensure_future(self.networks.faces(work, options, self.deadline))
        # The canvas needs no face: it is made (the background through the upscaler) while the
        # faces are restored, and only the pasting waits for them. A face request the networks
        # refuse (its weights missing, say) stops the background at once.
        steps = [faces]
        if not options.aligned:
            steps.append(asyncio.ensure_future(self.canvas(pixels)))
        try:
            await asyncio.wait(steps, return_when=asyncio.FIRST_EXCEPTION)
            for step in steps:
                if step.done() and step.exception() is not None:
                    raise step.exception()
            (found, restored, masks), *canvas = await asyncio.gather(*steps)
        finally:
            for step in steps:  # after a failure or our own cancellation, nothing goes on without us
                step.cancel()
        with self.timed("paste"):
            result = await self.cpu(paste_faces, pixels, found, restored, masks, scale=options.scale,
                                    aligned=options.aligned, canvas=canvas[0] if canvas else None)
        return result.image, result.faces_restored

    async def canvas(self, pixels: np.ndarray) -> np.ndarray:
        background = await self.upscale(pixels) if self.options.upscaler is not None else None
        with self.timed("canvas"):
            return await self.cpu(face_canvas, pixels, scale=self.options.scale, background=background)

    def timed(self, name: str):
        return timed(self.timings, name)


@contextmanager
def timed(timings: dict[str, float], name: str):
    """Record the milliseconds of a ``with`` block as ``timings[name]``."""
    started = time.perf_counter()
    yield
    timings[name] = (time.perf_counter() - started) * 1e3
