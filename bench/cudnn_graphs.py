"""An experiment: one RRDB dense block as cuDNN's fused convolution graphs (cudnn-frontend).

    pip install --no-deps nvidia-cudnn-frontend   # not a dependency of the service; its backend path needs no more
    python -m bench.cudnn_graphs [--out FILE.json]   # CUDA; prints JSON

Question: ``bench/fused_trunk.py`` showed that convolutions with the element-wise work fused in
are only worth having if they run as fast as cuDNN's own. cuDNN can fuse too: its graph API
takes a convolution followed by pointwise operations and builds one kernel for it. PyTorch does
not expose that; cudnn-frontend does.

Here the dense block is concatenation-free in the way the Triton trunk was: one channels-last
buffer holds the block's input and its four new maps side by side, each convolution reads a
prefix of its channels as the concatenation (a strided view, no copy) and writes bias + leaky
ReLU into its own channels; the fifth writes ``(conv + bias) * 0.2 + x`` into the next block's
buffer. Every graph's plans are all built and timed, and the fastest kept.

cuDNN fuses such epilogues only in its runtime-compiled kernels, so the same in-place block is
also built with graphs of the convolution alone, which its precompiled kernels may take, each
followed by one compiled element-wise kernel that applies the bias and leaky ReLU (or the
residual) to the convolution's channels in place: the "plain" block.

Against both, at 8 tiles of 256x256 in fp16: the service's block (``SplitDenseBlock``, compiled,
replayed as a CUDA graph) and each of its convolutions alone through PyTorch. The answer is in
`bench/RESULTS.md`.
"""
from __future__ import annotations

import time

import torch
from torch.nn import functional as F

from bench.common import experiment_main, graph_ms

BATCH, SIZE, FEAT, GROW = 8, 256, 64, 32
BLOCKS_IN_X4PLUS = 23 * 3
SLOPE, RESIDUAL = 0.2, 0.2


def _strides(channels: int) -> list[int]:
    """NCHW dims, channels-last memory, in a buffer of ``channels`` channels a pixel."""
    return [SIZE * SIZE * channels, 1, SIZE * channels, channels]


def _event_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / repeats)
    return best


class ConvGraph:
    """One cuDNN graph: a 3x3 convolution of the first ``cin`` channels of a ``src_channels``
    buffer, then (``epilogue``) bias and leaky ReLU or bias and the block residual, or nothing,
    into ``cout`` channels of a ``dst_channels`` buffer. All plans are built; the fastest is kept."""

    def __init__(self, cudnn, handle, cin: int, src_channels: int, cout: int, dst_channels: int,
                 epilogue: str | None):
        self.handle = handle
        half = cudnn.data_type.HALF
        g = cudnn.pygraph(io_data_type=half, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        self.x = g.tensor(name="x", dim=[BATCH, cin, SIZE, SIZE], stride=_strides(src_channels), data_type=half)
        self.w = g.tensor(name="w", dim=[cout, cin, 3, 3], stride=[9 * cin, 1, 3 * cin, cin], data_type=half)
        y = g.conv_fprop(image=self.x, weight=self.w, padding=[1, 1], stride=[1, 1], dilation=[1, 1], name="conv")
        self.b = self.r = self.scale = None
        if epilogue is not None:
            self.b = g.tensor(name="b", dim=[1, cout, 1, 1], stride=[cout, 1, cout, cout], data_type=half)
            y = g.bias(input=y, bias=self.b, name="bias")
        if epilogue == "residual":
            self.scale = g.tensor(name="scale", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1],
                                  data_type=cudnn.data_type.FLOAT, is_pass_by_value=True)
            self.r = g.tensor(name="r", dim=[BATCH, cout, SIZE, SIZE], stride=_strides(src_channels), data_type=half)
            y = g.add(a=g.scale(input=y, scale=self.scale, name="scaled"), b=self.r, name="residual")
        elif epilogue == "leaky":
            y = g.leaky_relu(y, negative_slope=SLOPE, name="leaky")
        y.set_output(True).set_data_type(half).set_dim([BATCH, cout, SIZE, SIZE]).set_stride(_strides(dst_channels))
        self.y, self.graph = y, g
        started = time.perf_counter()
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans(cudnn.build_plan_policy.ALL)
        self.build_s = time.perf_counter() - started
        self.plan, self.workspace = 0, None

    def bind(self, src, weight, bias, dst, residual=None) -> dict:
        pack = {self.x: src, self.w: weight, self.y: dst}
        if self.b is not None:
            pack[self.b] = bias.view(1, -1, 1, 1)
        if self.r is not None:
            pack[self.r] = residual
            pack[self.scale] = torch.full((1, 1, 1, 1), RESIDUAL)
        return pack

    def tune(self, pack: dict) -> dict:
        """Time every plan that runs; keep the fastest."""
        times = {}
        for i in range(self.graph.get_execution_plan_count()):
            try:
                ws = torch.empty(max(1, self.graph.get_workspace_size_plan_at_index(i)), device="cuda",
                                 dtype=torch.uint8)
                times[i] = (_event_ms(lambda: self.graph.execute_plan_at_index(pack, ws, i, handle=self.handle), 5), ws)
            except Exception:  # a plan that does not build or run here: cuDNN lists some
                continue
        self.plan = min(times, key=lambda i: times[i][0])
        self.workspace = times[self.plan][1]
        return {"plans_run": len(times), "best": self.graph.get_plan_name_at_index(self.plan),
                "ms": times[self.plan][0], "build_s": self.build_s}

    def __call__(self, pack: dict) -> None:
        self.graph.execute_plan_at_index(pack, self.workspace, self.plan, handle=self.handle)


def measure() -> dict:
    import cudnn

    from serve_app.engines.dense_blocks import SplitDenseBlock  # first: serve_app shims torchvision for basicsr
    from basicsr.archs.rrdbnet_arch import ResidualDenseBlock  # noqa: I001

    torch.backends.cudnn.benchmark = True
    cuda = torch.device("cuda")
    block = ResidualDenseBlock(FEAT, GROW).to(cuda, torch.half).eval().requires_grad_(False)
    convs = [block.conv1, block.conv2, block.conv3, block.conv4, block.conv5]
    x = torch.randn(BATCH, FEAT, SIZE, SIZE, device=cuda, dtype=torch.half).contiguous(memory_format=torch.channels_last)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": cudnn.backend_version(), "cudnn_frontend": cudnn.__version__,
              "batch": BATCH, "tile": SIZE}

    # The service's block, and its five convolutions alone (what its element-wise kernels add to).
    split = SplitDenseBlock(block).to(cuda, torch.half).eval()
    report["service_block_ms"] = graph_ms(torch.compile(split), x)
    with torch.inference_mode():
        parts = []
        for part in split.parts:
            features = torch.randn(BATCH, part.in_channels, SIZE, SIZE, device=cuda, dtype=torch.half).contiguous(
                memory_format=torch.channels_last)
            weight = part.weight.contiguous(memory_format=torch.channels_last)
            parts.append(_event_ms(lambda: F.conv2d(features, weight, padding=1)))
    report["service_convolutions_alone_ms"] = sum(parts)

    # The block in place, fused and plain; each checked against basicsr's block.
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    width = FEAT + 4 * GROW
    here, there = (torch.zeros(BATCH, width, SIZE, SIZE, device=cuda, dtype=torch.half).contiguous(
        memory_format=torch.channels_last) for _ in range(2))
    here[:, :FEAT] = x
    with torch.inference_mode():
        expected = block(x).float()
    for name, fused in (("fused", True), ("plain", False)):
        run_block, tuned = _in_place_block(cudnn, handle, convs, here, there, fused)
        report[f"{name}_convolutions"] = tuned
        report[f"{name}_block_ms"] = _event_ms(run_block)
        there.zero_()
        run_block()
        error = (there[:, :FEAT].float() - expected).abs().max() / expected.abs().max()
        report[f"{name}_max_error_relative"] = float(error)
        report[f"{name}_trunk_saving_ms"] = BLOCKS_IN_X4PLUS * (report["service_block_ms"] - report[f"{name}_block_ms"])
    report["blocks_in_x4plus"] = BLOCKS_IN_X4PLUS
    return report


@torch.compile(dynamic=False)
def _finish_map(y: torch.Tensor, bias: torch.Tensor) -> None:
    """A new feature map's bias and leaky ReLU, in place on its channels of the buffer."""
    y.copy_(F.leaky_relu(y + bias.view(1, -1, 1, 1), SLOPE))


@torch.compile(dynamic=False)
def _finish_block(y: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> None:
    """The block's output in place: the fifth convolution's bias, scaled, plus the block's input."""
    y.copy_((y + bias.view(1, -1, 1, 1)) * RESIDUAL + x)


def _in_place_block(cudnn, handle, convs, here, there, fused: bool):
    """The dense block as five cuDNN graphs that read the concatenation in place from ``here``:
    with their epilogues fused, or (plain) as convolutions alone, each followed by its epilogue
    as one compiled element-wise kernel. Returns the block as a call, and each graph's tuning."""
    width = here.shape[1]
    steps, tuned = [], []
    for k, conv in enumerate(convs):
        last = k == len(convs) - 1
        epilogue = ("residual" if last else "leaky") if fused else None
        step = ConvGraph(cudnn, handle, conv.in_channels, width, conv.out_channels, width, epilogue)
        dst = there[:, :FEAT] if last else here[:, conv.in_channels:conv.in_channels + GROW]
        pack = step.bind(here[:, :conv.in_channels], conv.weight.contiguous(memory_format=torch.channels_last),
                         conv.bias, dst, here[:, :FEAT] if last else None)
        tuned.append({"cin": conv.in_channels, "cout": conv.out_channels, **step.tune(pack)})
        if fused:
            finish = None
        elif last:
            finish = (_finish_block, (dst, conv.bias, here[:, :FEAT]))
        else:
            finish = (_finish_map, (dst, conv.bias))
        steps.append((step, pack, finish))

    def run_block():
        for step, pack, finish in steps:
            step(pack)
            if finish is not None:
                finish[0](*finish[1])
    return run_block, tuned


if __name__ == "__main__":
    experiment_main(measure, __doc__)
