"""What both GPU deployments share: a cap on their GPU memory, and where a request's time goes.

Two replicas share one GPU at 0.5 each, but Ray's GPU fractions are bookkeeping only: nothing
stops one PyTorch process from taking the whole card. The cap makes the share real.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import ray
import torch


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


def gpu_memory(device: torch.device, fraction: float | None) -> dict:
    """Peak GPU memory of this replica so far, against its cap, in GiB."""
    if device.type != "cuda":
        return {}
    total = torch.cuda.get_device_properties(device).total_memory
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "cap_gib": (fraction or 1.0) * total / 2**30, "card_gib": total / 2**30}


@dataclass
class RequestTime:
    queued_ms: float  # entry until its first batch started
    served_ms: float  # first batch start until the reply: the batch work, copies, splitting
    bare_ms: float  # the network alone, over the batches that carried it (CUDA events)


class RequestTimes:
    """The last ``window`` requests of a replica, summarised for ``stats()`` and the benchmark."""

    def __init__(self, window: int = 2000):
        self._times: deque[RequestTime] = deque(maxlen=window)

    def add(self, time: RequestTime) -> None:
        self._times.append(time)

    def clear(self) -> None:
        self._times.clear()

    def summary(self) -> dict:
        if not self._times:
            return {"requests": 0}
        queued, served, bare = (np.array([getattr(t, f) for t in self._times])
                                for f in ("queued_ms", "served_ms", "bare_ms"))
        return {"requests": len(self._times), "queued_ms_p50": float(np.median(queued)),
                "served_ms_p50": float(np.median(served)), "bare_ms_p50": float(np.median(bare)),
                # how much longer a request's batch took in the replica than the network alone
                "served_over_bare": float(served.sum() / bare.sum())}
