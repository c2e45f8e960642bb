"""A long-lived replica's heap: settings for the allocator and for Python's collector.

``keep_freed_memory``: a request allocates and frees the same few buffers, 1-30 MB each
(decoded pixels, tiles, the paste-back's float64 window, the encoded answer). By default glibc
hands buffers over 128 KB back to the kernel when they are freed, or trims them off its heaps,
so the next request's buffers are new pages, which the kernel faults in and zeroes one by one:
about half the time of a paste-back or a stitch went to page faults. Keeping buffers under 32 MB in the heap, and up to 128 MB of freed
memory at the top of each heap, makes the next request reuse them. Buffers of 32 MB and more
(the largest pictures' float stitching and paste buffers) are still returned, so a replica
keeps at most about 128 MB per heap beyond what it holds.

``memory_usage``: what a replica reports of its memory in ``/v1/stats``. Its resident size alone
cannot tell a leak from the buffers kept above: the allocator's live bytes can.

``freeze_heap``: a replica's heap after start-up holds millions of objects (torch, its
compiler, Ray), all long-lived. CPython's oldest-generation collection walks every one of
them: a serving replica's full collections took up to seconds each, every few tens of seconds,
and each one stalled every request the replica held. Freezing the start-up
heap moves it out of the collector's sight, so later collections walk only what requests
allocate.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEPT_BUFFER_BYTES = 32 * 2**20  # buffers under this come from the heap and go back to it
KEPT_FREE_BYTES = 128 * 2**20  # free memory at a heap's top kept for reuse rather than trimmed


def keep_freed_memory() -> bool:
    """Make glibc keep freed request buffers for reuse (see the module's note); False where the
    C library is not glibc, which is left as it is. Call it before a replica starts serving."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        log.info("no mallopt in this C library: the allocator keeps its defaults")
        return False
    # Setting either threshold also stops glibc's own adjusting of both, so set both.
    return bool(mallopt(_M_MMAP_THRESHOLD, KEPT_BUFFER_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES))


class _Mallinfo2(ctypes.Structure):  # glibc 2.33 and later (malloc.h)
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)
if _mallinfo2 is not None:
    _mallinfo2.restype = _Mallinfo2


def memory_usage() -> dict:
    """This process's memory: ``resident_bytes``; ``malloc_live_bytes``, what the C heap holds in
    use (native buffers, and Python objects over 512 bytes), and ``malloc_kept_bytes``, what it
    keeps freed for reuse (None without glibc's mallinfo2); ``python_blocks``, the small Python
    objects alive. A leak grows the live figures; kept buffers grow only the resident one."""
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/self/statm") as statm:
            resident = int(statm.read().split()[1]) * page
    except OSError:  # not Linux
        resident = None
    usage = {"resident_bytes": resident, "malloc_live_bytes": None, "malloc_kept_bytes": None,
             "python_blocks": sys.getallocatedblocks()}
    if _mallinfo2 is not None:
        info = _mallinfo2()
        usage.update(malloc_live_bytes=info.uordblks + info.hblkhd, malloc_kept_bytes=info.fordblks)
    return usage


def freeze_heap() -> None:
    """Collect start-up garbage once, then exempt every surviving object from later collections.

    Call it when a replica has loaded what it keeps (models, compiled kernels)."""
    gc.collect()
    gc.freeze()
