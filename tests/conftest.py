"""Shared fixtures: real architectures with random weights, saved the way the official
releases are and read back through our own weights store; real photos from scikit-image."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from skimage import data

from bench.clips import encode_source, make_clip as make_video  # noqa: F401  (the tests' clips)
import serve_app  # noqa: F401  (installs the torchvision shim before any basicsr import)
from serve_app.api import Restored, RestoreOptions
from serve_app.config import WeightsConfig
from serve_app.engines.networks import build_network
from serve_app.weights import WeightsStore, get_spec

# The official files hold {"params_ema": ...} (Real-ESRGAN x4plus family, GFPGAN),
# {"params": ...} (the v3 SRVGG models), or a bare DataParallel dict (RetinaFace).
_LAYOUT = {
    "RealESRGAN_x4plus": "params_ema",
    "RealESRGAN_x2plus": "params_ema",
    "realesr-animevideov3": "params",
    "realesr-general-x4v3": "params",
    "GFPGANv1.4": "params_ema",
    "RestoreFormer": "params_ema",
    "retinaface_resnet50": "module",
    "parsenet": None,
}


def save_random_checkpoint(name: str, folder, seed: int = 0, layout: str | None = None) -> None:
    """``name``'s files with random weights, laid out as its official release (or ``layout``)."""
    spec = get_spec(name)
    for i, file in enumerate(spec.files):
        torch.manual_seed(seed + i)
        state = build_network(spec).state_dict()
        layout = layout or _LAYOUT[name]
        if layout == "module":
            payload = {f"module.{k}": v for k, v in state.items()}
        elif layout is None:
            payload = state
        else:
            payload = {layout: state}
        torch.save(payload, folder / file.filename)


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    for name in _LAYOUT:
        save_random_checkpoint(name, folder)
    return folder


@pytest.fixture(scope="session")
def store(weights_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return WeightsStore(WeightsConfig(folder=weights_dir, cache_dir=cache, download=False))


@pytest.fixture(scope="session")
def astronaut_bgr() -> np.ndarray:
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="session")
def small_photo(astronaut_bgr) -> np.ndarray:
    """A 40x56 piece of a real photo: big enough for texture, small enough for CPU tests."""
    return np.ascontiguousarray(astronaut_bgr[100:140, 180:236])


# The astronaut's face, as a detector would report it: box, score, eyes, nose, mouth corners.
ASTRONAUT_FACE = np.array(
    [[150, 40, 300, 230, 0.99, 200, 110, 250, 110, 225, 140, 205, 170, 245, 170]], np.float32
)


def restore_with(networks, pixels: np.ndarray, **options) -> Restored:
    """``pixels`` restored by the service's one orchestration of a request, with ``networks``
    (``serve_app.engines.local.LocalNetworks``) in this process."""
    from serve_app.engines.local import restore_image

    return restore_image(pixels, RestoreOptions(**options), networks)


def photo_with_profile_and_gps(small_photo, orientation=1) -> tuple[bytes, bytes]:
    """A JPEG as a phone writes one: an ICC profile, GPS tags and an EXIF orientation."""
    import io

    from PIL import Image, ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Camera maker"
    exif.get_ifd(0x8825).update({1: "N", 2: (51.0, 30.0, 12.5), 3: "W", 4: (0.0, 7.0, 39.9)})
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(small_photo, cv2.COLOR_BGR2RGB)).save(
        buf, "JPEG", quality=95, exif=exif, icc_profile=icc)
    return buf.getvalue(), icc


def packets_of(path: Path, kind: str) -> list[bytes]:
    with av.open(str(path)) as container:
        stream = [s for s in container.streams if s.type == kind][0]
        return [bytes(p) for p in container.demux(stream) if p.size]


def has_cuda_driver() -> bool:
    """Whether this machine has a CUDA driver (the GPU replicas then sleep while the GPU works)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


# Groups by what a test needs (pytest -m): "ray" starts Ray (and the graph on it), "engine"
# builds networks and runs them on the CPU; the rest are pure functions, seconds in all.
_RAY = {"test_serve_graph", "test_front_door"}
_ENGINE = {"test_compiled", "test_dense_blocks", "test_faces", "test_models", "test_ncnn", "test_no_cudnn",
           "test_upscaler", "test_weights", "test_heap", "test_cuda_graphs", "test_bench_served"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in _RAY:
            item.add_marker(pytest.mark.ray)
        elif module in _ENGINE:
            item.add_marker(pytest.mark.engine)
    items.sort(key=lambda item: "ray" not in item.keywords)  # the longest group starts first


@pytest.fixture(autouse=True)
def _ray_goes_first(request):
    """Ray runs its workers, the replicas among them, at niceness 15 (``RAY_worker_niceness``).
    Beside them, a test at niceness 0 building networks on the same two cores would take
    nearly all the CPU and triple the Ray modules' time, the suite's longest path; the other
    tests yield instead, every thread of theirs (Linux keeps niceness per thread)."""
    if "ray" in request.keywords or os.getpriority(os.PRIO_PROCESS, 0) == 19:
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), 19)
        except OSError:  # a thread that ended meanwhile
            pass


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """With pytest-xdist (pyproject's ``-n 3``): one worker runs the modules that start Ray, one
    after the other, since each starts its own Ray on the same ports; the others take the rest
    test by test (and so does the first, once done). Three on two cores: the Ray modules wait
    for nodes, replicas and HTTP much of their time, which a third worker fills. Our own
    grouping: xdist's ``loadgroup`` leaves groups apart under pytest 9."""
    from xdist.scheduler import LoadScopeScheduling

    class RayApart(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "ray" if module.rsplit("/", 1)[-1].removesuffix(".py") in _RAY else nodeid

    return RayApart(config, log)
