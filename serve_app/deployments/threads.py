"""Where a deployment's blocking work runs, so its event loop stays free.

Device work (forward passes) goes to persistent threads, one per lane: CUDA libraries keep
per-thread state (handles, workspaces), so the same forward runs several times slower on a
new thread per call and measurably slower in Serve's sync-method thread pool
(bench/call_styles.py); a long-lived thread pays that set-up once. On CUDA each lane issues its work on a CUDA stream of
its own, so two lanes' kernels run side by side on the GPU: the face replica detects faces in
one lane while it restores others in the second, where two replicas sharing a GPU would take
turns on it, process by process.

CPU work (decoding, tiles, stitching, pasting faces, encoding: the CPU deployment's) goes to a
small pool; OpenCV, numpy and ISA-L release the GIL, so its threads overlap (a large PNG
answer is deflated by two of them when both are free). Meanwhile the event loop
keeps answering health checks and queue probes and gathers the next batch.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial


class Workers:
    def __init__(self, cpu_threads: int = 2, device_lanes: int = 1):
        self._lanes = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"device{lane}",
                                          initializer=_own_cuda_stream) for lane in range(device_lanes)]
        self._cpu = ThreadPoolExecutor(max_workers=cpu_threads, thread_name_prefix="cpu")

    async def device(self, fn, *args, lane: int = 0, **kwargs):
        """``fn(*args, **kwargs)`` on device lane ``lane``, after the lane's earlier work."""
        return await asyncio.get_running_loop().run_in_executor(self._lanes[lane], partial(fn, *args, **kwargs))

    async def cpu(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._cpu, partial(fn, *args, **kwargs))

    @property
    def cpu_pool(self) -> ThreadPoolExecutor:
        """The CPU pool itself, for work on it to hand a part to another of its threads (which
        must take the part back when none is free: see ``imageio.png``)."""
        return self._cpu


def _own_cuda_stream() -> None:
    """Make this thread's current CUDA stream a new one (PyTorch keeps the current stream per
    thread). Results leave a lane through a blocking copy to the host, which waits for the
    lane's stream only."""
    import torch  # here: the CPU replicas, which have no device lane, never load it

    if torch.cuda.is_available():
        torch.cuda.set_stream(torch.cuda.Stream())
