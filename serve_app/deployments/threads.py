"""Where a deployment's blocking work runs, so its event loop stays free.

Device work (forward passes) goes to one persistent thread per GPU replica: CUDA libraries keep
per-thread state (handles, workspaces), and the same forward measured 5.6x slower on a new
thread per call and 1.3x slower in Serve's sync-method thread pool (bench/call_styles.py); one
long-lived thread pays that set-up once. CPU work (decoding, tiles, stitching, pasting faces,
encoding: the CPU deployment's) goes to a small pool; OpenCV and numpy release the GIL, so
its threads overlap. Meanwhile the event loop keeps answering health checks and queue probes
and gathers the next batch.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial


class Workers:
    def __init__(self, cpu_threads: int = 2):
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._cpu = ThreadPoolExecutor(max_workers=cpu_threads, thread_name_prefix="cpu")

    async def device(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._device, partial(fn, *args, **kwargs))

    async def cpu(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._cpu, partial(fn, *args, **kwargs))
