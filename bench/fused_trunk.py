"""An experiment: RRDBNet's trunk (its chain of RRDB blocks) as fused Triton convolutions.

    python -m bench.fused_trunk [--out FILE.json]      # CUDA; prints JSON

Question: is the memory traffic between the convolutions what keeps the compiled x4plus at
about 31% of the roofline? Through cuDNN, each dense block's concatenations are either copied
before each convolution or (``serve_app/engines/dense_blocks.py``, what the service runs)
replaced by partial sums that Inductor's element-wise kernels add up; in an H100 profile those
kernels took about a third of the GPU time.

Here that traffic is gone. Every dense block keeps its input and its four new maps side by side
in one buffer, channels last, with a zero border of one pixel (N x (H+2) x (W+2) x 192). Each
convolution is one kernel: it reads a prefix of the buffer's channels as the concatenation,
with no copy, and its epilogue adds the bias and applies the leaky ReLU (or the block's and the
RRDB's scaled residuals) before writing its own channels into the buffer. Nothing else runs
between them. In the padded buffer a 3x3 convolution is a sum of nine matrix products over one
flat list of pixels, each read at a fixed offset (one pixel or one padded row away); border
pixels are computed, never written, and stay zero.

The measurement compares, in CUDA graphs: this trunk, the whole network with it (the rest
eager), and the service's compiled network, at batches of 1 to 8 tiles of 256x256, with PSNR
against fp32. The answer is in `bench/RESULTS.md`: no faster, so the service keeps cuDNN.
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.triton_conv import conv3x3_products, interior, triton

if triton is not None:
    import triton.language as tl

_LEAKY, _BLOCK_RESIDUAL, _RRDB_RESIDUAL = 0, 1, 2  # what a convolution's epilogue does


if triton is not None:
    @triton.jit
    def _conv3x3(src, w, bias, dst, res, res2, total, width, plane, height,
                 SRC_C: tl.constexpr, DST_C: tl.constexpr, DST_AT: tl.constexpr, CIN: tl.constexpr,
                 COUT: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 CACHE: tl.constexpr):
        """One 3x3 convolution over BLOCK_M padded pixels: the first CIN channels of ``src``
        (SRC_C channels a pixel) times ``w`` (9 x CIN x COUT), then the epilogue of MODE, into
        channels DST_AT.. of ``dst`` at the interior pixels only."""
        p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.arange(0, COUT)
        acc = conv3x3_products(src, w, p, n, total, width, SRC_C, 0, CIN, COUT, BLOCK_M, COUT, BLOCK_K, CACHE)
        acc += tl.load(bias + n).to(tl.float32)[None, :]
        if MODE == 0:
            out = tl.where(acc > 0, acc, acc * 0.2)
        else:  # the dense block's output: its last convolution, scaled, plus the block's input
            out = acc * 0.2 + tl.load(res + p[:, None] * SRC_C + n[None, :], mask=(p < total)[:, None],
                                      other=0.0).to(tl.float32)
            if MODE == 2:  # the RRDB's output: its third block's, scaled, plus the RRDB's input
                out = out * 0.2 + tl.load(res2 + p[:, None] * DST_C + n[None, :], mask=(p < total)[:, None],
                                          other=0.0).to(tl.float32)
        inside = interior(p, total, width, plane, height)
        tl.store(dst + p[:, None] * DST_C + DST_AT + n[None, :], out.to(dst.dtype.element_ty),
                 mask=inside[:, None])


class FusedTrunk(nn.Module):
    """The function of basicsr's RRDBNet ``body`` (a sequence of RRDBs), on CUDA in fp16 or
    bf16, through ``_conv3x3``. Input and output are N x C x H x W feature maps."""

    # The fastest of the tried block shapes on an H100 (see ``TUNINGS``).
    tuning = {"block_m": 128, "block_k": 64, "num_warps": 4, "num_stages": 4, "cache": ""}

    def __init__(self, body: nn.Sequential):
        super().__init__()
        first = body[0].rdb1
        self.feat, self.grow = first.conv1.in_channels, first.conv1.out_channels
        self.width = self.feat + 4 * self.grow  # a dense block's buffer: its input and four maps
        weights, biases = [], []
        for rrdb in body:
            for rdb in (rrdb.rdb1, rrdb.rdb2, rrdb.rdb3):
                for conv in (rdb.conv1, rdb.conv2, rdb.conv3, rdb.conv4, rdb.conv5):
                    # out x in x 3 x 3 -> 9 x in x out: the k-th of nine taps is a matrix
                    weights.append(conv.weight.detach().permute(2, 3, 1, 0).reshape(9, conv.in_channels, -1))
                    biases.append(conv.bias.detach())
        self.weights = nn.ParameterList([nn.Parameter(w.contiguous(), requires_grad=False) for w in weights])
        self.biases = nn.ParameterList([nn.Parameter(b.contiguous(), requires_grad=False) for b in biases])
        self.blocks = len(body)

    @torch.compiler.disable  # hand-written kernels: the compiler sees an opaque call
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # Three buffers in turn: an RRDB's input stays in one while its blocks use the other two.
        buffers = [x.new_zeros(n, h + 2, w + 2, self.width) for _ in range(3)]
        buffers[0][:, 1:-1, 1:-1, :c] = x.permute(0, 2, 3, 1)
        geometry = (buffers[0].numel() // self.width, w + 2, (h + 2) * (w + 2), h)
        conv = iter(zip(self.weights, self.biases))
        now = 0
        for _ in range(self.blocks):
            ins = [now, (now + 1) % 3, (now + 2) % 3]
            outs = [ins[1], ins[2], now]  # the third block writes the RRDB's output over its input
            for i in range(3):
                src, dst = buffers[ins[i]], buffers[outs[i]]
                for j in range(4):
                    weight, bias = next(conv)
                    self._launch(src, weight, bias, src, src, src, geometry, self.feat + j * self.grow,
                                 self.feat + j * self.grow, self.grow, _LEAKY)
                weight, bias = next(conv)
                mode = _RRDB_RESIDUAL if i == 2 else _BLOCK_RESIDUAL
                self._launch(src, weight, bias, dst, src, buffers[now], geometry, self.width, 0, self.feat, mode)
        return buffers[now][:, 1:-1, 1:-1, :c].permute(0, 3, 1, 2)

    def _launch(self, src, weight, bias, dst, res, res2, geometry, cin, dst_at, cout, mode):
        tune = self.tuning
        block_k = tune["block_k"] if cin % tune["block_k"] == 0 else 32
        grid = (triton.cdiv(geometry[0], tune["block_m"]),)
        _conv3x3[grid](src, weight, bias, dst, res, res2, *geometry, SRC_C=self.width, DST_C=self.width,
                       DST_AT=dst_at, CIN=cin, COUT=cout, MODE=mode, BLOCK_M=tune["block_m"],
                       BLOCK_K=block_k, CACHE=tune["cache"], num_warps=tune["num_warps"],
                       num_stages=tune["num_stages"])


# (pixels a program, input channels a step, warps, pipeline stages, L1 caching of the reads)
TUNINGS = [(128, 64, 4, 4, ""), (128, 64, 4, 4, ".ca"), (128, 64, 4, 3, ""), (128, 32, 4, 4, ""),
           (64, 64, 4, 4, ""), (128, 64, 8, 4, ""), (256, 64, 8, 4, "")]


def measure() -> dict:
    from bench.common import graph_ms, replay_ms, tensor_psnr, weights_in_use
    from serve_app.config import EngineConfig, TileConfig, WeightsConfig
    from serve_app.engines.networks import load_network
    from serve_app.engines.upscaler import load_upscaler
    from serve_app.weights import WeightsStore, get_spec

    folder = Path(tempfile.mkdtemp())
    weights = weights_in_use(folder, folder / "cache", ["RealESRGAN_x4plus"])
    store = WeightsStore(WeightsConfig(folder=folder, cache_dir=folder / "cache", download=False))
    spec, cuda = get_spec("RealESRGAN_x4plus"), torch.device("cuda")
    plain = load_network(spec, store, cuda, torch.half).to(memory_format=torch.channels_last)
    fused = copy.deepcopy(plain)
    fused.body = FusedTrunk(plain.body)
    tiles = torch.rand(8, 3, 256, 256, device=cuda, generator=torch.Generator(cuda).manual_seed(0))
    half = tiles.half().contiguous(memory_format=torch.channels_last)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "weights": weights}
    with torch.inference_mode():
        fp32 = load_network(spec, store, cuda)(tiles[:2])
        report["psnr_vs_fp32_db"] = {"fused_fp16": tensor_psnr(fused(half[:2]), fp32),
                                     "cudnn_fp16_eager": tensor_psnr(plain(half[:2]), fp32)}
    features = torch.randn(8, 64, 256, 256, device=cuda, dtype=torch.half).contiguous(
        memory_format=torch.channels_last)
    tried, names = {}, ("block_m", "block_k", "num_warps", "num_stages", "cache")
    for tuning in TUNINGS:
        fused.body.tuning = dict(zip(names, tuning))  # this trunk's, over the class's default
        tried["{}-{}-{}-{}{}".format(*tuning)] = graph_ms(fused.body, features, repeats=5)
    report["fused_trunk_batch8_ms_by_tuning"] = tried
    fused.body.tuning = dict(zip(names, TUNINGS[0]))
    report["fused_trunk_ms"] = {b: graph_ms(fused.body, features[:b]) for b in (1, 8)}
    report["fused_network_ms"] = {b: graph_ms(fused, half[:b]) for b in (1, 2, 4, 8)}
    started = time.perf_counter()
    engine = load_upscaler("RealESRGAN_x4plus", store, EngineConfig(device="cuda", compile="on",
                           tile=TileConfig(size=256, batch_size=8)))
    report["compile_s"] = time.perf_counter() - started
    # The service's network: dense blocks split, compiled, one CUDA graph per batch size.
    report["compiled_network_ms"] = {b: replay_ms(engine.run._graphs[b], half[:b]) for b in (1, 2, 4, 8)}
    with torch.inference_mode():
        report["psnr_vs_fp32_db"]["compiled_fp16"] = tensor_psnr(engine.run(half[:2]), fp32)
    report["tflop_per_tile"] = 2.35  # RRDBNet x4plus at 256x256 (torch.utils.flop_counter)
    return report


if __name__ == "__main__":
    from bench.common import experiment_main

    experiment_main(measure, __doc__)
