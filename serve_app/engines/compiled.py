"""torch.compile for a network's fixed input shape, with the compiled artifacts kept on disk.

Used for Real-ESRGAN's tiles and for the 512x512 aligned faces of GFPGAN and ParseNet.

Compiling makes the forward about 1.5x faster but takes a minute or more per network, so the
compiled kernels are saved with ``torch.compiler.save_cache_artifacts`` beside the weights and
a restarted replica loads them instead of compiling again.

The batch dimension is compiled as dynamic, so every batch size from 2 up shares one graph.
Dynamo specialises a size of 1, so on the CPU a batch of one is padded to two rather than
compiled twice.

On CUDA every batch size from 1 to ``max_batch`` is then captured once as a CUDA graph and
replayed (see ``cuda_graphs``): a replay costs a small fraction of the compiled call's CPU
time and gives the same bytes. A batch of one gets a graph of its own, since padding it to two
nearly doubles its time; that is one more compile, which the saved artifacts spare later starts.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from serve_app.engines.cuda_graphs import CapturedCall, TimedCall

log = logging.getLogger(__name__)
R = TypeVar("R")


class CompiledNetwork:
    """``network`` compiled for inputs of shape (N, 3, size, size); other shapes run eager.

    ``max_batch=1`` compiles for one item only and runs larger batches item by item: for
    networks whose batch size cannot be dynamic (StyleGAN's modulated convolutions group by it)
    or that gain nothing from batching.

    On CUDA the result of a call lives in its graph's output buffer until the next call: one
    caller at a time, who reads (or copies) the result before calling again.
    """

    def __init__(self, network: nn.Module, *, size: int, max_batch: int, device: torch.device,
                 dtype: torch.dtype, memory_format: torch.memory_format, artifacts: Path):
        self.network, self.size = network, size
        self.artifacts = artifacts
        self._compiled = torch.compile(network)
        self._load_artifacts()
        started = time.perf_counter()
        self.dynamic = max_batch > 1  # one graph for every batch size from 2 up
        example = _zeros(max(2, max_batch) if self.dynamic else 1, size, device, dtype, memory_format)
        if self.dynamic:
            torch._dynamo.mark_dynamic(example, 0)
        with torch.inference_mode():
            self._compiled(example)
        compiled = time.perf_counter()
        self._graphs: dict[int, CapturedCall] = {}
        self.max_batch, self.device = max_batch, device
        if device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()  # safe to share: replays never overlap (see CapturedCall)
            # One warm-up stream for all: the caching allocator keeps each stream's blocks apart.
            self._warm_up = torch.cuda.Stream(device)
            self._graphs = self._capture(lambda batch: CapturedCall(
                self._compiled, _zeros(batch, size, device, dtype, memory_format), self._pool, self._warm_up))
        # The captures' time includes the batch of one's own compile (see the module's note).
        log.info("compiled %s for %dx%d tiles in %.1f s, then captured %d CUDA graphs in %.1f s",
                 type(network).__name__, size, size, compiled - started, len(self._graphs),
                 time.perf_counter() - compiled)
        self._save_artifacts()

    def timed_graphs(self, prepare: Callable, finish: Callable, dtype: torch.dtype) -> dict[tuple, TimedCall]:
        """On CUDA, ``finish(network(prepare(x)))`` as one graph per batch size, for inputs x of
        ``dtype`` shaped (N, 3, size, size), keyed by that shape: see ``TimedCall``."""
        if self.device.type != "cuda":
            return {}

        def capture(batch: int) -> TimedCall:
            example = torch.zeros(batch, 3, self.size, self.size, device=self.device, dtype=dtype)
            return TimedCall(with_normal_result(prepare), self._compiled, finish, example, self._pool, self._warm_up)
        started = time.perf_counter()
        graphs = self._capture(capture)
        log.info("captured %d CUDA graphs for %s inputs in %.1f s", len(graphs), dtype, time.perf_counter() - started)
        return {(batch, 3, self.size, self.size): call for batch, call in graphs.items()}

    def _capture(self, capture: Callable[[int], R]) -> dict[int, R]:
        """``capture(batch)`` for every batch size, with cuDNN timing its algorithms."""
        graphs = {}
        with cudnn_benchmark():
            for batch in range(self.max_batch, 0, -1):  # largest first: smaller graphs reuse its blocks
                graphs[batch] = capture(batch)
        torch.cuda.empty_cache()  # the warm-ups' blocks; the graphs keep their own pool
        return graphs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            return self.network(x)
        graph = self._graphs.get(x.shape[0])
        if graph is not None:
            return graph(x)
        if not self.dynamic:
            if x.shape[0] == 1:
                return self._compiled(normal_tensor(x))
            # each result copied before the next call reuses the output buffer
            return torch.cat([self(item[None]).clone() for item in x])
        if x.shape[0] == 1:  # see the module's note: one compiled graph for every batch size but 1
            return self._compiled(normal_tensor(torch.cat([x, x])))[:1]
        return self._compiled(normal_tensor(x))

    def _load_artifacts(self) -> None:
        if self.artifacts.is_file():
            torch.compiler.load_cache_artifacts(self.artifacts.read_bytes())
            log.info("loaded compiled artifacts %s", self.artifacts)

    def _save_artifacts(self) -> None:
        saved = torch.compiler.save_cache_artifacts()
        if not saved:
            return
        self.artifacts.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.artifacts.parent, prefix=".", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(saved[0])
        os.replace(tmp, self.artifacts)  # whole or not at all, as the weights


# The network is compiled for a normal tensor, and a tensor made in inference mode fails
# Dynamo's guards: the call would compile it again (seconds at every start). So the compiled
# network is only ever given normal tensors.

def normal_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x``, copied into a normal tensor if it was made in inference mode."""
    if not x.is_inference():
        return x
    with torch.inference_mode(False):
        return x.clone()


def with_normal_result(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn``, its result made as a normal tensor even when called in inference mode: no copy."""
    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):
            return fn(x)
    return call


def cudnn_benchmark():
    """cuDNN times its convolution algorithms and keeps the fastest, for the graphs' warm-ups and
    captures only: a graph keeps the choice for good, while eager calls of other shapes would pay
    a benchmark (and its workspace) per new shape. It helps the batch of one most."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=True, benchmark_limit=cudnn.benchmark_limit,
                       deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32)


def _zeros(batch: int, size: int, device: torch.device, dtype: torch.dtype,
           memory_format: torch.memory_format) -> torch.Tensor:
    return torch.zeros(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=memory_format)


def artifacts_path(cache_dir: Path, model: str, device: torch.device, dtype: torch.dtype, size: int) -> Path:
    """One file per model, tile, number format, GPU kind and torch version: kernels tuned for
    one of these are wrong or slow for another."""
    gpu = torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else "cpu"
    dtype_name = str(dtype).removeprefix("torch.")
    return cache_dir / "compiled" / f"{model}-{size}-{dtype_name}-{gpu}-torch{torch.__version__}.bin"
