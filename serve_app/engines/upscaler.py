"""The Real-ESRGAN engine: any registry upscaler, on CPU or CUDA, whole-image or tiled.

The colour handling follows ``realesrgan.RealESRGANer.enhance`` step for step (so untiled
output matches it), with these deliberate differences, each noted where it happens:
- 16-bit is decided by the array's dtype, not by ``max(img) > 256`` (upstream turns a dark
  16-bit picture into an 8-bit result);
- ``alpha_upsampler`` is honoured ("realesrgan" or "bicubic"; the official script parses it
  and never passes it on);
- tiles have one fixed shape, overlap and are blended, and only tiles visit the GPU;
- 8-bit colour pictures travel to the device and back as 8-bit, rounded there;
- RRDBNet's dense blocks run in their concatenation-free form (``dense_blocks``).

The work is split in three steps so a server can batch the middle one across requests:
``prepare`` (CPU: image -> fixed-shape network inputs), ``forward`` (device: a batch of
inputs -> outputs) and ``finish`` (CPU: outputs -> image). The CPU steps are
``serve_app.cpu.tiles.TilePlanner``, which the CPU replicas run without torch; the three are
chained by ``serve_app.cpu.restore``, whoever runs the networks.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from serve_app.config import TileConfig
from serve_app.engines.cuda_graphs import TimedCall
from serve_app.engines.device import page_locked, page_locked_copy, upload, wait_for
from serve_app.engines.interrupt import stopping_when


class Upscaler:
    """A network on its device: batches of tiles in, batches of outputs out (step 2)."""

    def __init__(self, network: nn.Module, scale: int, *, device: torch.device, dtype: torch.dtype,
                 tile: TileConfig):
        self.network, self.scale, self.device, self.dtype, self.tile = network, scale, device, dtype, tile
        # channels_last runs Real-ESRGAN's convolutions about 1.3x faster on CUDA.
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.network.to(memory_format=self.memory_format)
        self.run: Callable[[torch.Tensor], torch.Tensor] = network  # or its compiled form
        # 8-bit tiles in, 8-bit outputs out, each batch shape one CUDA graph (``load_upscaler``)
        self.eight_bit_graphs: dict[tuple, TimedCall] = {}

    # ------------------------------------------------------------------ step 2 (device)
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x h x w inputs -> N x 3 x h*scale x w*scale outputs.

        uint8 inputs (8-bit colour pictures) give uint8 outputs, scaled and rounded on the
        device as upstream rounds on the CPU. Float inputs in [0, 1] give outputs in [0, 1], in
        the network's dtype on CUDA and float32 on the CPU.
        """
        return self.forward_timed(batch)[0]

    @torch.inference_mode()
    def forward_timed(self, batch: np.ndarray, stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, float]:
        """``forward`` and the milliseconds the network alone took (CUDA events on the GPU), so a
        server can tell its own overhead from the bare forward. On the CPU, the pass ends early
        (``interrupt.Abandoned``) once ``stop()`` is true."""
        eight_bit = batch.dtype == np.uint8
        graph = self.eight_bit_graphs.get(batch.shape) if eight_bit else None
        if graph is not None:
            started = time.perf_counter()
            host = page_locked_copy(graph(page_locked(batch)))
            done = torch.cuda.Event()
            done.record()
            # about when the last replay of this graph ended: its network plus a little
            wait_for(done, None if graph.last_ms is None else started + graph.last_ms / 1e3)
            return host.numpy(), graph.forward_ms()
        x = upload(batch, self.device)
        x = self.from_bytes(x) if eight_bit else x.to(dtype=self.dtype, memory_format=self.memory_format)
        with _stopwatch(self.device) as bare, stopping_when(stop):
            y = self.run(x)
        y = to_bytes(y) if eight_bit else y.clamp_(0, 1)
        return _to_host(y), bare.ms

    def seconds_per_pixel(self, least_s: float = 0.2, largest_side: int = 256) -> float:
        """What one input pixel costs a plain pass, from passes over square inputs that double in
        side until one lasts ``least_s``: how a CPU replica learns its speed at load in about a
        second, rather than from its first (possibly minute-long) tile. The first, smallest pass
        also warms the network up; small passes of a light network are mostly fixed cost, so the
        last, longest pass gives the rate."""
        side = 32
        while True:
            started = time.perf_counter()
            self.forward(np.zeros((1, 3, side, side), np.float32))
            seconds = time.perf_counter() - started
            if seconds >= least_s or side >= largest_side:
                return seconds / (side * side)
            side *= 2

    def from_bytes(self, x: torch.Tensor) -> torch.Tensor:
        """8-bit network inputs as the network takes them: float32 first, then the network's
        dtype, as the CPU path converts."""
        return x.float().div_(255).to(dtype=self.dtype, memory_format=self.memory_format)

    def forward_all(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Forward a list of inputs, batching those of equal shape and dtype ``tile.batch_size``
        at a time."""
        outputs: list[np.ndarray | None] = [None] * len(inputs)
        by_shape: dict[tuple, list[int]] = {}
        for i, x in enumerate(inputs):
            by_shape.setdefault((x.shape, x.dtype), []).append(i)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.tile.batch_size):
                chunk = indices[start : start + self.tile.batch_size]
                result = self.forward(np.stack([inputs[i] for i in chunk]))
                for i, y in zip(chunk, result):
                    outputs[i] = y
        return outputs


def to_bytes(y: torch.Tensor) -> torch.Tensor:
    """Network outputs in [0, 1] as contiguous 8-bit pixels, rounded as upstream rounds on the CPU."""
    return y.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8).contiguous()


def _to_host(y: torch.Tensor) -> np.ndarray:
    """``y`` as a contiguous NCHW array in host memory (from CUDA, page-locked: see
    ``page_locked_copy``)."""
    y = y.contiguous()
    if y.device.type != "cuda":
        return y.numpy()
    host = page_locked_copy(y)
    torch.cuda.current_stream(y.device).synchronize()
    return host.numpy()


class _stopwatch:
    """Milliseconds of device work in a ``with`` block; read ``ms`` once the results are on the host."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
        else:
            self.elapsed = (time.perf_counter() - self.started) * 1e3

    @property
    def ms(self) -> float:
        return self.start.elapsed_time(self.end) if self.cuda else self.elapsed


def load_upscaler(name: str, store, engine, *, denoise: float | None = None) -> Upscaler:
    """The registry upscaler ``name`` with its weights, on the device ``engine`` configures."""
    from serve_app.engines.compiled import CompiledNetwork, artifacts_path
    from serve_app.engines.dense_blocks import split_dense_blocks
    from serve_app.engines.device import resolve_compile, resolve_device, resolve_dtype
    from serve_app.engines.interrupt import interruptible
    from serve_app.engines.networks import load_network
    from serve_app.weights.registry import get_spec

    spec = get_spec(name)
    if spec.kind != "upscaler":
        raise ValueError(f"{name} is a {spec.kind} model, not an upscaler")
    device = resolve_device(engine.device)
    dtype = resolve_dtype(engine.precision, device)
    network = split_dense_blocks(load_network(spec, store, device, dtype, denoise=denoise))
    upscaler = Upscaler(network, spec.scale, device=device, dtype=dtype, tile=engine.tile)
    # Each denoise value is a network of its own: those run eager rather than compile per value.
    if resolve_compile(engine.compile, device) and denoise is None and engine.tile.size:
        artifacts = artifacts_path(store.config.resolved_cache_dir(), name, device, dtype, engine.tile.size)
        upscaler.run = CompiledNetwork(network, size=engine.tile.size, max_batch=engine.tile.batch_size,
                                       device=device, dtype=dtype, memory_format=upscaler.memory_format,
                                       artifacts=artifacts)
        upscaler.eight_bit_graphs = upscaler.run.timed_graphs(upscaler.from_bytes, to_bytes, torch.uint8)
    elif device.type == "cpu":  # eager on the CPU, where one tile can take a minute
        interruptible(network)
    return upscaler
