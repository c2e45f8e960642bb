"""Does the way a GPU replica is called change the GPU time of the same forward?

An earlier measurement (H100, Serve 2.60 defaults) found one RRDBNet forward taking 6x the GPU
time when it ran in a Serve deployment's *sync* method, against the same forward in an async
method. This section keeps that from coming back unseen: the same fp16 forward, timed inside
the callee with CUDA events, called
- in a loop in this process (bare);
- from one long-lived thread, and from a new thread for each call (tells per-thread state in
  CUDA libraries apart from anything Serve does);
- through a Serve deployment's sync method and its async method (the device thread of
  serve_app.deployments.threads, as the service does it).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ray import serve

from serve_app.engines.networks import build_network
from serve_app.weights import get_spec


class Forward:
    """RealESRGAN_x4plus with random weights on ``batch`` tiles; ``__call__`` returns GPU ms."""

    def __init__(self, tile: int, batch: int):
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        dtype = torch.float16 if cuda else torch.float32
        fmt = torch.channels_last if cuda else torch.contiguous_format
        self.network = build_network(get_spec("RealESRGAN_x4plus")).eval().to(self.device, dtype, memory_format=fmt)
        self.x = torch.rand(batch, 3, tile, tile, device=self.device, dtype=dtype).contiguous(memory_format=fmt)

    @torch.inference_mode()
    def __call__(self) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            self.network(self.x)
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.network(self.x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


@serve.deployment(ray_actor_options={"num_gpus": 0.1, "num_cpus": 0})
class SyncStyle:
    def __init__(self, tile: int, batch: int):
        self.forward = Forward(tile, batch)

    def run(self) -> float:
        return self.forward()


@serve.deployment(ray_actor_options={"num_gpus": 0.1, "num_cpus": 0})
class AsyncStyle:
    def __init__(self, tile: int, batch: int):
        from serve_app.deployments.threads import Workers

        self.forward, self.workers = Forward(tile, batch), Workers()

    async def run(self) -> float:
        return await self.workers.device(self.forward)


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    return float(np.median([fn() for _ in range(repeats)]))


def run(tile: int, batch: int, repeats: int) -> dict:
    """GPU milliseconds per forward, by calling style (run inside a started Ray instance)."""
    forward = Forward(tile, batch)
    one_thread = ThreadPoolExecutor(max_workers=1)

    def on_a_new_thread():
        out = []
        thread = threading.Thread(target=lambda: out.append(forward()))
        thread.start()
        thread.join()
        return out[0]

    result = {
        "bare_loop_ms": _median(forward, repeats),
        "one_thread_ms": _median(lambda: one_thread.submit(forward).result(), repeats),
        "new_thread_each_call_ms": _median(on_a_new_thread, repeats),
    }
    sync = serve.run(SyncStyle.bind(tile, batch), name="call-sync", route_prefix=None)
    result["serve_sync_ms"] = _median(lambda: sync.run.remote().result(), repeats)
    asynchronous = serve.run(AsyncStyle.bind(tile, batch), name="call-async", route_prefix=None)
    result["serve_async_ms"] = _median(lambda: asynchronous.run.remote().result(), repeats)
    for name in ("call-sync", "call-async"):
        serve.delete(name)
    result["sync_over_async"] = result["serve_sync_ms"] / result["serve_async_ms"]
    result["input"] = {"tile": tile, "batch": batch}
    return result
