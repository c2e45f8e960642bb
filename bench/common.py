"""What the benchmark sections share: timing, the test photo, PSNR and which weights are real."""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data

from serve_app.config import WeightsConfig
from serve_app.engines.networks import build_network
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


def percentiles(ms: list[float]) -> dict:
    values = np.array(ms)
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 95, 99)}
