"""An experiment: RRDBNet's two upsampling steps computed on the small grid.

    python -m bench.small_grid [--out FILE.json]      # CUDA; prints JSON

Question: how much of a tile's time is RRDBNet's tail (two nearest x2 steps, each followed by a
3x3 convolution, then two 3x3 convolutions on the 4x grid), and how much of it does
computing each step on the small grid save?

After a nearest x2, each pixel of the large grid sees only two distinct rows and two distinct
columns of the small grid through its 3x3 window, and which two depends only on the pixel's
parity. So the convolution is four 2x2 convolutions of the small grid, one per parity, whose
weights are sums of the 3x3 kernel's taps, interleaved into the large grid: 16 multiply-adds
per channel pair and small pixel where the original spends 36, and no enlarged copy of the
features is written and read back. Zero padding agrees too: the large grid's border row maps to
the small grid's. Outputs agree to rounding.

Measured in the service's own way (dense blocks split, torch.compile, one CUDA graph per batch
size captured with cuDNN timing its algorithms): the whole network as shipped and with the
small-grid steps, at batches of 1 to 8 tiles of 256x256, and the tail alone both ways. PSNR of
each against the fp32 network with its original steps. The answer is in `bench/RESULTS.md`:
the tail is a small part of a tile, and cuDNN's 2x2 convolutions make it slower, not faster.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bench.common import graph_ms, replay_ms, tensor_psnr

BATCHES = (1, 2, 4, 8)

# For each parity of the large grid: which 3x3 taps fall on the first and on the second of the
# two small-grid rows (or columns) its window covers. Even rows see row i-1 through tap 0 and
# row i through taps 1 and 2; odd rows see row i through taps 0 and 1 and row i+1 through tap 2.
_TAPS = {0: ((0,), (1, 2)), 1: ((0, 1), (2,))}


class NearestUpConv(nn.Module):
    """``conv(interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3 ``conv`` with padding 1,
    computed on the grid of ``x``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise ValueError(f"expected a plain 3x3 convolution with padding 1, got {conv}")
        self.out_channels = conv.out_channels
        weight = conv.weight.detach().double()  # taps summed before the cast to the network's format
        phases = [_fold(weight, row_parity, col_parity) for row_parity in (0, 1) for col_parity in (0, 1)]
        self.conv = nn.Conv2d(conv.in_channels, 4 * conv.out_channels, 2, 1, 1, bias=conv.bias is not None,
                              device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat(phases))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.detach().repeat(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        # A 2x2 convolution padded by 1 gives (h+1) x (w+1) windows; window (i, j) starts at
        # row i-1, column j-1. Parity (a, b) of large pixel (2i+a, 2j+b) takes window (i+a, j+b).
        windows = self.conv(x).unflatten(1, (2, 2, self.out_channels))  # n, a, b, c, h+1, w+1
        phases = [windows[:, a, b, :, a:a + h, b:b + w] for a in (0, 1) for b in (0, 1)]
        grid = torch.stack(phases, dim=-1).unflatten(-1, (2, 2))  # n, c, h, w, a, b
        return grid.permute(0, 1, 2, 4, 3, 5).reshape(n, self.out_channels, 2 * h, 2 * w)


def _fold(weight: torch.Tensor, row_parity: int, col_parity: int) -> torch.Tensor:
    """The 2x2 kernel that parity (row_parity, col_parity) of the large grid applies to the small."""
    rows = [weight[:, :, list(taps)].sum(dim=2) for taps in _TAPS[row_parity]]  # each: out, in, 3
    return torch.stack([torch.stack([row[:, :, list(taps)].sum(dim=2) for taps in _TAPS[col_parity]], dim=-1)
                        for row in rows], dim=-2)


class SmallGridRRDBNet(nn.Module):
    """basicsr's ``RRDBNet``, its two upsampling steps replaced by ``NearestUpConv``."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.scale = network.scale
        self.conv_first, self.body, self.conv_body = network.conv_first, network.body, network.conv_body
        self.up1, self.up2 = NearestUpConv(network.conv_up1), NearestUpConv(network.conv_up2)
        self.conv_hr, self.conv_last = network.conv_hr, network.conv_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scales below 4 fold the picture into channels first, as basicsr does.
        feat = F.pixel_unshuffle(x, 4 // self.scale) if self.scale < 4 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.up1(feat), 0.2)
        feat = F.leaky_relu(self.up2(feat), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class Tail(nn.Module):
    """What RRDBNet does after its trunk, from the 64 features of the small grid to the picture."""

    def __init__(self, network: nn.Module, small_grid: bool):
        super().__init__()
        self.up1 = NearestUpConv(network.conv_up1) if small_grid else _Nearest(network.conv_up1)
        self.up2 = NearestUpConv(network.conv_up2) if small_grid else _Nearest(network.conv_up2)
        self.conv_hr, self.conv_last = network.conv_hr, network.conv_last

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        feat = F.leaky_relu(self.up2(F.leaky_relu(self.up1(feat), 0.2)), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class _Nearest(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _service_graphs(network: nn.Module, tiles: torch.Tensor, folder: Path):
    """``network`` compiled and captured as the service does it, and its GPU ms per batch size."""
    from serve_app.engines.compiled import CompiledNetwork

    compiled = CompiledNetwork(network, size=tiles.shape[-1], max_batch=len(tiles), device=tiles.device,
                               dtype=tiles.dtype, memory_format=torch.channels_last,
                               artifacts=folder / f"{id(network)}.bin")
    return compiled, {b: replay_ms(compiled._graphs[b], tiles[:b]) for b in BATCHES}


def _tail_ms(tail: nn.Module, features: torch.Tensor) -> dict[int, float]:
    from serve_app.engines.compiled import cudnn_benchmark

    compiled = torch.compile(tail.to(memory_format=torch.channels_last))
    with cudnn_benchmark():
        return {b: graph_ms(compiled, features[:b]) for b in BATCHES}


def measure() -> dict:
    from bench.common import x4plus_tile_bench

    bench = x4plus_tile_bench()
    small_grid = SmallGridRRDBNet(copy.deepcopy(bench.shipped)).to(memory_format=torch.channels_last)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "weights": bench.weights,
              "network_ms": {}, "tail_ms": {}, "psnr_vs_fp32_db": {}}
    fp32, folder = bench.fp32_outputs(), Path(tempfile.mkdtemp())
    for name, network in (("shipped", bench.shipped), ("small_grid", small_grid)):
        compiled, report["network_ms"][name] = _service_graphs(network, bench.half, folder)
        with torch.inference_mode():
            report["psnr_vs_fp32_db"][name] = tensor_psnr(compiled(bench.half[:2]).clone(), fp32)
        report["tail_ms"][name] = _tail_ms(Tail(bench.shipped, small_grid=name == "small_grid"), bench.features)
    return report

if __name__ == "__main__":
    from bench.common import experiment_main

    experiment_main(measure, __doc__)
