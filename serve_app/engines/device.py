"""Which device and number format a network runs in, and how inputs reach it and results leave it."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from serve_app.config import CompileMode, Precision

log = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but CUDA is not available here")
    return device


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """auto is fp16 on CUDA (the official scripts' default) and fp32 on CPU.

    Half precision on the CPU is refused: its convolutions are many times slower than fp32 there.
    """
    if device.type != "cuda":
        if precision not in ("auto", "fp32"):
            log.warning("precision %s is not used on %s; running fp32", precision, device)
        return torch.float32
    return torch.float16 if precision == "auto" else _DTYPES[precision]


def resolve_compile(mode: CompileMode, device: torch.device) -> bool:
    """auto compiles on CUDA only: on the CPU the compile takes about a minute for a smaller gain."""
    return device.type == "cuda" if mode == "auto" else mode == "on"


def page_locked_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` (on CUDA) copied into page-locked host memory, queued on the current stream without
    waiting for it: read it once the stream has reached the copy. The blocks come from
    PyTorch's caching host allocator, so they are reused rather than faulted in anew (a fresh
    pageable array of large outputs costs tens of milliseconds of page faults to receive)."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return host.copy_(x, non_blocking=True)


def page_locked(array: np.ndarray) -> torch.Tensor:
    """``array`` copied into page-locked host memory (PyTorch's caching host allocator keeps a
    block until the copies queued from it are done), to go to a GPU as one queued transfer.
    From pageable memory CUDA stages a copy through a buffer of its own while the calling thread
    waits, the GPU idle meanwhile."""
    x = torch.from_numpy(array)
    staged = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    # numpy's copy, on this thread: PyTorch's would wake its CPU thread pool for a small tile
    np.copyto(staged.numpy(), array)
    return staged


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``, through page-locked memory to CUDA."""
    if device.type != "cuda":
        return torch.from_numpy(array).to(device)
    return page_locked(array).to(device, non_blocking=True)


_POLL_S = 0.6e-3  # how long before the expected end of a device call its thread starts polling
_POLL_AFTER_S = 2e-3  # and how long after that end it goes on polling (a late start, another process's work)


def wait_for(done, expected_end: float | None) -> None:
    """Return once ``done`` (a recorded ``torch.cuda.Event``) has happened.

    Where it is expected (``expected_end``, a ``time.perf_counter`` reading), sleep until
    shortly before then poll, letting other threads run between polls. CUDA's blocking sync
    (``sleep_while_gpu_works``) resumes the thread later than this does, for the same CPU time,
    where waiting the whole call in a spin would keep a core busy. Work that runs past
    its expected end (a late start, another process's kernels) is waited for with the blocking
    sync again.
    """
    if expected_end is None:
        done.synchronize()
        return
    time.sleep(max(0.0, expected_end - _POLL_S - time.perf_counter()))
    while not done.query():
        if time.perf_counter() > expected_end + _POLL_AFTER_S:
            done.synchronize()
            return
        time.sleep(0)  # gives up the GIL
