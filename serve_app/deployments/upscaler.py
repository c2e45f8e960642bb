"""GPU deployment of the Real-ESRGAN networks: tiles in, tiles out, batched across requests.

Cutting and stitching happen in the CPU deployment, so this replica's Python thread does
little besides feeding the GPU.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import NamedTuple

import numpy as np
from ray import serve

from serve_app.config import AppArgs, RuntimeConfig
from serve_app.deployments.admission import Admission
from serve_app.deployments.batching import Abandoned, Deliver, DeviceBatcher, group_indices
from serve_app.deployments.gpu import timed_call
from serve_app.deployments.gpu_replica import GpuReplica
from serve_app.engines.interrupt import Abandoned as PassAbandoned
from serve_app.engines.upscaler import Upscaler, load_upscaler
from serve_app.errors import RequestTimeout, TooMuchWork


@serve.deployment
class UpscalerDeployment(GpuReplica):
    engine_name, stage = "Real-ESRGAN", "upscaler"

    def __init__(self, args: AppArgs):
        super().__init__(args)
        self.admission = Admission(self.runtime.request_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        self.abandoned_passes = 0  # passes stopped or skipped because their requests were gone
        self.batcher = DeviceBatcher(self._forward_batch, args.tile.batch_size,
                                     self.runtime.upscaler_batch_wait_s)
        self._start()

    def _load(self, name: str, denoise: float | None) -> Upscaler:
        engine = load_upscaler(name, self.store, self.args, denoise=denoise)
        if engine.device.type == "cpu":  # on a GPU the first batches teach the admission
            self.admission.learn((name, denoise), 1, engine.seconds_per_pixel())
        return engine

    def _offered(self) -> list[tuple]:
        return [(name, None) for name in self.args.upscalers]

    def _apply(self, runtime: RuntimeConfig) -> None:
        self.admission.request_timeout_s = runtime.request_timeout_s
        self.batcher.wait_s = runtime.upscaler_batch_wait_s

    # async, forwards on the device thread: Serve's sync-method pool, or a new thread per call,
    # pays CUDA's per-thread set-up in GPU time (bench/call_styles.py measures it).
    async def forward(self, model: str, denoise: float | None, tiles: np.ndarray,
                      deadline: float | None = None, party: str | None = None) -> np.ndarray:
        """N x 3 x h x w network inputs of one request -> its N outputs (see ``Upscaler.forward``),
        or a typed refusal at once when they cannot be done by ``deadline`` (a ``time.time()``).
        The tiles take turns in the batches as one party: ``party`` (a video job's frames share
        one), else this request."""
        entered = time.perf_counter()
        self.engines.start_retries()
        key = (model, denoise)
        engine = self.engines.get(*key)
        pixels = tiles.shape[0] * tiles.shape[2] * tiles.shape[3]
        party = party or object()
        try:
            cost = self.admission.admit(key, pixels, deadline, f"{model} on {len(tiles)} tiles", party)
        except TooMuchWork as exc:
            raise TooMuchWork(f"{exc.detail}{self._lighter_models(model, pixels)}") from None
        try:
            timeout = None if deadline is None else deadline - time.time()
            tiles_done = asyncio.gather(*(self.batcher.submit((key, engine, x), party) for x in tiles))
            tiles_done.add_done_callback(_retrieve)  # cancelled with its request: nothing to log
            done: list[_Tile] = await asyncio.wait_for(tiles_done, timeout)
        except asyncio.TimeoutError:  # its tiles are dropped, and a pass that only they need stops
            raise RequestTimeout() from None
        finally:
            self.admission.release(cost)
        calls = {tile.call: (tile.bare_ms, tile.device_ms) for tile in done}  # its device calls, each once
        first_start, now = min(started for started, _ in calls), time.perf_counter()
        served = (now - first_start) * 1e3
        bare, call = (sum(ms) for ms in zip(*calls.values()))  # summed over its device calls
        self.times.add(queued=(first_start - entered) * 1e3,  # entry until its first batch started
                       served=served,  # its batches, from the first's start until it resumed
                       bare=bare,  # the network alone in those batches (CUDA events)
                       copies=call - bare,  # the rest of those device calls: copies, conversions
                       # the rest: hand-offs between the event loop and the device lane (and, in a
                       # batch of several models or tile shapes, the other groups' calls)
                       hops=served - call,
                       inside=(now - entered) * 1e3)  # queued + served, exactly
        if len(done) == 1:  # the usual small picture: its tile as it came, no copy
            return done[0].output[np.newaxis]
        return np.stack([tile.output for tile in done])

    def _lighter_models(self, model: str, pixels: int) -> str:
        """The offered models that would do the same tiles in time, as advice in a refusal."""
        fits = []
        for name in self.args.upscalers:
            cost = self.admission.estimate((name, None), pixels)
            if name != model and cost is not None and cost <= self.runtime.request_timeout_s:
                fits.append((cost, name))
        if not fits:
            return ": send a smaller picture or a lower scale"
        advice = ", ".join(f"model={name} (about {cost:.0f} s)" for cost, name in sorted(fits))
        return f": use {advice}, a smaller picture or a lower scale"

    async def _forward_batch(self, items: list[tuple[tuple, Upscaler, np.ndarray]], deliver: Deliver,
                             abandoned: Abandoned) -> None:
        """One forward pass per engine and shape over the tiles of every waiting request, each
        pass's tiles delivered when it ends; a pass whose requests are all gone stops.

        Each tile comes back with its pass's identity, bare forward time and device call time.
        """
        started = time.perf_counter()
        self.batch_sizes[len(items)] += 1
        self._count_batch("upscale", len(items))
        for group, indices in enumerate(group_indices(items, lambda item: (id(item[1]), item[2].shape,
                                                                           item[2].dtype))):
            key, engine, _ = items[indices[0]]
            if abandoned():
                self.abandoned_passes += 1
                return
            batch = np.stack([items[i][2] for i in indices])
            try:
                (outputs, bare_ms), device_ms = await self.workers.device(
                    timed_call, engine.forward_timed, batch, abandoned)
            except PassAbandoned:
                self.abandoned_passes += 1
                return
            self.admission.learn(key, batch.shape[0] * batch.shape[2] * batch.shape[3], device_ms / 1e3)
            for i, y in zip(indices, outputs):
                deliver(i, _Tile(y, (started, group), bare_ms, device_ms))

    async def stats(self) -> dict:
        return {**self._replica_stats(), "batch_sizes": dict(self.batch_sizes),
                "times": self._times(), "abandoned_passes": self.abandoned_passes,
                "admitted_work_s": self.admission.outstanding_s}

    def _times(self) -> dict:
        times = self.times.summary()
        if times["requests"]:  # how much longer its batches took in the replica than the network alone
            times["served_over_bare"] = self.times.total("served") / self.times.total("bare")
        return times

    async def reset_stats(self) -> None:
        """Forget counts and times (the benchmark measures each load level on its own)."""
        self.batch_sizes.clear()
        self.times.clear()


class _Tile(NamedTuple):
    """A tile's output, and the device call that made it."""

    output: np.ndarray
    call: tuple[float, int]  # the batch's start time and the call's place in it: one per call
    bare_ms: float  # the network alone (CUDA events on the GPU)
    device_ms: float  # the whole call on the device lane: copies and conversions too


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
