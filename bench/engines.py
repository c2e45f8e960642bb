"""Engine benchmark: the GPU (or CPU) stage of the upscaler and face engines, no Ray.

    python bench/engines.py                       # CUDA if present, else a small CPU smoke run
    python bench/engines.py --weights-dir DIR     # weights (official or converted) from DIR

Without --weights-dir, real weights are used wherever the weights store has them (the cache,
or the ncnn copies of RealESRGAN_x4plus and its two siblings); random weights elsewhere. The
report says which.

Prints one JSON document: device, versions, settings, and per engine the throughput at a
fixed tile shape, plus how far fp16 drifts from fp32 on a real photo (PSNR).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data

import serve_app
from serve_app.config import EngineConfig, TileConfig, WeightsConfig
from serve_app.engines import face_geometry as geo
from serve_app.engines.faces import load_face_engine
from serve_app.engines.networks import build_network
from serve_app.engines.upscaler import load_upscaler
from serve_app.weights import WeightsStore, get_spec


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up (cuDNN algorithm choice, allocator)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _weights_in_use(folder: Path, cache: Path, names: list[str]) -> dict[str, str]:
    """Fill ``folder`` with random weights for the models no real file can be had for."""
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
            torch.save({"params_ema": build_network(spec).state_dict()}, folder / spec.file.filename)
            used[name] = "random"
    return used


def bench_upscaler(store, name, device, tile, batch, repeats):
    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    results = {}
    for precision in ("fp32", "fp16") if device == "cuda" else ("fp32",):
        config = EngineConfig(device=device, precision=precision, tile=TileConfig(size=tile, batch_size=batch))
        engine = load_upscaler(name, store, config)
        tiles = np.random.default_rng(0).random((batch, 3, tile, tile), dtype=np.float32)
        seconds = _timed(lambda: engine.forward(tiles), repeats)
        small = photo[:: max(1, 512 // (tile * 2)), :: max(1, 512 // (tile * 2))]
        image_seconds = _timed(lambda: engine.upscale([small]), max(1, repeats // 2))
        results[precision] = {
            "tiles_per_s": batch / seconds,
            "tile_ms": 1e3 * seconds / batch,
            "image": list(small.shape[:2]),
            "image_ms": 1e3 * image_seconds,
            "output": engine.upscale([small])[0],
        }
    if "fp16" in results:
        results["fp16_vs_fp32_psnr_db"] = _psnr(results["fp16"]["output"], results["fp32"]["output"])
    for r in results.values():
        if isinstance(r, dict):
            r.pop("output")
    return results


def bench_faces(store, name, device, batch, repeats):
    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    landmarks = np.array([[200, 110], [250, 110], [225, 140], [205, 170], [245, 170]], np.float32)
    crop, _ = geo.align_face(photo, landmarks)
    results = {}
    for precision in ("fp32", "fp16") if device == "cuda" else ("fp32",):
        engine = load_face_engine(name, store, EngineConfig(device=device, precision=precision))
        seconds = _timed(lambda: engine.restore([crop] * batch), repeats)
        results[precision] = {"faces_per_s": batch / seconds, "face_ms": 1e3 * seconds / batch}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", type=Path, help="real weights; default: random weights")
    parser.add_argument("--upscaler", default="RealESRGAN_x4plus")
    parser.add_argument("--face-model", default="GFPGANv1.4")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tile, batch, repeats = (256, 8, 10) if cuda else (96, 2, 2)
    folder = args.weights_dir or Path(tempfile.mkdtemp())
    cache = WeightsConfig().resolved_cache_dir()
    used = _weights_in_use(folder, cache, [args.upscaler, args.face_model, "retinaface_resnet50", "parsenet"])
    store = WeightsStore(WeightsConfig(folder=folder, cache_dir=cache, download=False))
    if cuda:
        torch.backends.cudnn.benchmark = True
    report = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "serve_app": serve_app.__version__},
        "settings": {"tile": tile, "batch": batch, "repeats": repeats, "weights": used},
        "upscaler": {args.upscaler: bench_upscaler(store, args.upscaler, device, tile, batch, repeats)},
        "faces": {args.face_model: bench_faces(store, args.face_model, device, batch, repeats)},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
