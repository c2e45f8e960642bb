"""What the benchmark sections share: timing, the test photo, PSNR, which weights are real, and
what the x4plus tile experiments start from."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from skimage import data

from serve_app.config import WeightsConfig
from serve_app.engines.dense_blocks import split_dense_blocks
from serve_app.engines.networks import build_network, load_network
from serve_app.weights import WeightsStore, get_spec

# The astronaut photo's one face as RetinaFace reports it (box, score, five landmarks), used where
# the detector's weights are random: the detector still runs and is timed, its answer is this.
ASTRONAUT_FACE = np.array([[150, 40, 300, 230, 0.99, 200, 110, 250, 110, 225, 140, 205, 170, 245, 170]],
                          np.float32)


def known_face_detector(detect):
    """Our batched detector, run for real (its time counts), answering with the photo's known face."""
    def detector(images):
        detect(images)
        return [ASTRONAUT_FACE.copy() for _ in images]
    return detector


def photo(size: int | None = None) -> np.ndarray:
    """The 512x512 astronaut photo (one face), BGR, resized to ``size`` x ``size`` if given."""
    img = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    return img if size is None else cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Seconds per call of ``fn`` after one warm-up call (cuDNN's algorithm choice, the allocator)."""
    fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - start) / repeats


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def weights_in_use(folder: Path, cache: Path, names: list[str]) -> dict[str, str]:
    """Which weights each model runs with: real ones wherever the store has them (cache, folder,
    or an ncnn conversion), else random ones written to ``folder`` in the official layout."""
    real = WeightsStore(WeightsConfig(folder=folder, cache_dir=cache, download=False))
    used = {}
    for name in names:
        spec = get_spec(name)
        found = real.locate(spec, spec.file)
        if found is not None:
            used[name] = found.source
        elif real.convertible(spec, spec.file):
            used[name] = "ncnn"
        else:
            state = build_network(spec).state_dict()
            if spec.kind == "detector":
                _sees_no_faces(state)
            # facexlib's own loaders (used by the reference GFPGANer) read a bare state dict.
            payload = state if spec.kind in ("detector", "parser") else {"params_ema": state}
            torch.save(payload, folder / spec.file.filename)
            used[name] = "random"
    return used


def _sees_no_faces(state: dict) -> None:
    """Make random RetinaFace weights answer "no face" everywhere, as trained ones do on most of
    a picture. Fully random, 4,784 of the photo's anchors scored over 0.97, and facexlib's CPU
    NMS over them took most of its 108 ms per picture on an H100 host: a cost no real detector
    pays, which would have inflated the reference's time and ours."""
    for key in [k for k in state if k.startswith("ClassHead.")]:
        if key.endswith(".weight"):
            state[key].zero_()
        else:  # (background, face) logits per anchor
            state[key].copy_(torch.tensor([8.0, -8.0]).repeat(state[key].numel() // 2))


def graph_ms(fn, x: torch.Tensor, repeats: int = 20) -> float:
    """GPU milliseconds of one replay of ``fn(x)`` captured as a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):  # Triton's compiles and cuDNN's choices happen here, not in the capture
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        fn(x)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def replay_ms(call, x: torch.Tensor, repeats: int = 20) -> float:
    """GPU milliseconds of one call of ``call``, a graph already captured."""
    call(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        call(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def tensor_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two pictures held as tensors in [0, 1] (values outside are clipped)."""
    mse = ((a.float().clamp(0, 1) - b.float().clamp(0, 1)) ** 2).mean().item()
    return float(10 * np.log10(1.0 / max(mse, 1e-20)))


@dataclass
class TileBench:
    """What the x4plus tile experiments start from, on CUDA."""

    store: WeightsStore
    weights: dict[str, str]  # which weights the network runs with (``weights_in_use``)
    shipped: torch.nn.Module  # the service's fp16 network: dense blocks split, channels last
    tiles: torch.Tensor  # 8 tiles of 256x256, fp32 in [0, 1]
    half: torch.Tensor  # the same tiles as the network takes them: fp16, channels last
    features: torch.Tensor  # 8 x 64 x 256 x 256 random fp16 maps, channels last: a trunk's input

    def fp32_outputs(self, count: int = 2) -> torch.Tensor:
        """The first ``count`` tiles through the fp32 network as basicsr builds it: the PSNR reference."""
        with torch.inference_mode():
            return load_network(get_spec("RealESRGAN_x4plus"), self.store, self.tiles.device)(self.tiles[:count])


def x4plus_tile_bench() -> TileBench:
    folder = Path(tempfile.mkdtemp())
    weights = weights_in_use(folder, folder / "cache", ["RealESRGAN_x4plus"])
    store = WeightsStore(WeightsConfig(folder=folder, cache_dir=folder / "cache", download=False))
    cuda = torch.device("cuda")
    shipped = split_dense_blocks(load_network(get_spec("RealESRGAN_x4plus"), store, cuda, torch.half))
    tiles = torch.rand(8, 3, 256, 256, device=cuda, generator=torch.Generator(cuda).manual_seed(0))
    features = torch.randn(8, 64, 256, 256, device=cuda, dtype=torch.half)
    return TileBench(store, weights, shipped.to(memory_format=torch.channels_last), tiles,
                     tiles.half().contiguous(memory_format=torch.channels_last),
                     features.contiguous(memory_format=torch.channels_last))


def percentiles(ms: list[float]) -> dict:
    values = np.array(ms)
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 95, 99)}


def experiment_main(measure: Callable[[], dict], doc: str) -> None:
    """The command line of a one-report experiment (``doc``: its module docstring): run
    ``measure``, print the report as JSON, and write it to ``--out`` too."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write the JSON report too")
    args = parser.parse_args()
    report = json.dumps(measure(), indent=2)
    print(report)
    if args.out:
        args.out.write_text(report)
