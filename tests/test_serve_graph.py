"""The real graph on a local Ray instance with one logical GPU, over real HTTP."""
import base64

import cv2
import httpx
import numpy as np
import pytest
import ray
from ray import serve

from serve_app.app import build_app
from serve_app.config import AppArgs, EngineConfig, TileConfig, WeightsConfig

URL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def service(weights_dir, tmp_path_factory):
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    args = AppArgs(
        weights=WeightsConfig(folder=weights_dir, cache_dir=tmp_path_factory.mktemp("c"), download=False),
        upscalers=["realesr-animevideov3", "RealESRGAN_x4plus", "RealESRNet_x4plus"],
        engine=EngineConfig(device="cpu", tile=TileConfig(size=64, pad=8, blend=4)),
    )
    serve.run(build_app(args), name="restore", route_prefix="/")
    with httpx.Client(base_url=URL, timeout=120) as client:
        yield client
    serve.shutdown()
    ray.shutdown()


def _png(img):
    return cv2.imencode(".png", img)[1].tobytes()


def test_gpu_deployments_share_one_logical_gpu(service):
    assert service.get("/healthz").status_code == 200
    # Real-ESRGAN and GFPGAN replicas hold 0.5 each of the one logical GPU: none is left.
    assert ray.cluster_resources()["GPU"] == 1
    assert ray.available_resources().get("GPU", 0) == pytest.approx(0.0)


def test_restore_raw_bytes_returns_a_4x_png(service, small_photo):
    r = service.post("/v1/restore", params={"model": "realesr-animevideov3"}, content=_png(small_photo))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-request-id"] and "x-timing-restore-ms" in r.headers
    out = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out.shape == (160, 224, 3)


def test_restore_json_and_legacy_inference(service, small_photo):
    image = base64.b64encode(_png(small_photo)).decode()
    r = service.post("/v1/restore", json={"image": image, "model": "realesr-animevideov3", "scale": 2,
                                          "format": "jpeg"})
    body = r.json()
    assert r.status_code == 200 and (body["format"], body["width"], body["height"]) == ("jpeg", 112, 80)
    r = service.post("/inference", json={"img_str": image, "tile": 0, "half": False})
    assert r.status_code == 200  # a JSON string holding the base64 PNG of the x4 result
    out = cv2.imdecode(np.frombuffer(base64.b64decode(r.json()), np.uint8), cv2.IMREAD_UNCHANGED)
    assert out.shape == (160, 224, 3)


@pytest.mark.parametrize("params, content, status, code", [
    ({"model": "realesr-animevideov3"}, b"", 400, "empty_image"),
    ({"model": "realesr-animevideov3"}, b"plain text, not an image" * 4, 400, "not_an_image"),
    ({"model": "realesr-animevideov3"}, b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "unsupported_format"),
    ({"model": "realesr-animevideov3", "scale": "-1"}, None, 400, "invalid_option"),
    ({"model": "no-such-model"}, None, 400, "invalid_option"),
    ({"model": "RealESRNet_x4plus"}, None, 503, "weights_unavailable"),  # offered, no file
])
def test_errors_are_typed_json(service, small_photo, params, content, status, code):
    r = service.post("/v1/restore", params=params, content=_png(small_photo) if content is None else content)
    assert (r.status_code, r.json()["error"]) == (status, code), r.text
    assert r.json()["detail"]


def test_models_lists_presence(service):
    models = {m["name"]: m for m in service.get("/v1/models").json()["models"]}
    assert models["realesr-animevideov3"]["present"] and models["realesr-animevideov3"]["offered"]
    assert models["RealESRNet_x4plus"]["offered"] and not models["RealESRNet_x4plus"]["present"]
