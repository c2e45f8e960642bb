"""An experiment: CUTLASS's Hopper convolutions against cuDNN's, at the shapes of RRDBNet's trunk.

    pip install nvidia-cutlass                      # CUTLASS's headers; not a dependency of the service
    python -m bench.cutlass_conv build              # where nvcc is (13.0 here): bench/cutlass_build/
    python -m bench.cutlass_conv [--out FILE.json]  # on a Hopper GPU; prints JSON

Question: is there a convolution faster than cuDNN's for the trunk? The trunk is nearly all of a
tile, and about 60% of its time is cuDNN's implicit-GEMM convolutions, at about 410 TFLOP/s of
the H200's 790. Triton's convolutions reached half of cuDNN's (``bench/fused_trunk.py``,
``bench/split_trunk.py``). The remaining candidate is a kernel written for Hopper: operands
brought in by the tensor memory engine in im2col mode, multiplied by warp-specialised wgmma,
as CUTLASS builds them (``bench/cutlass_conv.cu``, CUTLASS 4 from the ``nvidia-cutlass``
package; its Hopper convolutions are not persistent yet).

Every 3x3 convolution of a dense block is timed at batches of 1 and 8 tiles of 256x256, in
fp16 and channels last, in both the forms the service could use: the concatenated form of
basicsr (64-192 input channels, 32 or 64 outputs) and the split form the service runs
(``serve_app/engines/dense_blocks.py``: 64 or 32 inputs, 64-192 outputs). cuDNN is timed with
its algorithms benchmarked, as the service captures its graphs; CUTLASS with each tile shape
built, the fastest kept. Both in CUDA graphs. Outputs are checked against cuDNN's. The answer
is in `bench/RESULTS.md`.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.nn import functional as F

FEAT, GROW, SIDE = 64, 32, 256
BLOCKS = 23 * 3  # dense blocks in x4plus's trunk
SOURCE = Path(__file__).with_suffix(".cu")
BUILT = Path(__file__).parent / "cutlass_build" / "cutlass_conv.so"

# (pixels, output channels, input channels) a thread block takes at a time. The wgmma's N is the
# output width, so each form's widths appear, with 32 or 64 input channels a step. CUTLASS runs a
# step wider than the input by filling it with zeros: slower, but correct, and timed like the rest.
TILE_SHAPES = [(128, 32, 64), (128, 32, 32), (64, 32, 64), (128, 64, 64), (128, 64, 32),
               (64, 64, 64), (64, 128, 64), (128, 96, 32), (128, 128, 32), (128, 128, 64),
               (128, 160, 32), (128, 192, 32), (128, 192, 64), (64, 192, 64)]


def dense_block_convolutions() -> dict[str, list[tuple[int, int]]]:
    """(input, output) channels of a dense block's five 3x3 convolutions, in each form."""
    concatenated = [(FEAT + i * GROW, GROW) for i in range(4)] + [(FEAT + 4 * GROW, FEAT)]
    split = [(FEAT, 4 * GROW + FEAT)] + [(GROW, (4 - i) * GROW + FEAT) for i in range(1, 5)]
    return {"concatenated": concatenated, "split": split}


def build(target: Path = BUILT) -> Path:
    """Compile one object per tile shape in parallel with nvcc for sm_90a, linked into one library."""
    cutlass = Path(importlib.util.find_spec("cutlass_library").origin).parent / "source"
    flags = ["-std=c++17", "-O3", "-DNDEBUG", "-gencode=arch=compute_90a,code=sm_90a",
             "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
             f"-I{cutlass / 'include'}", f"-I{cutlass / 'tools' / 'util' / 'include'}"]
    target.parent.mkdir(parents=True, exist_ok=True)

    def compile_one(shape: tuple[int, int, int]) -> Path:
        obj = target.parent / "conv_{}x{}x{}.o".format(*shape)
        subprocess.run(["nvcc", *flags, *("-DTILE_{}={}".format(*p) for p in zip("MNK", shape)), "-c", str(SOURCE),
                        "-o", str(obj)], check=True)
        print("built", obj.name, file=sys.stderr, flush=True)
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        objects = list(pool.map(compile_one, TILE_SHAPES))
    subprocess.run(["nvcc", "-shared", "-o", str(target), *map(str, objects)], check=True)
    for obj in objects:
        obj.unlink()
    return target


class CutlassConv:
    """The built library: ``run(shape, x, weight)`` convolves fp16 channels-last ``x`` with
    ``weight`` (padding 1) using one tile shape, or returns None if that shape cannot."""

    def __init__(self, library: Path = BUILT):
        self.library = ctypes.CDLL(str(library))
        for shape in TILE_SHAPES:
            fn = self._fn(shape)
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5 + [ctypes.c_void_p]
            fn.restype = ctypes.c_int

    def _fn(self, shape):
        return getattr(self.library, "conv_{}x{}x{}".format(*shape))

    def run(self, shape, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        n, c, h, w = x.shape
        k = weight.shape[0]
        out = torch.empty(n, k, h, w, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
        code = self._fn(shape)(x.data_ptr(), weight.data_ptr(), out.data_ptr(), n, h, w, c, k,
                               torch.cuda.current_stream().cuda_stream)
        if code == 1:
            return None
        if code != 0:
            raise RuntimeError(f"CUTLASS convolution {shape} failed with code {code}")
        return out


def tflops(batch: int, cin: int, cout: int, ms: float) -> float:
    return 2 * batch * SIDE * SIDE * 9 * cin * cout / ms / 1e9


def time_convolution(lib: CutlassConv, batch: int, cin: int, cout: int) -> dict:
    """cuDNN and every tile shape CUTLASS can run, on one convolution's shape."""
    from bench.common import graph_ms
    from serve_app.engines.compiled import cudnn_benchmark

    cuda = torch.device("cuda")
    x = torch.randn(batch, cin, SIDE, SIDE, device=cuda, dtype=torch.half).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, 3, 3, device=cuda) / (3 * cin**0.5)).half()
    weight = weight.contiguous(memory_format=torch.channels_last)  # K x R x S x C in memory
    with cudnn_benchmark():
        cudnn_ms = graph_ms(lambda t: F.conv2d(t, weight, padding=1), x)
        expected = F.conv2d(x, weight, padding=1).float()
    tried, worst = {}, 0.0
    for shape in TILE_SHAPES:
        got = lib.run(shape, x, weight)
        if got is None:
            continue
        error = float((got.float() - expected).abs().max() / expected.abs().max())
        if error > 1e-2:
            raise RuntimeError(f"CUTLASS {shape} differs from cuDNN on {cin}->{cout}: {error:.3g}")
        worst = max(worst, error)
        tried["{}x{}x{}".format(*shape)] = graph_ms(lambda t: lib.run(shape, t, weight), x)
    best = min(tried, key=tried.get)
    return {"cin": cin, "cout": cout, "cudnn_ms": cudnn_ms, "cudnn_tflops": tflops(batch, cin, cout, cudnn_ms),
            "cutlass_best_tile": best, "cutlass_ms": tried[best],
            "cutlass_tflops": tflops(batch, cin, cout, tried[best]), "cutlass_ms_by_tile": tried,
            "cutlass_max_error_vs_cudnn": worst}  # relative to cuDNN's largest output value


def measure() -> dict:
    lib = CutlassConv()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "forms": {}}
    for form, shapes in dense_block_convolutions().items():
        for batch in (1, 8):
            rows = [time_convolution(lib, batch, cin, cout) for cin, cout in shapes]
            cudnn = sum(r["cudnn_ms"] for r in rows)
            best = sum(min(r["cudnn_ms"], r["cutlass_ms"]) for r in rows)
            report["forms"][f"{form}_batch{batch}"] = {
                "convolutions": rows, "block_cudnn_ms": cudnn, "block_best_of_both_ms": best,
                "trunk_saving_ms": BLOCKS * (cudnn - best)}
    return report


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        print(build())
    else:
        from bench.common import experiment_main

        experiment_main(measure, __doc__)
