"""An experiment: what a face detector pass costs the first, second and later times its shape comes.

    python -m bench.detector_shapes [--out FILE.json]      # meant for CUDA; prints JSON

Question: in the served face path's closed loop at 8 and 16 requests in flight, detector
passes took 115-164 ms at p99 against 8 ms at p50, where batches of 5 to 8 photos came a few
times each. Users send pictures of every size, so a shape (picture size and count) is often
new. Which sight of a shape is slow, by how much, and what does skipping cuDNN on the first
sight (``without_cudnn``) save?

The detector is built as the face replica builds it (``load_face_engine``'s RetinaFace, fp32,
random weights that see no face), in two forms that share the network: ``service``, with the
service's settings (a shape's first pass without cuDNN, a CUDA graph from its second), and
``cudnn_always``, which never captures and always uses cuDNN (the service before the change).
Each form gets shapes of its own, so that neither finds cuDNN plans the other made: the
service the ``SHAPES`` below, ``cudnn_always`` each of them 16 rows taller. Each shape is
passed four times; each call is timed to its answer.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import experiment_main, photo, weights_in_use
from serve_app.config import RuntimeConfig, WeightsConfig
from serve_app.engines.face_detection import RetinaFaceDetector
from serve_app.engines.networks import load_network
from serve_app.weights import WeightsStore, get_spec

# (height, width, pictures in the pass): the benchmark photo in every batch count the face
# replica forms, then single pictures of sizes users send (phone, camera, web crops)
SHAPES = [(512, 512, n) for n in range(1, 9)] + [(480, 640, 1), (720, 960, 1), (600, 800, 1), (750, 1000, 1),
                                                   (333, 500, 1), (768, 1024, 1), (681, 1023, 1), (512, 384, 1)]


def measure() -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(tempfile.mkdtemp())
    weights_in_use(folder, folder / "cache", ["retinaface_resnet50"])
    store = WeightsStore(WeightsConfig(folder=folder, cache_dir=folder / "cache", download=False))
    network = load_network(get_spec("retinaface_resnet50"), store, device)
    runtime = RuntimeConfig()
    service = RetinaFaceDetector(network, graphs=runtime.face_detect_graphs if device.type == "cuda" else 0,
                                 graph_pixels=runtime.face_detect_graph_pixels,
                                 first_sight_pixels=runtime.face_detect_batch_pixels)
    cudnn_always = RetinaFaceDetector(network)
    cudnn_always.outputs.first_sight = cudnn_always.outputs.forward  # the network, every time
    base = photo()
    for _ in range(3):  # the process's first CUDA work, on a shape of neither set
        cudnn_always([base[:500]]), service([base[:500]])
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "cpus": os.cpu_count(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                    # PyTorch's cuDNN switches, read from the environment (TORCH_CUDNN_V8_API_DISABLED)
                    "environment": {k: v for k, v in os.environ.items() if k.startswith("TORCH_CUDNN")},
                    "shapes": []}
    for height, width, count in SHAPES:
        report["shapes"].append({"picture": [height, width], "count": count,
                                 "service_ms": _four_calls(service, base, height, width, count),
                                 "cudnn_always_ms": _four_calls(cudnn_always, base, height + 16, width, count)})
    for form in ("service", "cudnn_always"):
        calls = np.array([s[f"{form}_ms"] for s in report["shapes"]])
        report[form] = {f"{sight}_ms_median": float(np.median(calls[:, k]))
                        for k, sight in enumerate(("first", "second", "third", "fourth"))}
    return report


def _four_calls(detector: RetinaFaceDetector, base: np.ndarray, height: int, width: int, count: int) -> list[float]:
    pictures = [np.ascontiguousarray(np.resize(base, (height, width, 3))) for _ in range(count)]
    return [_timed(detector, pictures) for _ in range(4)]


def _timed(detector: RetinaFaceDetector, pictures: list[np.ndarray]) -> float:
    started = time.perf_counter()
    detector(pictures)  # answers in host memory: the pass is done
    return (time.perf_counter() - started) * 1e3


if __name__ == "__main__":
    experiment_main(measure, __doc__)
