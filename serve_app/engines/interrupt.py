"""Stopping a forward pass part-way, for work nobody waits for any more.

On a CPU one Real-ESRGAN tile can take a minute, so a batch whose requests all timed out or
whose clients went away must not run to its end. ``interruptible`` gives every module of a
network a pre-hook that asks the calling thread's ``stop`` predicate, so a pass ends within
one layer of the moment nobody wants it (``Abandoned``). The hooks cost one Python call per
module; they are for eager networks on the CPU, where a layer takes milliseconds or more (a
compiled or captured network never runs them).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn


class Abandoned(Exception):
    """Every request that wanted this pass is gone."""


_local = threading.local()


def _check(module, inputs) -> None:
    stop = getattr(_local, "stop", None)
    if stop is not None and stop():
        raise Abandoned("the pass was stopped: nobody waits for its result")


def interruptible(network: nn.Module) -> nn.Module:
    """Let passes of ``network`` run under ``stopping_when`` end early. Returns ``network``."""
    for module in network.modules():
        module.register_forward_pre_hook(_check)
    return network


@contextmanager
def stopping_when(stop: Callable[[], bool] | None) -> Iterator[None]:
    """Within the block, an interruptible network on this thread raises ``Abandoned`` at its
    next module once ``stop()`` is true."""
    previous, _local.stop = getattr(_local, "stop", None), stop
    try:
        yield
    finally:
        _local.stop = previous
