"""Keep Python's garbage collector off the request path of long-lived replicas.

A replica's heap after start-up holds millions of objects (torch, its compiler, Ray), all
long-lived. CPython's oldest-generation collection walks every one of them: on an H100 host
the upscaler replica's full collections took 0.3-1.6 s each, every 7-30 s while it served,
and each one stalled every request the replica held. Freezing the start-up heap moves it out
of the collector's sight, so later collections walk only what requests allocate.
"""
from __future__ import annotations

import gc


def freeze_heap() -> None:
    """Collect start-up garbage once, then exempt every surviving object from later collections.

    Call it when a replica has loaded what it keeps (models, compiled kernels)."""
    gc.collect()
    gc.freeze()
