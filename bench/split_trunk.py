"""An experiment: RRDBNet's trunk in its split form as Triton kernels that keep running sums.

    python -m bench.split_trunk [--out FILE.json]      # CUDA; prints JSON

Question: can convolutions with wide outputs and no element-wise kernels make a tile cheaper?
``bench/fused_trunk.py`` fused the element-wise work into Triton convolutions of the
concatenated form, whose 32 output channels keep the tensor cores poorly fed (240 TFLOP/s, no
faster than the service). The service's split form (``serve_app/engines/dense_blocks.py``) has
wide convolutions (192, 160, 128, 96 and 64 output channels), but its partial results are
written out by cuDNN and added up by separate element-wise kernels, about a third of its time.

Here each feature map's convolution is one kernel that adds its products to the running sums of
every later convolution in its epilogue, and finishes the next feature map (bias, leaky ReLU)
or the block's output (its residuals) there too. A dense block keeps everything in one buffer,
channels last, with a zero border of one pixel (N x (H+2) x (W+2) x 384): its input (64
channels), its four new maps (4 x 32) and the running sums (192). Five kernels a block, nothing
between them. The sums are kept in the network's number format, rounded at each addition.

The measurement compares, in CUDA graphs at batches of 1 and 8 tiles of 256x256 in fp16: this
trunk with a few block shapes, the service's compiled trunk (split blocks through cuDNN), and
whole networks with each, with PSNR against fp32. The answer is in `bench/RESULTS.md`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from bench.triton_conv import conv3x3_products, interior, triton

if triton is not None:
    import triton.language as tl

FEAT, GROW = 64, 32
_SUMS_AT = FEAT + 4 * GROW  # where the running sums start in a block's buffer
WIDTH = _SUMS_AT + 4 * GROW + FEAT  # input, four maps, sums of convolutions 1-5: 384 channels
_FIRST, _MIDDLE, _BLOCK_OUT, _RRDB_OUT = 0, 1, 2, 3  # what a kernel's epilogue does


if triton is not None:
    @triton.jit
    def _part(buf, out, rrdb_in, w, bias, total, width, plane, height,
              SRC_AT: tl.constexpr, CIN: tl.constexpr, NOUT: tl.constexpr, NPAD: tl.constexpr,
              SUMS_AT: tl.constexpr, NEXT_AT: tl.constexpr, MODE: tl.constexpr, C: tl.constexpr,
              GROW_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
        """One feature map (CIN channels of ``buf`` from SRC_AT) convolved with ``w`` (9 x CIN x
        NPAD) for output channels pid_n*BLOCK_N.., over BLOCK_M padded pixels, then the epilogue
        of MODE. Output channel j belongs to the running sum at SUMS_AT + j; the next map, if
        any, goes to NEXT_AT."""
        p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = conv3x3_products(buf, w, p, n, total, width, C, SRC_AT, CIN, NPAD, BLOCK_M, BLOCK_N, BLOCK_K, "")
        here = p[:, None] * C + n[None, :]
        valid = interior(p, total, width, plane, height)[:, None] & (n < NOUT)[None, :]
        if MODE == 0:  # the block's input: every convolution's bias, added once
            acc += tl.load(bias + n, mask=n < NOUT, other=0.0).to(tl.float32)[None, :]
        else:
            acc += tl.load(buf + here + SUMS_AT, mask=valid, other=0.0).to(tl.float32)
        if MODE <= 1:
            # The first GROW_C sums are complete: the next map, stored apart; the rest wait.
            nxt = tl.where(acc > 0, acc, acc * 0.2)
            tl.store(buf + here + NEXT_AT, nxt.to(buf.dtype.element_ty), mask=valid & (n < GROW_C)[None, :])
            tl.store(buf + here + SUMS_AT, acc.to(buf.dtype.element_ty), mask=valid & (n >= GROW_C)[None, :])
        else:  # the block's output: its last sum, scaled, plus the block's input
            result = acc * 0.2 + tl.load(buf + here, mask=valid, other=0.0).to(tl.float32)
            if MODE == 3:  # the RRDB's output: its third block's, scaled, plus the RRDB's input
                result = result * 0.2 + tl.load(rrdb_in + here, mask=valid, other=0.0).to(tl.float32)
            tl.store(out + here, result.to(out.dtype.element_ty), mask=valid)


class SplitTrunk(nn.Module):
    """The RRDB trunk of a network whose dense blocks are ``SplitDenseBlock`` s, through ``_part``.
    Input and output are N x 64 x H x W feature maps."""

    tuning = {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3}

    def __init__(self, body: nn.Sequential):
        super().__init__()
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for rrdb in body:
            for block in (rrdb.rdb1, rrdb.rdb2, rrdb.rdb3):
                for part in block.parts:
                    # out x in x 3 x 3 -> 9 x in x out, the outputs padded to whole blocks of 128
                    weight = part.weight.detach().permute(2, 3, 1, 0).reshape(9, part.in_channels, -1)
                    weight = F.pad(weight, (0, -weight.shape[-1] % 128))
                    self.weights.append(nn.Parameter(weight.contiguous(), requires_grad=False))
                self.biases.append(nn.Parameter(block.parts[0].bias.detach().contiguous(), requires_grad=False))
        self.rrdbs = len(body)

    @torch.compiler.disable  # hand-written kernels: the compiler sees an opaque call
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # Three buffers in turn: an RRDB's input stays in one while its blocks use the other two.
        buffers = [x.new_zeros(n, h + 2, w + 2, WIDTH) for _ in range(3)]
        buffers[0][:, 1:-1, 1:-1, :c] = x.permute(0, 2, 3, 1)
        geometry = (buffers[0].numel() // WIDTH, w + 2, (h + 2) * (w + 2), h)
        weights, biases = iter(self.weights), iter(self.biases)
        now = 0
        for _ in range(self.rrdbs):
            ins = [now, (now + 1) % 3, (now + 2) % 3]
            outs = [ins[1], ins[2], now]  # the third block writes the RRDB's output over its input
            for i in range(3):
                buf, bias = buffers[ins[i]], next(biases)
                for g in range(5):
                    mode = (_FIRST if g == 0 else _MIDDLE) if g < 4 else (_RRDB_OUT if i == 2 else _BLOCK_OUT)
                    self._launch(buf, buffers[outs[i]], buffers[now], next(weights), bias, geometry, g, mode)
        return buffers[now][:, 1:-1, 1:-1, :c].permute(0, 3, 1, 2)

    def _launch(self, buf, out, rrdb_in, weight, bias, geometry, g, mode):
        tune, nout = self.tuning, WIDTH - _SUMS_AT - GROW * g
        cin = FEAT if g == 0 else GROW
        grid = (triton.cdiv(geometry[0], tune["block_m"]), triton.cdiv(nout, tune["block_n"]))
        _part[grid](buf, out, rrdb_in, weight, bias, *geometry,
                    SRC_AT=0 if g == 0 else FEAT + GROW * (g - 1), CIN=cin, NOUT=nout, NPAD=weight.shape[-1],
                    SUMS_AT=_SUMS_AT + GROW * g, NEXT_AT=FEAT + GROW * g, MODE=mode,
                    C=WIDTH, GROW_C=GROW, BLOCK_M=tune["block_m"], BLOCK_N=tune["block_n"],
                    BLOCK_K=min(cin, 64), num_warps=tune["num_warps"], num_stages=tune["num_stages"])


# (pixels a program, output channels a program, warps, pipeline stages)
TUNINGS = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 3), (256, 64, 8, 3)]


def measure() -> dict:
    from bench.common import graph_ms, replay_ms, tensor_psnr, x4plus_tile_bench
    from serve_app.config import EngineConfig, TileConfig
    from serve_app.engines.compiled import cudnn_benchmark
    from serve_app.engines.upscaler import load_upscaler

    bench = x4plus_tile_bench()
    shipped, half, features = bench.shipped, bench.half, bench.features
    ours = copy.deepcopy(shipped)
    ours.body = SplitTrunk(shipped.body)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "weights": bench.weights}
    fp32 = bench.fp32_outputs()
    with torch.inference_mode():
        report["psnr_vs_fp32_db"] = {"split_trunk_fp16": tensor_psnr(ours(half[:2]), fp32)}
        report["trunk_max_abs_diff_vs_cudnn"] = float((ours.body(features[:2]).float()
                                                       - shipped.body(features[:2]).float()).abs().max())
    tried, names = {}, ("block_m", "block_n", "num_warps", "num_stages")
    for tuning in TUNINGS:
        ours.body.tuning = dict(zip(names, tuning))  # this trunk's, over the class's default
        tried["{}-{}-{}-{}".format(*tuning)] = graph_ms(ours.body, features, repeats=5)
    report["split_trunk_batch8_ms_by_tuning"] = tried
    best = min(tried, key=tried.get)
    ours.body.tuning = dict(zip(names, map(int, best.split("-"))))
    report["best_tuning"] = best
    report["split_trunk_ms"] = {b: graph_ms(ours.body, features[:b]) for b in (1, 8)}
    report["split_trunk_network_ms"] = {b: graph_ms(ours, half[:b]) for b in (1, 8)}
    with cudnn_benchmark():
        report["service_trunk_ms"] = {b: graph_ms(torch.compile(shipped.body), features[:b]) for b in (1, 8)}
    engine = load_upscaler("RealESRGAN_x4plus", bench.store, EngineConfig(device="cuda", compile="on",
                           tile=TileConfig(size=256, batch_size=8)))
    report["service_network_ms"] = {b: replay_ms(engine.run._graphs[b], half[:b]) for b in (1, 8)}
    with torch.inference_mode():
        report["psnr_vs_fp32_db"]["service_fp16"] = tensor_psnr(engine.run(half[:2]), fp32)
    return report

if __name__ == "__main__":
    from bench.common import experiment_main

    experiment_main(measure, __doc__)
