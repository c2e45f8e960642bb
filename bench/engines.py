"""Engine benchmark: the GPU (or CPU) stage of the upscaler and face engines, no Ray.

    python bench/engines.py                       # CUDA if present, else a small CPU smoke run
    python bench/engines.py --weights-dir DIR     # weights (official or converted) from DIR

Without --weights-dir, real weights are used wherever the weights store has them (the cache,
or the ncnn copies of RealESRGAN_x4plus and its two siblings); random weights elsewhere. The
report says which.

Prints one JSON document: device, versions, settings; the reference paths (RealESRGANer and
GFPGANer, one image at a time, as the usual FastAPI or queue-worker deployments run them); per
engine the throughput at a fixed tile shape, its TFLOP/s and share of a matmul peak measured
in the same run; and how far fp16 drifts from fp32 on a real photo (PSNR).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
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
            state = build_network(spec).state_dict()
            # facexlib's own loaders (used by the reference GFPGANer) read a bare state dict.
            payload = state if spec.kind in ("detector", "parser") else {"params_ema": state}
            torch.save(payload, folder / spec.file.filename)
            used[name] = "random"
    return used


def matmul_peak_tflops(device: str) -> float:
    """A dense matmul's TFLOP/s here (bf16 on CUDA, fp32 on CPU): the roofline we compare with."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _timed(lambda: a @ b, 20 if device == "cuda" else 3)
    return 2 * n**3 / seconds / 1e12


def flops_per_tile(engine, tile: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, tile, tile, device=engine.device, dtype=engine.dtype)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        engine.network(x)
    return float(counter.get_total_flops())


def reference_upscaler(store, name, device, size, repeats):
    """RealESRGANer.enhance, one size x size picture at a time, untiled, fp16 on CUDA."""
    from realesrgan import RealESRGANer

    spec = get_spec(name)
    upsampler = RealESRGANer(scale=spec.scale, model_path=str(store.fetch(spec, spec.file)),
                             model=build_network(spec), tile=0, pre_pad=10, half=device == "cuda",
                             device=torch.device(device))
    img = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (size, size), interpolation=cv2.INTER_AREA)
    seconds = _timed(lambda: upsampler.enhance(img), repeats)
    return {"input": [size, size], "images_per_s": 1 / seconds, "ms": 1e3 * seconds}


def reference_faces(store, name, device, repeats):
    """GFPGANer.enhance (upscale 2, no background upsampler) on the 512x512 astronaut, one face.

    The detector's output is fixed (the test suite's landmarks), so detection time is not
    counted: with random detector weights it would find arbitrary faces.
    """
    import contextlib
    import io
    import os

    from gfpgan import GFPGANer

    spec = get_spec(name)
    folder = Path(tempfile.mkdtemp())
    (folder / "gfpgan" / "weights").mkdir(parents=True)
    for helper in ("retinaface_resnet50", "parsenet"):
        helper_spec = get_spec(helper)
        (folder / "gfpgan" / "weights" / helper_spec.file.filename).symlink_to(store.fetch(helper_spec, helper_spec.file))
    here = os.getcwd()
    os.chdir(folder)  # facexlib reads ./gfpgan/weights
    try:
        restorer = GFPGANer(model_path=str(store.fetch(spec, spec.file)), upscale=2, arch="clean",
                            channel_multiplier=2, device=torch.device(device))
    finally:
        os.chdir(here)
    face = np.array([[150, 40, 300, 230, 0.99, 200, 110, 250, 110, 225, 140, 205, 170, 245, 170]], np.float32)
    restorer.face_helper.face_det.detect_faces = lambda img, threshold: face
    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    with contextlib.redirect_stdout(io.StringIO()):
        seconds = _timed(lambda: restorer.enhance(photo, paste_back=True), repeats)
    return {"input": [512, 512], "images_per_s": 1 / seconds, "ms": 1e3 * seconds}


def bench_upscaler(store, name, device, tile, batch, repeats, peak):
    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    results = {}
    for precision in ("fp32", "fp16") if device == "cuda" else ("fp32",):
        config = EngineConfig(device=device, precision=precision, tile=TileConfig(size=tile, batch_size=batch))
        engine = load_upscaler(name, store, config)
        tiles = np.random.default_rng(0).random((batch, 3, tile, tile), dtype=np.float32)
        seconds = _timed(lambda: engine.forward(tiles), repeats)
        small = photo[:: max(1, 512 // (tile * 2)), :: max(1, 512 // (tile * 2))]
        image_seconds = _timed(lambda: engine.upscale([small]), max(1, repeats // 2))
        tflops = flops_per_tile(engine, tile) * batch / seconds / 1e12
        results[precision] = {
            "tiles_per_s": batch / seconds,
            "tile_ms": 1e3 * seconds / batch,
            "tflops": tflops,
            "percent_of_matmul_peak": 100 * tflops / peak,
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
    peak = matmul_peak_tflops(device)
    report = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "serve_app": serve_app.__version__},
        "settings": {"tile": tile, "batch": batch, "repeats": repeats, "weights": used},
        "matmul_peak_tflops": {"dtype": "bf16" if cuda else "fp32", "value": peak},
        "reference": {
            "RealESRGANer": reference_upscaler(store, args.upscaler, device, tile, repeats),
            "GFPGANer": reference_faces(store, args.face_model, device, max(1, repeats // 2)),
        },
        "upscaler": {args.upscaler: bench_upscaler(store, args.upscaler, device, tile, batch, repeats, peak)},
        "faces": {args.face_model: bench_faces(store, args.face_model, device, batch, repeats)},
    }
    print(json.dumps(report, indent=2))
    print(_table(report), file=sys.stderr)


def _table(report: dict) -> str:
    """A short human summary of the JSON (stderr, so stdout stays JSON)."""
    rows = [f"device: {report['device']}   matmul peak: {report['matmul_peak_tflops']['value']:.1f} TFLOP/s "
            f"({report['matmul_peak_tflops']['dtype']})", "| path | figure |", "| --- | --- |"]
    for name, ref in report["reference"].items():
        rows.append(f"| {name}, {ref['input'][0]}x{ref['input'][1]}, one at a time | {ref['images_per_s']:.2f} images/s |")
    for name, result in report["upscaler"].items():
        for precision, r in result.items():
            if isinstance(r, dict):
                rows.append(f"| {name} {precision}, tiles | {r['tiles_per_s']:.1f} tiles/s, {r['tflops']:.1f} TFLOP/s "
                            f"({r['percent_of_matmul_peak']:.0f}% of peak) |")
    for name, result in report["faces"].items():
        for precision, r in result.items():
            rows.append(f"| {name} {precision}, faces | {r['faces_per_s']:.1f} faces/s |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
