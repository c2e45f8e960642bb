"""CUDA graphs: a call on a fixed input shape, captured once and then replayed.

A network run from Python launches one kernel per operation, and the launching thread holds
the GIL all along: about a thousand launches for compiled x4plus, milliseconds of CPU a batch.
A replay launches them all in one call, so the GPU replicas' event loops keep the GIL to take
in requests and hand back results.

Captures and replays of one process take turns (``_TURNS``). For the whole of a capture,
PyTorch holds the default CUDA generator in capture mode, and a replay in another thread of a
graph that draws random numbers (GFPGAN's noise injection does) then fails with "Offset
increment outside graph capture encountered unexpectedly": the face replica's detector lane
captures while its restorer lane replays.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import torch


class CapturedCall:
    """``forward`` on one input shape as a CUDA graph: a call copies the input into the graph's
    input buffer, replays it on the current stream and returns the graph's output buffers.

    Graphs may share a memory pool, so one graph's replay may overwrite another's output: safe
    when calls never overlap and each result is read before the next call.
    """

    def __init__(self, forward: Callable, example: torch.Tensor, pool, warm_up: torch.cuda.Stream):
        self.input = example
        with torch.inference_mode():
            # Warm-up outside the capture, on a side stream as PyTorch asks: Triton's and
            # cuDNN's first-call work (tuning, workspace allocation) must not be recorded.
            warm_up.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(warm_up):
                forward(self.input)
            torch.cuda.current_stream().wait_stream(warm_up)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA call during the capture is not an error
            with _TURNS, torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.output = forward(self.input)

    def __call__(self, x: torch.Tensor):
        self.input.copy_(x, non_blocking=True)  # queued on the stream, from page-locked host memory too
        with _TURNS:  # held while the replay is launched, not while the GPU runs it
            self.graph.replay()
        return self.output


class TimedCall:
    """``finish(forward(prepare(x)))`` on one input shape as one CUDA graph (a ``CapturedCall``),
    with ``forward`` alone timed on the GPU: the graph itself records two events around it.

    One launch instead of one per conversion: launched one by one, a lone tile's 8-bit
    conversions left the GPU idle before its network for a sizeable part of a millisecond.
    """

    def __init__(self, prepare: Callable, forward: Callable, finish: Callable, example: torch.Tensor,
                 pool, warm_up: torch.cuda.Stream):
        # external: recorded by the replays, not turned into a dependency inside the graph
        self._start, self._end = (torch.cuda.Event(enable_timing=True, external=True) for _ in range(2))
        self._captured = CapturedCall(timed(prepare, forward, finish, self._start, self._end), example, pool, warm_up)
        self.last_ms: float | None = None  # the last ``forward_ms`` read

    def __call__(self, x: torch.Tensor):
        return self._captured(x)

    def forward_ms(self) -> float:
        """GPU milliseconds of ``forward`` in the last replay, once that replay is done."""
        self.last_ms = self._start.elapsed_time(self._end)
        return self.last_ms


def timed(prepare: Callable, forward: Callable, finish: Callable, start, end) -> Callable:
    """``finish(forward(prepare(x)))``, with ``start`` and ``end`` recorded around ``forward``."""
    def call(x: torch.Tensor):
        x = prepare(x)
        start.record()
        y = forward(x)
        end.record()
        return finish(y)
    return call


_TURNS = threading.Lock()  # see the module's note
_SHAPES_REMEMBERED = 64  # at least, graphs or none: a shape not among them comes for the first time


class GraphsByShape:
    """``forward`` replayed from a CUDA graph per input shape, for inputs whose shapes recur.

    A shape gets its graph the second time it comes (a one-off picture size is not worth a
    capture, which costs about two plain calls); the ``keep`` most recently used graphs are
    kept, and a shape whose graph was dropped gets a new one when it next comes. Inputs of more
    than ``max_elements`` elements run as plain calls: there the GPU time dwarfs the launches,
    and a graph would hold their working memory for good. The first call of a shape goes to
    ``first_sight`` (by default ``forward``), which computes the same thing another way:
    without cuDNN, say, which plans for every new shape (see ``no_cudnn``).

    ``capture(forward, example)`` makes a graph: by default a ``CapturedCall`` in a memory pool
    that all this object's graphs share. Not thread-safe: one caller (a device lane) at a time,
    who reads the result before the next call (see ``CapturedCall``).
    """

    def __init__(self, forward: Callable, *, keep: int, max_elements: int,
                 capture: Callable[[Callable, torch.Tensor], Callable] | None = None,
                 first_sight: Callable | None = None):
        self.forward, self.keep, self.max_elements = forward, keep, max_elements
        self.capture, self.first_sight = capture or _SharedPoolCapture(), first_sight or forward
        self._graphs: OrderedDict[tuple, Callable] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()

    def __call__(self, x: torch.Tensor):
        key = (tuple(x.shape), x.dtype, x.stride())
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph(x)
        if not self._recurs(key):
            return self.first_sight(x)
        if not self.keep or x.numel() > self.max_elements:
            return self.forward(x)
        if len(self._graphs) >= self.keep:
            self._graphs.popitem(last=False)  # its blocks stay in the pool for the next capture
        graph = self._graphs[key] = self.capture(self.forward, torch.zeros_like(x))
        return graph(x)

    def shapes(self) -> list[tuple]:
        """The input shapes that have a graph now, least recently used first."""
        return [shape for shape, _, _ in self._graphs]

    def _recurs(self, key: tuple) -> bool:
        """Whether ``key`` came before (among the shapes remembered, the most recent); remembers it."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        self._seen[key] = None
        if len(self._seen) > max(4 * self.keep, _SHAPES_REMEMBERED):
            self._seen.popitem(last=False)
        return False


class _SharedPoolCapture:
    """``CapturedCall``s in one memory pool, warmed up on one side stream."""

    def __init__(self):
        self._pool = self._warm_up = None

    def __call__(self, forward: Callable, example: torch.Tensor) -> CapturedCall:
        if self._pool is None:
            self._pool, self._warm_up = torch.cuda.graph_pool_handle(), torch.cuda.Stream(example.device)
        graph = CapturedCall(forward, example, self._pool, self._warm_up)
        # The warm-up's blocks would stay cached for the side stream alone, apart from every
        # other call's. (What bounds the peak is the size of the captured passes, hence
        # face_detect_graph_pixels: see docs/architecture.md.)
        with _TURNS:  # not while another thread captures
            torch.cuda.empty_cache()
        return graph
