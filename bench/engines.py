"""Reference paths and our engines' device stage, in one process, no Ray.

- reference: ``RealESRGANer.enhance`` and ``GFPGANer.enhance``, one image at a time, as the usual
  FastAPI or queue-worker deployments call them;
- ours: the upscaler's forward at a fixed tile shape (eager fp32, eager fp16, compiled fp16 on
  CUDA), its TFLOP/s and share of a matmul peak measured here; GFPGAN faces/s, RetinaFace's
  time per photo; and how far fp16 and compiled outputs drift from fp32 eager on the photo
  (PSNR).
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import ASTRONAUT_FACE, known_face_detector, photo, psnr, timed
from serve_app.api import RestoreOptions
from serve_app.config import AppArgs, EngineConfig, TileConfig
from serve_app.engines import face_geometry as geo
from serve_app.engines.face_detection import RetinaFaceDetector
from serve_app.engines.faces import load_face_engine
from serve_app.engines.local import LocalNetworks, restore_image
from serve_app.engines.networks import build_network
from serve_app.engines.upscaler import load_upscaler
from serve_app.weights import get_spec


def matmul_peak_tflops(device: str) -> float:
    """A dense matmul's TFLOP/s here (bf16 on CUDA, fp32 on CPU): the roofline we compare with."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, 20 if device == "cuda" else 3)
    return 2 * n**3 / seconds / 1e12


def flops_per_tile(engine, tile: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, tile, tile, device=engine.device, dtype=engine.dtype)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        engine.network(x)
    return float(counter.get_total_flops())


def reference_upscaler(store, name: str, device: str, size: int, repeats: int) -> dict:
    """RealESRGANer.enhance, one size x size picture at a time, untiled, fp16 on CUDA."""
    from realesrgan import RealESRGANer

    spec = get_spec(name)
    upsampler = RealESRGANer(scale=spec.scale, model_path=str(store.fetch(spec, spec.file)),
                             model=build_network(spec), tile=0, pre_pad=10, half=device == "cuda",
                             device=torch.device(device))
    img = photo(size)
    seconds = timed(lambda: upsampler.enhance(img), repeats)
    return {"input": [size, size], "images_per_s": 1 / seconds, "ms": 1e3 * seconds}


def _fixed_face(detect):
    """Run the real detector (its time counts), then answer with the photo's known face."""
    def detect_faces(img, *args, **kwargs):
        detect(img, *args, **kwargs)
        return ASTRONAUT_FACE.copy()
    return detect_faces


def reference_faces(store, name: str, device: str, repeats: int) -> dict:
    """GFPGANer.enhance (upscale 2, no background upsampler) on the 512x512 one-face photo."""
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
    detector = restorer.face_helper.face_det
    detector.detect_faces = _fixed_face(detector.detect_faces)
    img = photo()
    with contextlib.redirect_stdout(io.StringIO()):
        seconds = timed(lambda: restorer.enhance(img, paste_back=True), repeats)
    return {"input": [512, 512], "faces": 1, "images_per_s": 1 / seconds, "ms": 1e3 * seconds}


def _variants(device: str, compile_too: bool) -> list[tuple[str, str, str]]:
    """(name, precision, compile mode) of each way to run a stage: fp32 eager first, the baseline
    the others' PSNR is taken against."""
    variants = [("fp32", "off")]
    if device == "cuda":
        variants.append(("fp16", "off"))
    if compile_too:
        variants.append(("fp16" if device == "cuda" else "fp32", "on"))
    return [(f"{p}-{'compiled' if c == 'on' else 'eager'}", p, c) for p, c in variants]


def upscaler_stage(store, name: str, device: str, tile: int, batch: int, repeats: int, peak: float,
                   compile_too: bool) -> dict:
    img = photo(tile)
    results, outputs = {}, {}
    for key, precision, compile_mode in _variants(device, compile_too):
        config = EngineConfig(device=device, precision=precision, compile=compile_mode,
                              tile=TileConfig(size=tile, batch_size=batch))
        engine = load_upscaler(name, store, config)
        # 8-bit tiles, as the service sends a photo's: the copies each way are part of the stage.
        tiles = np.random.default_rng(0).integers(0, 256, (batch, 3, tile, tile), dtype=np.uint8)
        bare_ms: list[float] = []
        seconds = timed(lambda: bare_ms.append(engine.forward_timed(tiles)[1]), repeats)
        bare_seconds = float(np.median(bare_ms)) / 1e3
        flops = flops_per_tile(engine, tile) * batch
        networks = LocalNetworks(store, config)
        networks.upscalers[name, None] = engine
        outputs[key] = restore_image(img, RestoreOptions(model=name), networks).pixels
        results[key] = {
            # the network alone (CUDA events): the GPU stage against the roofline
            "bare_tiles_per_s": batch / bare_seconds, "bare_tflops": flops / bare_seconds / 1e12,
            "bare_percent_of_matmul_peak": 100 * flops / bare_seconds / 1e12 / peak,
            # the whole call: uint8 tiles in, uint8 outputs back in host memory
            "tiles_per_s": batch / seconds, "tile_ms": 1e3 * seconds / batch,
            "tflops": flops / seconds / 1e12, "percent_of_matmul_peak": 100 * flops / seconds / 1e12 / peak}
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            engine.forward(tiles)
            results[key]["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["psnr_vs_fp32_eager_db"] = {k: psnr(v, outputs["fp32-eager"]) for k, v in outputs.items()
                                        if k != "fp32-eager"}
    return results


def detector_times(detector: RetinaFaceDetector, img: np.ndarray, batch: int, repeats: int) -> dict:
    """RetinaFace on one photo and on a batch of them, each shape's CUDA graph captured first
    where the detector keeps them; then how far a graph's outputs are from a plain call's."""
    for _ in range(2):  # a shape gets its graph the second time it comes
        detector([img]), detector([img] * batch)
    times = {"detect_one_photo_ms": 1e3 * timed(lambda: detector([img]), repeats),
             "detect_photo_in_batch_ms": 1e3 * timed(lambda: detector([img] * batch), repeats) / batch}
    if detector.outputs.shapes():
        with torch.inference_mode():
            x = torch.from_numpy(img[None]).to(detector.network.device)
            replayed, plain = detector.outputs(x), RetinaFaceDetector(detector.network).outputs(x)
            times["detector_graph_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(replayed, plain))
    return times


def face_stage(store, name: str, device: str, batch: int, repeats: int, compile_too: bool) -> dict:
    img = photo()
    crop, _ = geo.align_face(img, geo.faces_of(ASTRONAUT_FACE)[1][0])
    results, outputs = {}, {}
    defaults = AppArgs()
    for key, precision, compile_mode in _variants(device, compile_too):
        config = EngineConfig(device=device, precision=precision, compile=compile_mode)
        engine = load_face_engine(name, store, config, detect_graphs=defaults.face_detect_graphs,
                                  detect_graph_pixels=defaults.face_detect_graph_pixels,
                                  detect_first_sight_pixels=defaults.face_detect_batch_pixels)
        one = timed(lambda: engine.restore([crop]), repeats)
        seconds = timed(lambda: engine.restore([crop] * batch), repeats)
        masks = timed(lambda: engine.paste_masks([crop]), repeats)
        outputs[key] = engine.restore([crop])[0]
        detection = detector_times(engine.detector, img, batch, repeats)
        engine.detector = known_face_detector(engine.detector)
        networks = LocalNetworks(store, config)
        networks.face_engines[name] = engine
        options = RestoreOptions(model="none", face_enhance=True, face_model=name, scale=2)
        whole = timed(lambda: restore_image(img, options, networks), repeats)
        # 8-bit faces in; 8-bit faces, or float64 paste masks, back in host memory
        results[key] = {"one_face_ms": 1e3 * one, "faces_per_s": batch / seconds, "face_ms": 1e3 * seconds / batch,
                        "paste_mask_one_face_ms": 1e3 * masks, **detection, "whole_image_ms": 1e3 * whole}
    results["psnr_vs_fp32_eager_db"] = {k: psnr(v, outputs["fp32-eager"]) for k, v in outputs.items()
                                        if k != "fp32-eager"}
    return results


def run(store, *, upscaler: str, face_model: str, device: str, tile: int, batch: int, repeats: int,
        compile_too: bool) -> dict:
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    peak = matmul_peak_tflops(device)
    return {
        "matmul_peak_tflops": {"dtype": "bf16" if device == "cuda" else "fp32", "value": peak},
        "reference": {
            "RealESRGANer": reference_upscaler(store, upscaler, device, tile, repeats),
            "GFPGANer": reference_faces(store, face_model, device, max(1, repeats // 2)),
        },
        "upscaler": {upscaler: upscaler_stage(store, upscaler, device, tile, batch, repeats, peak, compile_too)},
        "faces": {face_model: face_stage(store, face_model, device, batch, repeats, compile_too)},
    }
