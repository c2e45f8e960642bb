"""What both GPU deployments share: a cap on their GPU memory, sleeping while the GPU works,
and where a request's time goes.

Two replicas share one GPU at 0.5 each, but Ray's GPU fractions are bookkeeping only: nothing
stops one PyTorch process from taking the whole card. The cap makes the share real.
"""
from __future__ import annotations

import ctypes
import time
from collections import deque
from typing import Callable, TypeVar

import numpy as np
import ray
import torch

from serve_app.metrics import observe_gpu_steps


def cap_gpu_memory(device: torch.device, fraction: float | None) -> float | None:
    """Cap this process's CUDA allocations at ``fraction`` of the card (default: the replica's GPU
    share from ``ray_actor_options``). Returns the fraction, or None off CUDA."""
    if device.type != "cuda":
        return None
    share = fraction or ray.get_runtime_context().get_assigned_resources().get("GPU") or 1.0
    share = min(float(share), 1.0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(share, index)
    return share


_CU_CTX_SCHED_MASK, _CU_CTX_SCHED_BLOCKING_SYNC = 0x07, 0x04  # cuda.h


def sleep_while_gpu_works() -> bool:
    """Make this process's waits for the GPU sleep rather than spin (the CUDA driver's
    blocking-sync scheduling, set on every visible GPU's primary context). Returns whether it
    is set; False where there is no CUDA driver.

    With one CUDA context and more cores than that, CUDA's default is to spin: a device lane
    waiting for a batch keeps a core busy for the whole batch, taken from the CPU replicas on
    the same node. Sleeping halves the core a busy upscaler replica keeps.
    """
    driver = _cuda_driver()
    if driver is None:
        return False
    count = ctypes.c_int()
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    for ordinal in range(count.value):
        device = ctypes.c_int()
        if driver.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            return False
        if driver.cuDevicePrimaryCtxSetFlags_v2(device, _CU_CTX_SCHED_BLOCKING_SYNC) != 0:
            return False
    return gpu_waits() == "sleep"


def gpu_waits() -> str | None:
    """How this process waits for the first visible GPU: "sleep", "spin", "yield" or "auto"
    (CUDA's default: spin while contexts are fewer than cores); None without a CUDA driver."""
    driver = _cuda_driver()
    device, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    if driver is None or driver.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None
    if driver.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)) != 0:
        return None
    return {0: "auto", 1: "spin", 2: "yield", 4: "sleep"}.get(flags.value & _CU_CTX_SCHED_MASK)


def _cuda_driver() -> ctypes.CDLL | None:
    """The CUDA driver library, initialised; None where there is none (CPU machines)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return driver if driver.cuInit(0) == 0 else None


def gpu_memory(device: torch.device, fraction: float | None) -> dict:
    """Peak GPU memory of this replica so far, against its cap, in GiB."""
    if device.type != "cuda":
        return {}
    total = torch.cuda.get_device_properties(device).total_memory
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "cap_gib": (fraction or 1.0) * total / 2**30, "card_gib": total / 2**30}


R = TypeVar("R")


def timed_call(fn: Callable[..., R], *args) -> tuple[R, float]:
    """``fn(*args)`` and the milliseconds it took, measured on the thread that runs it (a device
    lane): with the lane's whole call known, a request's time splits into the call and the
    hand-offs around it."""
    started = time.perf_counter()
    result = fn(*args)
    return result, (time.perf_counter() - started) * 1e3


class StepTimes:
    """Where the last ``window`` requests of a replica spent their time, step by step, for
    ``stats()`` and the benchmark (each step's p50 and p99 in ms), and for the metrics."""

    def __init__(self, stage: str, window: int = 2000):
        self.stage = stage
        self._rows: deque[dict[str, float]] = deque(maxlen=window)

    def add(self, **steps_ms: float) -> None:
        self._rows.append(steps_ms)
        observe_gpu_steps(self.stage, steps_ms)

    def clear(self) -> None:
        self._rows.clear()

    def total(self, step: str) -> float:
        return float(sum(row[step] for row in self._rows))

    def summary(self) -> dict:
        if not self._rows:
            return {"requests": 0}
        summary: dict[str, float] = {"requests": len(self._rows)}
        for step in self._rows[-1]:
            values = np.array([row[step] for row in self._rows])
            summary[f"{step}_ms_p50"] = float(np.median(values))
            summary[f"{step}_ms_p99"] = float(np.percentile(values, 99))
        return summary
