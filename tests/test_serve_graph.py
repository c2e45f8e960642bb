"""The real graph, deployed from serve_config.yaml with the `serve` command line onto a local
multi-node Ray cluster (ray.cluster_utils.Cluster): a CPU head and, once the GPU replicas are
pending, a node with one logical GPU (so fractional placement is real), over real HTTP and
through handles. Ray and Serve start once for the whole module; the test plays the cluster
autoscaler, adding and removing the GPU node."""
from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import cv2
import httpx
import numpy as np
import pytest
import ray
import yaml
from ray import serve
from ray._private.authentication_test_utils import reset_auth_token_state  # Ray's own test helper
from ray.cluster_utils import Cluster
from ray.serve.schema import ServeDeploySchema

from conftest import (
    ASTRONAUT_FACE, has_cuda_driver, make_video, packets_of, photo_with_profile_and_gps, restore_with,
    save_random_checkpoint,
)
from servers import chromium, self_signed_certificate
from serve_app.access.keys import key_hash, new_key
from serve_app.config import EngineConfig, TileConfig
from serve_app.engines import face_geometry as geo
from serve_app.engines.local import LocalNetworks
from serve_app.jobs.autoscaling import with_queue_broker
from serve_app.jobs.broker import LocalBroker


ROOT = Path(__file__).resolve().parent.parent
URL = "https://127.0.0.1:8000"  # Serve's proxy terminates TLS, with a self-signed certificate
DASHBOARD = "http://127.0.0.1:8265"
TEST_TILE = {"size": 64, "pad": 8, "blend": 4, "batch_size": 8}  # not the default: built (and compiled) once
TEST_RUNTIME = {
    "upscaler_batch_wait_s": 0.1,  # long enough on 2 CPU cores for concurrent tiles to meet
    "face_batch_size": 8,
    "face_batch_wait_s": 0.2,
    "request_timeout_s": 120,
    "limits": {"max_bytes": 2_000_000, "max_pixels": 1_000_000, "max_output_pixels": 16_000_000,
               "max_faces": 1},  # each face costs seconds on the CPU
}


def _auth(keys: dict[str, str]) -> dict:
    """API keys as an operator configures them: by hash. ``tests`` may do everything, without
    limits; ``busy`` is limited on requests and pixels; ``calm`` may only restore; ``other`` only use jobs."""
    busy_limit = {"requests_per_s": 0.01, "request_burst": 7, "pixels_per_s": 10, "pixel_burst": 3000}
    return {"keys": [
        {"name": "tests", "hash": key_hash(keys["tests"]), "scopes": ["restore", "jobs", "admin"]},
        {"name": "busy", "hash": key_hash(keys["busy"]), "scopes": ["restore"], "rate_limit": busy_limit},
        {"name": "calm", "hash": key_hash(keys["calm"]), "scopes": ["restore"]},
        {"name": "other", "hash": key_hash(keys["other"]), "scopes": ["jobs"]}]}


def _config(weights_dir: Path, cache: Path, runtime: dict, jobs: dict, auth: dict, tls: tuple[Path, Path]) -> dict:
    """serve_config.yaml as shipped, with test weights, CPU engines and quick autoscaling."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app["args"].update(device="cpu", upscalers=["realesr-animevideov3", "RealESRGAN_x4plus", "RealESRNet_x4plus"],
                       face_models=["GFPGANv1.4"], tile=TEST_TILE)
    app["args"]["weights"] = {"folder": str(weights_dir), "cache_dir": str(cache), "download": False,
                              "retry_interval_s": 5}
    app["args"]["jobs"] = jobs
    app["args"]["auth"] = auth  # the shipped http_options.host, 0.0.0.0, needs keys
    config["http_options"].update(ssl_certfile=str(tls[0]), ssl_keyfile=str(tls[1]))
    config["proxy_location"] = "HeadOnly"  # the simulated nodes share one machine and its port 8000
    deployments = {d["name"]: d for d in app["deployments"]}
    for d in deployments.values():
        d["user_config"] = copy.deepcopy(runtime)
    for name in ("Ingress", "PreprocessDeployment", "JobConsumer"):  # CPU work stays on the head, as on EC2
        deployments[name]["ray_actor_options"]["resources"] = {"head": 0.01}
    up = deployments["UpscalerDeployment"]
    up["ray_actor_options"]["num_gpus"] = 0.25  # two upscaler replicas + one face replica = one GPU
    up.update(max_ongoing_requests=8, max_queued_requests=64)
    up["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2,
                                "metrics_interval_s": 0.5}
    deployments["FaceDeployment"]["ray_actor_options"]["num_gpus"] = 0.25  # room for two upscalers
    consumer = deployments["JobConsumer"]
    consumer["max_ongoing_requests"] = 1  # one job at a time: the next stays queued
    consumer["autoscaling_config"].update(max_replicas=1, target_ongoing_requests=1, downscale_delay_s=20,
                                          downscale_to_zero_delay_s=20, look_back_period_s=2)
    consumer["autoscaling_config"]["policy"]["policy_kwargs"]["poll_interval_s"] = 0.5
    return with_queue_broker(config)


def _deploy(config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).parent / "serve"  # the one installed beside this Python
    subprocess.run([str(serve_cli), "deploy", str(path), "--address", DASHBOARD], check=True, timeout=120)


def _wait_for(condition, timeout: float = 120, what: str = "condition") -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def _running(app="restore") -> bool:
    status = serve.status().applications.get(app)
    return status is not None and status.status == "RUNNING"


def _replicas_pending(name: str) -> bool:
    status = serve.status().applications.get("restore")
    if status is None or name not in status.deployments:
        return False
    states = status.deployments[name].replica_states
    return states.get("PENDING_ALLOCATION", 0) + states.get("STARTING", 0) > 0 and not states.get("RUNNING")


def _pending_in_health(name: str) -> dict | None:
    try:
        r = httpx.get(f"{URL}/readyz", timeout=5)
    except httpx.HTTPError:
        return None
    body = r.json() if r.status_code == 503 else {}
    message = body.get("deployments", {}).get(name, {}).get("message", "")
    return body if "Resources required" in message else None


def _replicas(name: str) -> int:
    deployment = serve.status().applications["restore"].deployments[name]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def deployed(weights_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    # Serve says what a replica that cannot be placed needs after this long (30 s by default)
    os.environ["RAY_SERVE_SLOW_STARTUP_WARNING_S"] = "2"
    # Ray's token authentication, as cluster.yaml has it: the mode on every node, the token in a
    # file every process reads (there ~/.ray/auth_token, mounted on each node)
    token = tmp / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    reset_auth_token_state()  # this process read the mode when Ray was imported
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "num_gpus": 0, "resources": {"head": 1}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1"})
    ray.init(address=cluster.address)
    broker = LocalBroker(tmp / "jobs" / "broker")  # what restore-serve starts on one machine
    jobs = {"broker_url": broker.start(), "data_dir": str(tmp / "jobs"), "visibility_timeout_s": 15,
            "urls": {"allow": ["127.0.0.0/8"]},  # the tests' image server and webhook receiver
            "video_segment_s": 0.3}  # the tests' one-second videos in several segments
    weights = tmp / "weights"  # this module's own folder: a test adds a file to it
    weights.mkdir()
    for file in weights_dir.iterdir():
        (weights / file.name).symlink_to(file)
    keys = {name: new_key() for name in ("tests", "busy", "calm", "other")}
    tls = self_signed_certificate(tmp)
    # httpx trusts it (this process only: Ray's processes started with the cluster, above)
    os.environ["SSL_CERT_FILE"] = str(tls[0])
    config = _config(weights, tmp / "cache", TEST_RUNTIME, jobs, _auth(keys), tls)
    _wait_for(lambda: _answers(f"{DASHBOARD}/api/version"), 60, "the dashboard")  # 401 without the token: up
    _deploy(config, tmp / "config.yaml")
    # No GPU node yet: the app deploys, its GPU replicas stay pending.
    _wait_for(lambda: _replicas_pending("UpscalerDeployment"), 60, "pending GPU replicas")
    # The health answer names the replicas that cannot be placed, with the resources they need.
    _wait_for(lambda: _pending_in_health("UpscalerDeployment"), 60, "the health answer's reason")
    pending = _pending_in_health("UpscalerDeployment")
    assert pending["status"] == "starting" and "GPU" in pending["deployments"]["UpscalerDeployment"]["message"]
    assert not _running()
    started = time.monotonic()
    gpu_node = cluster.add_node(num_cpus=4, num_gpus=1)  # what the autoscaler does on EC2
    _wait_for(_running, 180, "the application on the new GPU node")
    print(f"GPU node added: application RUNNING {time.monotonic() - started:.1f} s later")
    yield {"config": config, "path": tmp / "config.yaml", "cluster": cluster, "gpu_node": gpu_node,
           "jobs_dir": tmp / "jobs", "broker": broker, "keys": keys, "tls": tls}
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    broker.stop()
    for name in ("RAY_SERVE_SLOW_STARTUP_WARNING_S", "SSL_CERT_FILE", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name)
    reset_auth_token_state()


def _bearer(deployed, name: str) -> dict:
    return {"authorization": f"Bearer {deployed['keys'][name]}"}


@pytest.fixture(scope="module")
def client(deployed):
    with httpx.Client(base_url=URL, timeout=120, headers=_bearer(deployed, "tests")) as http:
        yield http


def _png(img) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def _image(response) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED)


def test_serve_config_validates_with_rays_own_schema():
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    deployments = {d.name: d for d in schema.applications[0].deployments}
    assert set(deployments) == {"Ingress", "PreprocessDeployment", "UpscalerDeployment", "FaceDeployment",
                                "JobConsumer"}
    up, faces, cpu = (deployments[name] for name in ("UpscalerDeployment", "FaceDeployment", "PreprocessDeployment"))
    # at their minimum, one upscaler and the face replicas fill one GPU
    assert up.ray_actor_options.num_gpus + faces.ray_actor_options.num_gpus * faces.autoscaling_config[
        "min_replicas"] == 1
    for name in ("UpscalerDeployment", "FaceDeployment"):
        d = deployments[name]
        assert d.ray_actor_options.num_gpus > 0 and d.ray_actor_options.num_cpus > 0
        batch = config["applications"][0]["args"]["tile"]["batch_size"] if name == "UpscalerDeployment" \
            else d.user_config["face_batch_size"]
        assert d.max_ongoing_requests >= batch  # otherwise batches never fill
        # one GPU replica takes every call the CPU replicas can have in flight: a call left in
        # a caller's router waits there with backoff while the GPU idles
        assert d.max_ongoing_requests >= cpu.max_ongoing_requests * cpu.autoscaling_config["max_replicas"]
        assert d.autoscaling_config["max_replicas"] > d.autoscaling_config["min_replicas"]
    raw = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert all({"num_cpus", "num_gpus"} <= set(d["ray_actor_options"]) for d in raw.values())  # restated whole


def test_gpu_deployments_share_the_logical_gpu(client):
    # RealESRNet_x4plus is offered without a file: alive and ready, the other models serve
    assert client.get("/healthz").json()["status"] == "degraded"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    models = ready.json()["models"]
    assert models.pop("RealESRNet_x4plus")["loaded"] is False and all(m == {"loaded": True} for m in models.values())
    assert ray.cluster_resources()["GPU"] == 1
    assert ray.available_resources().get("GPU", 0) == pytest.approx(0.5)  # 0.25 upscaler + 0.25 faces held


@ray.remote(num_cpus=0)
class _Placed:
    """Stands in for a GPU replica: it holds what the replica asks for and says which GPU it got."""

    def gpu(self) -> list:
        return ray.get_gpu_ids()


def test_the_shipped_gpu_shares_give_each_upscaler_a_gpu_of_its_own_on_a_node_of_four(deployed):
    """The shipped num_gpus of the two GPU deployments, on a node of four logical GPUs, in the
    order autoscaling creates replicas: the minimum (one of each), then upscalers, then faces."""
    shipped = {d["name"]: d["ray_actor_options"]["num_gpus"] for d in
               yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["deployments"]}
    # no CPU: no replica of the running application can land there
    node = deployed["cluster"].add_node(num_cpus=0, num_gpus=4, resources={"four_gpus": 100})
    try:
        def place(name: str):
            return _Placed.options(num_gpus=shipped[name], resources={"four_gpus": 1}).remote()
        order = ["UpscalerDeployment", "FaceDeployment"] + ["UpscalerDeployment"] * 3 + ["FaceDeployment"] * 3
        actors, by_gpu = [], {}
        for name in order:  # one after the other, as the autoscaler adds them
            actors.append(place(name))
            gpu = tuple(ray.get(actors[-1].gpu.remote(), timeout=180))  # a worker process each
            by_gpu.setdefault(gpu, []).append(name)
        assert sorted(sorted(names) for names in by_gpu.values()) == [["FaceDeployment", "UpscalerDeployment"]] * 4, \
            by_gpu
        # and a fifth upscaler waits for another node rather than share a GPU with one
        fifth = place("UpscalerDeployment")
        ready, _ = ray.wait([fifth.gpu.remote()], timeout=3)
        assert not ready
        # at half a GPU each, Ray's packing would put two upscalers on one GPU
        for actor in actors + [fifth]:
            ray.kill(actor)
        _wait_for(lambda: ray.available_resources().get("four_gpus") == 100, 30, "the node's GPUs freed")
        halves = [_Placed.options(num_gpus=0.5, resources={"four_gpus": 1}).remote() for _ in range(2)]
        ids = [ray.get(actor.gpu.remote(), timeout=180) for actor in halves]
        assert ids[0] == ids[1]
        for actor in halves:
            ray.kill(actor)
    finally:
        deployed["cluster"].remove_node(node)


def test_api_keys_decide_who_may_call_what(deployed, client, small_photo):
    photo = _png(small_photo)
    for headers in ({}, {"authorization": "Bearer rsk_not-a-key"}, {"authorization": f"Basic {deployed['keys']['tests']}"}):
        refused = httpx.post(f"{URL}/v1/restore", content=photo, headers=headers)
        assert (refused.status_code, refused.json()["error"]) == (401, "unauthorized"), refused.text
        assert refused.headers["www-authenticate"].startswith("Bearer")
    calm = _bearer(deployed, "calm")  # restore only
    for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/stats")):
        refused = httpx.request(method, f"{URL}{path}", headers=calm, content=photo)
        assert (refused.status_code, refused.json()["error"]) == (403, "forbidden"), (path, refused.text)
    assert httpx.get(f"{URL}/v1/models", headers=calm).status_code == 200  # any key
    assert httpx.get(f"{URL}/healthz").status_code == 200  # health is for load balancers: no key
    stats = client.get("/v1/stats")  # admin
    assert stats.status_code == 200 and stats.json()["upscaler"]["device"] == "cpu"
    for part in ("ingress", "preprocess", "upscaler", "faces"):  # each replica's host memory
        memory = stats.json()[part]["memory"]
        assert 0 < memory["malloc_live_bytes"] < memory["resident_bytes"] and memory["python_blocks"] > 0


def test_the_proxy_speaks_only_tls_with_the_configured_certificate(deployed):
    import ssl

    served = ssl.get_server_certificate(("127.0.0.1", 8000))
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(deployed["tls"][0].read_text())
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the same port: no answer at all
        httpx.get("http://127.0.0.1:8000/healthz", timeout=10)


def test_rays_own_ports_refuse_a_client_without_the_token(deployed, tmp_path):
    # The fixture starts the cluster as cluster.yaml does: RAY_AUTH_MODE=token, the token in a file.
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    jobs_api = f"{DASHBOARD}/api/jobs/"  # runs arbitrary code: the reason for the token
    assert httpx.get(jobs_api, timeout=10).status_code == 401
    assert httpx.get(jobs_api, headers={"authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    driver = f"import ray; ray.init(address={deployed['cluster'].address!r}); print('connected')"

    def connect(**env) -> subprocess.CompletedProcess:
        env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
        return subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=120, env=env)

    # this process connected with the token file; a driver with a wrong token, or none at all
    # (no file named, none in an empty home folder), cannot
    for refused in (connect(RAY_AUTH_TOKEN="not-the-token"), connect(RAY_AUTH_TOKEN_PATH=None, HOME=str(tmp_path))):
        assert refused.returncode != 0 and "connected" not in refused.stdout
        assert "token" in refused.stderr.lower(), refused.stderr[-2000:]


def test_a_key_past_its_rate_gets_429_and_another_key_is_unaffected(deployed, small_photo):
    busy = _bearer(deployed, "busy")  # 7 requests at once, then one each 100 s; 3000 pixels, then 10 a second
    params = {"model": "realesr-animevideov3"}
    assert httpx.post(f"{URL}/v1/restore", params=params, content=_png(small_photo), headers=busy).status_code == 200
    again = httpx.post(f"{URL}/v1/restore", params=params, content=_png(small_photo), headers=busy)
    assert (again.status_code, again.json()["error"]) == (429, "rate_limited"), again.text  # 2240 pixels twice
    assert 100 < int(again.headers["retry-after"]) <= (2 * 2240 - 3000) / 10 + 1  # less what refilled meanwhile
    big = httpx.post(f"{URL}/v1/restore", content=_png(np.zeros((60, 60, 3), np.uint8)), headers=busy)
    assert (big.status_code, big.json()["error"]) == (413, "too_many_pixels"), big.text  # would never fit

    async def burst(name: str, n: int):
        async with httpx.AsyncClient(base_url=URL, timeout=60, headers=_bearer(deployed, name)) as http:
            return await asyncio.gather(*(http.get("/v1/models") for _ in range(n)))

    async def both():
        return await asyncio.gather(burst("busy", 24), burst("calm", 24))

    busy_answers, calm_answers = asyncio.run(both())
    assert [r.status_code for r in calm_answers] == [200] * 24
    # 4 requests left of busy's 7, though four ingress replicas answer (each with buckets of its
    # own, up to 28 would pass): the buckets live in the broker's Redis
    assert sorted(r.status_code for r in busy_answers) == [200] * 4 + [429] * 20
    for refused in (r for r in busy_answers if r.status_code == 429):
        assert refused.json()["error"] == "rate_limited" and 1 <= int(refused.headers["retry-after"]) <= 100


def test_the_configured_tile_builds_each_engine_once(client):
    # TEST_TILE is not the default: settings that build engines are builder arguments, so a
    # replica starts with them rather than building with defaults and again on reconfigure.
    for name in ("UpscalerDeployment", "FaceDeployment"):
        stats = serve.get_deployment_handle(name, "restore").stats.remote().result()
        assert stats["engine"]["tile"] == {**TEST_TILE, "pre_pad": 10}
        assert stats["engine_builds"] and set(stats["engine_builds"].values()) == {1}, stats["engine_builds"]


def test_raw_multipart_and_json_bodies(client, small_photo):
    raw = client.post("/v1/restore", params={"model": "realesr-animevideov3"}, content=_png(small_photo))
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert raw.headers["x-request-id"] and float(raw.headers["x-timing-restore-ms"]) > 0
    # the CPU steps, each timed on its own (the benchmark adds them up into cores per GPU)
    assert all(float(raw.headers[f"x-timing-{step}-ms"]) > 0 for step in ("decode", "tiles", "stitch", "encode"))
    assert _image(raw).shape == (160, 224, 3)
    form = client.post("/v1/restore", files={"image": ("p.png", _png(small_photo), "image/png")},
                       data={"model": "realesr-animevideov3", "scale": "2", "format": "webp"})
    assert form.status_code == 200 and form.headers["content-type"] == "image/webp"
    assert _image(form).shape == (80, 112, 3)
    body = client.post("/v1/restore", json={"image": base64.b64encode(_png(small_photo)).decode(),
                                            "model": "realesr-animevideov3", "format": "jpeg", "quality": 80}).json()
    assert (body["format"], body["width"], body["height"], body["faces"]) == ("jpeg", 224, 160, 0)
    jpeg = client.post("/v1/restore", params={"model": "realesr-animevideov3"},
                       content=cv2.imencode(".jpg", small_photo)[1].tobytes())
    assert jpeg.headers["content-type"] == "image/jpeg"  # JPEG in, JPEG out by default


def _local(store, picture, model):
    """The same picture restored in this process, by the same orchestration, with the served tiles."""
    networks = LocalNetworks(store, EngineConfig(device="cpu", tile=TileConfig(**TEST_TILE)))
    return restore_with(networks, picture, model=model).pixels


def test_served_output_equals_the_engine(client, store, small_photo):
    served = _image(client.post("/v1/restore", params={"model": "RealESRGAN_x4plus"}, content=_png(small_photo)))
    np.testing.assert_array_equal(served, _local(store, small_photo, "RealESRGAN_x4plus"))


def test_a_large_png_answer_deflated_on_two_threads_equals_the_engine(client, store, astronaut_bgr):
    picture = np.ascontiguousarray(astronaut_bgr[:160, :160])  # 640x640 out: its PNG deflated in halves
    served = _image(client.post("/v1/restore", params={"model": "realesr-animevideov3"}, content=_png(picture)))
    np.testing.assert_array_equal(served, _local(store, picture, "realesr-animevideov3"))


def test_faces_through_the_graph(client, astronaut_bgr):
    # Random RetinaFace weights "find" arbitrary faces: the path runs end to end, the background
    # upscaled on the Real-ESRGAN deployment, and limits.max_faces (1 here) caps the count.
    r = client.post("/v1/restore", params={"face_enhance": "true", "model": "realesr-animevideov3", "scale": 2},
                    content=_png(astronaut_bgr[:96, :128]))
    assert r.status_code == 200 and _image(r).shape == (192, 256, 3)
    assert 0 <= int(r.headers["x-faces-restored"]) <= 1
    # the canvas (made while the faces were restored) and the pasting are timed apart
    assert all(float(r.headers[f"x-timing-{step}-ms"]) >= 0 for step in ("canvas", "paste", "tiles", "stitch"))
    _, landmarks = geo.faces_of(ASTRONAUT_FACE)
    crop, _ = geo.align_face(astronaut_bgr, landmarks[0])
    aligned = client.post("/v1/restore", params={"face_enhance": "true", "aligned": "true", "model": "none"},
                          content=_png(crop))
    assert aligned.status_code == 200 and aligned.headers["x-faces-restored"] == "1"
    assert _image(aligned).shape == (512, 512, 3) and "x-timing-canvas-ms" not in aligned.headers


class _Files(BaseHTTPRequestHandler):
    """An image server and a webhook receiver, as a job's user would have them."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = self.server.files.get(self.path, b"")
        hold = self.server.holds.pop(self.path, None)  # the first download of such a path hangs
        self.send_response(200 if body else 404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        try:
            if hold is not None:
                self.wfile.write(body[:16])
                self.wfile.flush()
                hold.wait(60)
                body = body[16:]
            self.wfile.write(body)
        except OSError:
            pass  # the downloader is gone

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.hooks.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def files():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.files, httpd.hooks, httpd.holds = {}, [], {}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()


def _job_until(client, job_id: str, done, timeout: float = 120) -> dict:
    box = {}

    def check():
        box["job"] = client.get(f"/v1/jobs/{job_id}").json()
        return done(box["job"])

    _wait_for(check, timeout, f"job {job_id}")
    return box["job"]


def _ended(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "canceled")


def test_a_job_from_an_upload_gives_the_synchronous_result(deployed, client, small_photo):
    assert _replicas("JobConsumer") == 0  # no consumer runs until a job is queued
    params = {"model": "realesr-animevideov3"}
    submitted = client.post("/v1/jobs", params=params, content=_png(small_photo))
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["status"] == "queued" and job["id"].startswith("job_") and submitted.headers["location"].endswith(job["id"])
    assert set(job["urls"]) == {"get", "cancel", "result"} and job["created_at"].endswith("Z")
    done = _job_until(client, job["id"], _ended)
    assert done["status"] == "succeeded", done
    assert done["output"]["format"] == "png" and (done["output"]["width"], done["output"]["height"]) == (224, 160)
    assert done["metrics"]["queued_s"] >= 0 and done["metrics"]["run_s"] > 0 and done["started_at"] and done["completed_at"]
    result = client.get(f"/v1/jobs/{job['id']}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    synchronous = client.post("/v1/restore", params=params, content=_png(small_photo))
    np.testing.assert_array_equal(_image(result), _image(synchronous))
    again = client.post("/v1/jobs", params=params, content=_png(small_photo), headers={"idempotency-key": "one"})
    same = client.post("/v1/jobs", params=params, content=_png(small_photo), headers={"idempotency-key": "one"})
    assert (again.status_code, same.status_code) == (202, 200) and again.json()["id"] == same.json()["id"]
    # Another key sees none of these jobs, and its idempotency keys are its own; an admin key sees all.
    other = _bearer(deployed, "other")
    assert httpx.get(f"{URL}/v1/jobs/{job['id']}", headers=other).status_code == 404
    assert httpx.get(f"{URL}/v1/jobs/{job['id']}/result", headers=other).status_code == 404
    assert httpx.get(f"{URL}/v1/jobs", headers=other).json()["jobs"] == []
    mine = httpx.post(f"{URL}/v1/jobs", params=params, content=_png(small_photo),
                      headers={**other, "idempotency-key": "one"})
    assert mine.status_code == 202 and mine.json()["id"] != again.json()["id"]
    assert [j["id"] for j in httpx.get(f"{URL}/v1/jobs", headers=other).json()["jobs"]] == [mine.json()["id"]]
    assert mine.json()["id"] in {j["id"] for j in client.get("/v1/jobs").json()["jobs"]}
    assert _job_until(client, mine.json()["id"], _ended)["status"] == "succeeded"


def test_a_job_from_a_url_calls_its_signed_webhook(deployed, client, files, small_photo):
    from serve_app.jobs.webhooks import verify

    files.files["/photo.png"] = _png(small_photo)
    job = client.post("/v1/jobs", json={"image_url": f"{files.url}/photo.png", "webhook": f"{files.url}/hook",
                                        "model": "realesr-animevideov3", "scale": 2, "format": "webp"}).json()
    done = _job_until(client, job["id"], _ended)
    assert done["status"] == "succeeded" and done["output"]["format"] == "webp", done
    assert _image(client.get(f"/v1/jobs/{job['id']}/result")).shape == (80, 112, 3)
    _wait_for(lambda: files.hooks, 30, "the webhook")
    headers, body = files.hooks[-1]
    secret = (deployed["jobs_dir"] / "webhook_secret").read_text().strip()
    assert verify(secret, headers, body)
    event = json.loads(body)
    assert event["type"] == "job.succeeded" and event["data"]["id"] == job["id"]


def test_bad_jobs_are_refused_at_submit_or_fail_at_once_with_the_synchronous_codes(client, files):
    svg = b"<svg xmlns='http://www.w3.org/2000/svg'/>"
    refused = client.post("/v1/jobs", content=svg)
    assert (refused.status_code, refused.json()["error"]) == (415, "unsupported_format")
    metadata = client.post("/v1/jobs", json={"image_url": "http://169.254.169.254/latest/meta-data/"})
    assert (metadata.status_code, metadata.json()["error"]) == (400, "url_refused")
    both = client.post("/v1/jobs", params={"image_url": f"{files.url}/a.png"}, content=_png(np.zeros((8, 8, 3), np.uint8)))
    assert (both.status_code, both.json()["error"]) == (400, "invalid_option")
    files.files["/drawing.svg"] = svg  # only the consumer sees what the URL holds
    job = client.post("/v1/jobs", json={"image_url": f"{files.url}/drawing.svg"}).json()
    failed = _job_until(client, job["id"], _ended)
    assert failed["status"] == "failed" and failed["error"]["code"] == "unsupported_format", failed
    assert failed["metrics"]["attempts"] == 1  # an input error is not retried
    files.files["/bomb.png"] = _png_bomb()
    bomb = client.post("/v1/jobs", json={"image_url": f"{files.url}/bomb.png"}).json()
    bombed = _job_until(client, bomb["id"], _ended)
    assert (bombed["error"]["code"], bombed["metrics"]["attempts"]) == ("too_many_pixels", 1), bombed
    missing = client.post("/v1/jobs", json={"image_url": f"{files.url}/nothing.png"}).json()
    assert _job_until(client, missing["id"], _ended)["error"]["code"] == "url_unreachable"
    assert client.get(f"/v1/jobs/{job['id']}/result").json()["error"] == "job_not_done"
    assert client.get("/v1/jobs/job_unknown").status_code == 404
    wrong = client.get(f"/v1/jobs/{job['id']}/cancel")  # a route of its own takes POST only
    assert (wrong.status_code, wrong.headers["allow"], wrong.json()["error"]) == (405, "POST", "method_not_allowed")
    assert client.get(f"/v1/jobs/{job['id']}/nothing").status_code == 404
    listed = client.get("/v1/jobs", params={"status": "failed", "limit": 1}).json()
    assert len(listed["jobs"]) == 1 and listed["next_cursor"] and listed["jobs"][0]["status"] == "failed"


def test_a_video_job_streams_its_frames_through_the_graph_with_progress(deployed, client, files, tmp_path):
    source = make_video(tmp_path / "clip.mp4", size=(48, 32), rate=12, seconds=1.0, keyframe_every=4)
    params = {"model": "realesr-animevideov3", "scale": 2, "crf": 0, "preset": "ultrafast"}
    job = client.post("/v1/jobs", params=params, content=source.read_bytes(),
                      headers={"content-type": "video/mp4"}).json()
    assert job["options"]["crf"] == 0 and job["progress"] is None
    done = _job_until(client, job["id"], _ended)
    assert done["status"] == "succeeded", done
    assert {k: done["output"][k] for k in ("format", "width", "height", "frames", "fps", "duration_s", "segments")} == {
        "format": "mp4", "width": 96, "height": 64, "frames": 12, "fps": 12.0, "duration_s": 1.0, "segments": 3}
    assert done["progress"]["frames_done"] == done["progress"]["frames_total"] == 12
    result = client.get(f"/v1/jobs/{job['id']}/result")
    assert result.headers["content-type"] == "video/mp4"
    (tmp_path / "restored.mp4").write_bytes(result.content)
    assert packets_of(tmp_path / "restored.mp4", "audio") == packets_of(source, "audio")
    # each frame, the first of each segment too, as the synchronous path restores the same frame
    # (x264 at crf 0: rounding only), shown when the input showed it
    with av.open(str(source)) as c:
        frames = [(f.to_ndarray(format="bgr24"), float(f.pts * f.time_base)) for f in c.decode(video=0)]
    with av.open(str(tmp_path / "restored.mp4")) as c:
        restored = [(f.to_ndarray(format="bgr24"), float(f.pts * f.time_base)) for f in c.decode(video=0)]
    for i in (0, 4, 8, 11):
        still = _image(client.post("/v1/restore", params={"model": "realesr-animevideov3", "scale": 2},
                                   content=_png(frames[i][0])))
        assert np.abs(restored[i][0].astype(int) - still.astype(int)).mean() < 3
        assert restored[i][1] == pytest.approx(frames[i][1], abs=1e-3)
    # by URL, with the image options' limits checked once the header is fetched
    files.files["/clip.mkv"] = make_video(tmp_path / "clip.mkv", container="matroska").read_bytes()
    by_url = client.post("/v1/jobs", json={"image_url": f"{files.url}/clip.mkv", "model": "realesr-animevideov3",
                                           "width": 72}).json()
    done = _job_until(client, by_url["id"], _ended)
    assert (done["status"], done["output"]["format"], done["output"]["width"]) == ("succeeded", "mkv", 72), done
    refused = client.post("/v1/jobs", params={"model": "realesr-animevideov3", "crf": 99}, content=source.read_bytes())
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_option")
    cut = client.post("/v1/jobs", params=params, content=source.read_bytes()[:2000])
    assert (cut.status_code, cut.json()["error"]) == (400, "corrupt_video")


def test_cancelling_a_running_video_job_stops_it_within_seconds(deployed, client, tmp_path):
    source = make_video(tmp_path / "long.mp4", size=(48, 32), rate=12, seconds=30.0)
    job = client.post("/v1/jobs", params={"model": "RealESRGAN_x4plus"}, content=source.read_bytes()).json()
    _job_until(client, job["id"], lambda j: (j["progress"] or {}).get("frames_done", 0) > 0)
    progress = client.get(f"/v1/jobs/{job['id']}").json()["progress"]
    assert progress["frames_total"] == 360 and progress["fps"] > 0 and progress["eta_s"] > 0
    started = time.monotonic()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    # the one consumer takes the next job only once it has dropped the video
    short = make_video(tmp_path / "short.mp4", size=(48, 32), rate=12, seconds=0.5)
    following = client.post("/v1/jobs", params={"model": "realesr-animevideov3"}, content=short.read_bytes()).json()
    assert _job_until(client, following["id"], _ended, 60)["status"] == "succeeded"
    print(f"video cancelled after {progress['frames_done']} frames; the next job done {time.monotonic() - started:.1f} s later")
    stopped = client.get(f"/v1/jobs/{job['id']}").json()
    assert stopped["status"] == "canceled" and stopped["output"] is None
    assert stopped["progress"]["frames_done"] < 360
    assert not list((deployed["jobs_dir"] / "objects" / "results").glob(f"{job['id']}.*"))


def test_cancelling_a_queued_job_and_a_running_one(client, files, small_photo):
    # The running job's download hangs until released: the one consumer is surely busy with it.
    files.files["/slow.png"], files.holds["/slow.png"] = _png(small_photo), (release := threading.Event())
    running = client.post("/v1/jobs", json={"image_url": f"{files.url}/slow.png", "model": "realesr-animevideov3"}).json()
    _job_until(client, running["id"], lambda j: j["status"] != "queued", 60)
    queued = client.post("/v1/jobs", params={"model": "realesr-animevideov3"}, content=_png(small_photo)).json()
    canceled = client.post(f"/v1/jobs/{queued['id']}/cancel").json()  # the one consumer is busy
    assert canceled["status"] == "canceled" and canceled["started_at"] is None
    canceled = client.post(f"/v1/jobs/{running['id']}/cancel").json()
    assert canceled["status"] == "canceled" and canceled["started_at"] and canceled["completed_at"]
    release.set()
    time.sleep(3)  # the consumer sees the cancellation, drops its work, skips the queued job
    never_ran, stopped = (client.get(f"/v1/jobs/{j['id']}").json() for j in (queued, running))
    assert never_ran["status"] == "canceled" and never_ran["started_at"] is None
    assert stopped["status"] == "canceled" and stopped["output"] is None
    assert client.get(f"/v1/jobs/{running['id']}/result").status_code == 409


def test_a_consumer_killed_mid_job_has_its_job_done_again_once(deployed, client, files, small_photo):
    from ray.util.state import list_actors

    # The job's first download hangs: the consumer is killed while the job is processing.
    files.files["/held.png"], files.holds["/held.png"] = _png(small_photo), (release := threading.Event())
    job = client.post("/v1/jobs", json={"image_url": f"{files.url}/held.png", "model": "realesr-animevideov3"}).json()
    _job_until(client, job["id"], lambda j: j["status"] == "processing", 60)
    consumer = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "JobConsumer" in a.class_name]
    assert len(consumer) == 1
    os.kill(consumer[0].pid, 9)  # no goodbye: the job stays unacknowledged in Redis
    release.set()
    done = _job_until(client, job["id"], _ended, 180)  # handed out again after visibility_timeout_s
    assert done["status"] == "succeeded" and done["metrics"]["attempts"] == 2, done
    results = list((deployed["jobs_dir"] / "objects" / "results").glob(f"{job['id']}.*"))
    assert len(results) == 1 and _image(client.get(f"/v1/jobs/{job['id']}/result")).shape == (160, 224, 3)


def test_a_broker_that_is_down_refuses_submits_and_keeps_nothing(deployed, client, small_photo):
    broker, port = deployed["broker"], int(deployed["config"]["applications"][0]["args"]["jobs"]["broker_url"]
                                           .rsplit(":", 1)[1].split("/")[0])
    before = client.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]
    inputs = deployed["jobs_dir"] / "objects" / "inputs"
    kept = set(inputs.iterdir()) if inputs.exists() else set()
    broker.stop()
    try:
        refused = client.post("/v1/jobs", params={"model": "realesr-animevideov3"}, content=_png(small_photo))
        assert refused.status_code == 503 and refused.json()["error"] == "queue_unavailable", refused.text
        assert refused.headers["retry-after"]
        assert client.get("/v1/jobs", params={"limit": 1000}).json()["jobs"] == before  # no half-made job
        assert (set(inputs.iterdir()) if inputs.exists() else set()) == kept
    finally:
        broker.start(port=port)
    job = client.post("/v1/jobs", params={"model": "realesr-animevideov3"}, content=_png(small_photo)).json()
    assert _job_until(client, job["id"], _ended, 120)["status"] == "succeeded"  # the consumer reconnected


def test_jobs_through_the_python_handle(deployed, small_photo):
    handle = serve.get_app_handle("restore")
    job = handle.submit_job.remote(small_photo, model="realesr-animevideov3", scale=1).result()
    assert job["status"] == "queued"
    _wait_for(lambda: _ended(handle.get_job.remote(job["id"]).result()), 60, "the job")
    done = handle.get_job.remote(job["id"]).result()
    assert done["status"] == "succeeded" and (done["output"]["width"], done["output"]["height"]) == (56, 40)
    with pytest.raises(Exception, match="invalid_option|image_url"):
        handle.submit_job.remote(None, model="realesr-animevideov3").result()


def test_the_python_client_restores_paths_bytes_arrays_and_urls_with_typed_errors(
        deployed, client, files, small_photo, tmp_path):
    from PIL import Image

    from serve_app.client import AsyncClient, Client
    from serve_app.errors import InvalidOption, TooManyPixels, Unauthorized, UnsupportedFormat

    params = {"model": "realesr-animevideov3"}
    expected = _image(client.post("/v1/restore", params=params, content=_png(small_photo)))
    path = tmp_path / "photo.png"
    path.write_bytes(_png(small_photo))
    files.files["/photo.png"] = _png(small_photo)
    with Client(URL, api_key=deployed["keys"]["tests"]) as restore:
        for image in (path, str(path), _png(small_photo), small_photo, f"{files.url}/photo.png"):
            result = restore.restore(image, **params)
            assert (result.format, result.width, result.height) == ("png", 224, 160), image
            np.testing.assert_array_equal(result.array(), expected)
        assert restore.restore(path, width=100, **params).array().shape == (71, 100, 3)
        # the photo's ICC profile and GPS tags are kept unless keep_metadata is false
        jpeg, icc = photo_with_profile_and_gps(small_photo)
        kept = restore.restore(jpeg, **params)
        assert kept.format == "jpeg"
        with Image.open(io.BytesIO(kept.data)) as out:
            assert out.info["icc_profile"] == icc and out.getexif().get_ifd(0x8825)[1] == "N"
        with Image.open(io.BytesIO(restore.restore(jpeg, keep_metadata=False, **params).data)) as out:
            assert "icc_profile" not in out.info and not out.getexif()
        with pytest.raises(UnsupportedFormat) as refused:
            restore.restore(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
        assert (refused.value.code, refused.value.status) == ("unsupported_format", 415)
        with pytest.raises(TooManyPixels, match="5000x4000 = 20000000 pixels; the limit is 16000000"):
            restore.restore(np.zeros((800, 1000, 3), np.uint8), width=5000, **params)  # from the header
        job = restore.wait(restore.submit(path, face_enhance=False, **params), timeout=120)
        assert job.status == "succeeded" and job.output["width"] == 224
        np.testing.assert_array_equal(restore.result(job).array(), expected)
        sized = restore.wait(restore.submit(path, width=100, height=60, **params), timeout=120)
        assert (sized.output["width"], sized.output["height"]) == (84, 60)
        with pytest.raises(TooManyPixels):  # a job is refused at submit, from the header
            restore.submit(np.zeros((800, 1000, 3), np.uint8), width=5000, **params)
        with pytest.raises(InvalidOption, match="the most is x8"):
            restore.submit(path, width=500, **params)
        files.files["/drawing.svg"] = b"<svg xmlns='http://www.w3.org/2000/svg'/>"
        with pytest.raises(UnsupportedFormat) as failed:
            restore.restore(f"{files.url}/drawing.svg")  # a URL runs as a job, which fails
        assert failed.value.job.status == "failed"
    with Client(URL, api_key="rsk_not-a-key") as stranger, pytest.raises(Unauthorized):
        stranger.models()

    async def several():
        async with AsyncClient(URL, api_key=deployed["keys"]["tests"]) as restore:
            return await asyncio.gather(*(restore.restore(small_photo, **params) for _ in range(4)))

    for result in asyncio.run(several()):
        np.testing.assert_array_equal(result.array(), expected)


def test_the_batch_command_restores_a_folder_resumably_and_reports_failures(deployed, small_photo, tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    (inputs / "more").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "more/c.webp"):
        cv2.imwrite(str(inputs / name), small_photo)
    (inputs / "drawing.tif").write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    (inputs / "notes.txt").write_text("not a picture: not taken")
    command = [str(Path(sys.executable).parent / "restore-serve-batch"), str(inputs), str(outputs), "-r",
               "--url", URL, "-n", "realesr-animevideov3", "-s", "2", "-j", "3"]
    env = {**os.environ, "RESTORE_SERVE_API_KEY": deployed["keys"]["tests"]}
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr  # one input failed
    assert "3 restored, 0 already there, 1 failed" in first.stderr
    assert "drawing.tif: unsupported_format" in first.stderr and "img/s" in first.stderr  # the rate, then the ETA
    made = sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*") if p.is_file())
    assert made == ["a_out.png", "b_out.jpg", "more/c_out.png"]
    assert cv2.imread(str(outputs / "more/c_out.png")).shape == (80, 112, 3)
    (inputs / "drawing.tif").unlink()
    (outputs / "a_out.png").unlink()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "1 restored, 2 already there, 0 failed" in again.stderr
    refused = subprocess.run([*command[:3], "--url", URL, "-s", "2", "--width", "10"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not allowed with argument" in refused.stderr
    sized = subprocess.run([*command[:2], str(tmp_path / "sized"), "--url", URL, "-n", "realesr-animevideov3",
                            "--width", "100"], env=env, capture_output=True, text=True, timeout=120)
    assert sized.returncode == 0, sized.stderr
    assert cv2.imread(str(tmp_path / "sized" / "a_out.png")).shape == (71, 100, 3)


def test_the_web_page_restores_a_photo_and_shows_the_services_errors(deployed, small_photo, tmp_path):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no Chromium here and none installable (not root, or no apt-get): the page is not tested")
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("RESTORE_SERVE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(exist_ok=True)
    photo, svg = tmp_path / "photo.png", tmp_path / "drawing.svg"
    photo.write_bytes(_png(small_photo))
    svg.write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()  # the self-signed certificate
            page.goto(URL + "/")
            page.fill("#key", deployed["keys"]["tests"])
            page.dispatch_event("#key", "change")  # the page keeps it and lists the offered models
            page.wait_for_selector("#model option[value=realesr-animevideov3]", state="attached")
            page.select_option("#model", "realesr-animevideov3")
            page.set_input_files("#file", str(photo))
            page.wait_for_function("!document.getElementById('go').disabled")
            page.click("#go")
            page.wait_for_selector("#result", state="visible", timeout=60_000)
            size = page.evaluate("[document.getElementById('after').naturalWidth, "
                                 "document.getElementById('after').naturalHeight]")
            assert size == [224, 160]
            assert page.inner_text("#sizes") == "56×40 → 224×160"
            assert page.get_attribute("#download", "download") == "photo_out.png"
            page.screenshot(path=str(artifacts / "page-restored.png"), full_page=True)
            page.check("input[name=size][value=target]")  # a target size instead of the scale
            page.fill("#width", "100")
            page.click("#go")
            page.wait_for_function("document.getElementById('sizes').textContent.endsWith('100×71')")
            page.set_input_files("#file", str(svg))
            page.wait_for_function("!document.getElementById('go').disabled")
            page.click("#go")
            page.wait_for_selector("#error", state="visible", timeout=30_000)
            assert page.inner_text("#error").startswith("unsupported_format: vector and markup images")
            page.screenshot(path=str(artifacts / "page-error.png"), full_page=True)
        finally:
            browser.close()


def test_legacy_inference_contract(client, small_photo):
    r = client.post("/inference", json={"img_str": base64.b64encode(_png(small_photo)).decode(), "tile": 0,
                                        "half": False})
    assert r.status_code == 200
    out = cv2.imdecode(np.frombuffer(base64.b64decode(r.json()), np.uint8), cv2.IMREAD_UNCHANGED)
    assert out.shape == (160, 224, 3)


def _png_bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 30001)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("params, content, status, code", [
    ({}, b"", 400, "empty_image"),
    ({}, b"plain text, not an image" * 4, 400, "not_an_image"),
    ({}, "truncated", 400, "corrupt_image"),
    ({}, b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "unsupported_format"),
    ({}, "bomb", 413, "too_many_pixels"),
    ({}, b"\x89PNG" + b"\0" * 3_000_000, 413, "too_many_bytes"),
    ({"scale": "-1"}, None, 400, "invalid_option"),
    ({"face_strength": "2"}, None, 400, "invalid_option"),
    ({"format": "gif"}, None, 400, "invalid_option"),
    ({"model": "no-such-model"}, None, 400, "invalid_option"),
    ({"model": "none"}, None, 400, "invalid_option"),
    ({"model": "RealESRNet_x4plus"}, None, 503, "weights_unavailable"),  # offered, no file
])
def test_errors_are_typed_json(client, small_photo, params, content, status, code):
    png = _png(small_photo)
    content = {None: png, "truncated": png[: len(png) // 2], "bomb": _png_bomb()}.get(content, content)
    params = {"model": "realesr-animevideov3", **params}
    r = client.post("/v1/restore", params=params, content=content)
    assert (r.status_code, r.json()["error"]) == (status, code), r.text
    assert r.json()["detail"] and r.headers["x-request-id"]


def test_a_model_not_offered_is_refused_before_any_face_is_looked_for(client, small_photo):
    faces = serve.get_deployment_handle("FaceDeployment", "restore")

    def pictures_detected() -> int:
        return sum(faces.stats.remote().result()["batch_sizes"]["detect"].values())

    before = pictures_detected()
    # RealESRGAN_x2plus is a model of the registry that this deployment does not offer.
    bad = client.post("/v1/restore", params={"model": "RealESRGAN_x2plus", "face_enhance": "true"},
                      content=_png(small_photo))
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid_option") and "x2plus" in bad.text
    # A good request after it: the face replica takes pictures in order, so a picture sent for
    # the bad one would have been detected by the time this one is answered.
    good = client.post("/v1/restore", params={"model": "none", "face_enhance": "true", "only_center_face": "true"},
                       content=_png(small_photo))  # one face: each takes seconds on a CPU
    assert good.status_code == 200, good.text
    assert pictures_detected() == before + 1


def test_models_and_unknown_routes(client):
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert models["realesr-animevideov3"]["present"] and models["realesr-animevideov3"]["offered"]
    assert models["RealESRNet_x4plus"]["offered"] and not models["RealESRNet_x4plus"]["present"]
    assert client.get("/nope").status_code == 404


def test_python_handle_api_from_a_ray_task(deployed, small_photo):
    @ray.remote
    def restore_in_a_task(pixels: np.ndarray) -> tuple:  # nested: shipped by value to the worker
        handle = serve.get_app_handle("restore")
        result = handle.restore.remote(pixels, model="realesr-animevideov3", scale=2).result()
        png = cv2.imencode(".png", pixels)[1].tobytes()
        encoded = handle.restore.remote(png, model="realesr-animevideov3", height=60).result()
        return result.pixels.shape, result.mode, result.faces, encoded.pixels.shape

    shape, mode, faces, from_bytes = ray.get(restore_in_a_task.remote(small_photo))
    assert (shape, mode, faces, from_bytes) == ((80, 112, 3), "BGR", 0, (60, 84, 3))
    handle = serve.get_app_handle("restore")
    with pytest.raises(Exception, match="numpy array"):
        handle.restore.remote(np.zeros((4, 4, 4, 4), np.uint8), model="realesr-animevideov3").result()


def test_concurrent_requests_share_forward_passes(deployed, astronaut_bgr):
    handle = serve.get_app_handle("restore")
    images = [np.ascontiguousarray(astronaut_bgr[i * 40 : i * 40 + 40, 100:156]) for i in range(8)]
    responses = [handle.restore.remote(img, model="realesr-animevideov3") for img in images]
    results = [r.result().pixels for r in responses]
    upscaler = serve.get_deployment_handle("UpscalerDeployment", "restore")
    sizes = upscaler.stats.remote().result()["batch_sizes"]
    assert max(int(k) for k in sizes) > 1, sizes  # tiles of different requests in one forward
    # and where each request's time went inside the replica (for the benchmark): the device
    # calls of its batches, split into the network and its copies, then the hand-offs around them
    times = upscaler.stats.remote().result()["times"]
    assert times["bare_ms_p50"] > 0 and times["copies_ms_p50"] >= 0 and times["hops_ms_p50"] >= 0, times
    assert times["served_ms_p99"] >= times["bare_ms_p50"] and times["served_over_bare"] >= 1, times
    for img, result in zip(images, results):  # and each caller got its own picture back
        alone = handle.restore.remote(img, model="realesr-animevideov3").result().pixels
        np.testing.assert_array_equal(result, alone)


def test_gpu_replicas_report_how_they_wait_for_the_gpu(deployed):
    expected = "sleep" if has_cuda_driver() else None  # sleep_while_gpu_works, at the replica's start
    for name in ("UpscalerDeployment", "FaceDeployment"):
        assert serve.get_deployment_handle(name, "restore").stats.remote().result()["gpu_waits"] == expected


def test_concurrent_face_requests_share_detector_and_restorer_passes(deployed, astronaut_bgr):
    handle = serve.get_app_handle("restore")
    pictures = [np.ascontiguousarray(astronaut_bgr[i * 8 : i * 8 + 192, 160:352]) for i in range(2)]
    options = {"model": "none", "face_enhance": True, "only_center_face": True}  # a face each: CPU time
    responses = [handle.restore.remote(p, **options) for p in pictures]
    together = [r.result() for r in responses]
    faces = serve.get_deployment_handle("FaceDeployment", "restore")
    stats = faces.stats.remote().result()
    sizes, times = stats["batch_sizes"], stats["times"]
    # pictures of different requests in one detector pass, their faces in one GFPGAN pass
    assert max(map(int, sizes["detect"])) > 1 and max(map(int, sizes["restore"])) > 1, sizes
    # and where each request's time went inside the replica, step by step (for the benchmark)
    assert times["requests"] >= 2 and times["detect_ms_p99"] > 0 and times["restore_ms_p50"] > 0, times
    assert times["inside_ms_p50"] >= times["restore_ms_p50"] and times["inside_ms_p99"] >= times["detect_ms_p99"]
    alone = handle.restore.remote(pictures[0], **options).result()  # and the caller got its own back
    assert together[0].faces == alone.faces == 1 and together[0].pixels.shape == alone.pixels.shape
    assert np.abs(together[0].pixels.astype(int) - alone.pixels).mean() < 1  # batching's rounding only


class _NodeAutoscaler:
    """What Ray's autoscaler does for cluster.yaml's GPU node type, on the local cluster: add a
    GPU node while replicas wait for resources; remove a node it added once no actor (starting
    or running) has been on it, and none waited, for ``idle_s`` (idle_timeout_minutes, shortened). ``step()`` is one look, from the
    main thread (Ray starts nodes only there)."""

    def __init__(self, cluster: Cluster, idle_s: float = 5.0):
        self.cluster, self.idle_s = cluster, idle_s
        self.events: list[tuple[str, float]] = []
        self.node = None
        self._idle_since: float | None = None

    def step(self) -> None:
        from ray.util.state import list_actors

        # Ray's autoscaler acts on demands the cluster cannot meet: here, replicas (actors)
        # waiting for resources to be created.
        if self.node is None:
            if list_actors(filters=[("state", "=", "PENDING_CREATION")]):
                self.node = self.cluster.add_node(num_cpus=2, num_gpus=1)
                self.events.append(("added", time.monotonic()))
            return
        # A replica still waiting to be created is demand the node is there for: until it lands
        # (slow while the load holds both cores), the node is not idle, as for Ray's autoscaler.
        held = list_actors(filters=[("node_id", "=", self.node.node_id), ("state", "!=", "DEAD")]) or \
            list_actors(filters=[("state", "=", "PENDING_CREATION")])
        self._idle_since = None if held else (self._idle_since or time.monotonic())
        if self._idle_since and time.monotonic() - self._idle_since >= self.idle_s:
            self.cluster.remove_node(self.node)
            self.node = None
            self.events.append(("removed", time.monotonic()))


def test_a_gpu_node_joins_under_load_and_leaves_once_the_load_is_gone(deployed, astronaut_bgr):
    # An upscaler replica now takes 0.75 GPU: a second one cannot fit beside the first and the
    # face replica, so scaling up under load needs a second GPU node. The node leaves only once
    # no replica is on it: Serve scaled the upscaler up under the load and back down after it.
    wide = copy.deepcopy(deployed["config"])
    up = next(d for d in wide["applications"][0]["deployments"] if d["name"] == "UpscalerDeployment")
    up["ray_actor_options"]["num_gpus"] = 0.75
    _deploy(wide, deployed["path"])
    _wait_for(lambda: _running() and _replicas("UpscalerDeployment") == 1, 180, "the wider replica")
    autoscaler = _NodeAutoscaler(deployed["cluster"])
    handle = serve.get_app_handle("restore")
    img = np.ascontiguousarray(astronaut_bgr[:60, :60])
    loading = threading.Event()
    loading.set()

    def client_loop():
        while loading.is_set():
            handle.restore.remote(img, model="RealESRGAN_x4plus").result()

    try:
        load_started = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            clients = [pool.submit(client_loop) for _ in range(6)]
            try:
                _wait_for(lambda: autoscaler.step() or _replicas("UpscalerDeployment") == 2, 180,
                          "a replica on a new GPU node")
            finally:
                loading.clear()
            for c in clients:
                c.result()  # no request of the load failed
        load_ended = time.monotonic()
        _wait_for(lambda: autoscaler.step() or [e for e, _ in autoscaler.events] == ["added", "removed"], 180,
                  "the idle node removed")
    finally:
        _deploy(deployed["config"], deployed["path"])
        _wait_for(_running, 180, "the shipped settings back")
    added, removed = (t for _, t in autoscaler.events)
    assert _replicas("UpscalerDeployment") >= 1 and len([n for n in ray.nodes() if n["Alive"]]) == 2
    print(f"GPU node added {added - load_started:.1f} s after the load began; removed "
          f"{removed - load_ended:.1f} s after it ended (Serve scaled down, then {autoscaler.idle_s:.0f} s idle)")


def test_overload_is_a_json_503_and_accepted_requests_complete(deployed, small_photo):
    tight = copy.deepcopy(deployed["config"])  # queue limits change without restarting replicas
    for d in tight["applications"][0]["deployments"]:
        if d["name"] == "UpscalerDeployment":
            d.update(max_ongoing_requests=2, max_queued_requests=1)
    _deploy(tight, deployed["path"])
    _wait_for(_running, 60, "the tighter queues")

    async def burst():
        async with httpx.AsyncClient(base_url=URL, timeout=300, headers=_bearer(deployed, "tests")) as http:
            return await asyncio.gather(*(
                http.post("/v1/restore", params={"model": "RealESRGAN_x4plus"}, content=_png(small_photo))
                for _ in range(30)))

    async def burst_through_the_client():
        from serve_app.client import AsyncClient

        async with AsyncClient(URL, api_key=deployed["keys"]["tests"]) as restore:
            return await asyncio.gather(*(restore.restore(small_photo, model="RealESRGAN_x4plus")
                                          for _ in range(10)))

    overloaded = {"family": "ray_restore_requests_total", "route": "/v1/restore", "status": "503"}
    refusals_before = _total(_scrape(deployed), **overloaded)
    try:
        responses = asyncio.run(burst())
        retried = asyncio.run(burst_through_the_client())  # the client waits out each Retry-After
        # more refusals than the plain burst got: the client's, which it retried
        refused_plainly = sum(r.status_code == 503 for r in responses)
        _wait_for(lambda: _total(_scrape(deployed), **overloaded) > refusals_before + refused_plainly, 30,
                  "the refusals the client retried, in the exported counter")
    finally:
        _deploy(deployed["config"], deployed["path"])
        _wait_for(_running, 60, "the usual queues")
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(200) > 0, codes  # accepted requests complete
    refused = [r for r in responses if r.status_code == 503]
    assert refused and all(r.json()["error"] == "overloaded" and r.headers["retry-after"] for r in refused)
    assert [(r.width, r.height) for r in retried] == [(224, 160)] * 10


def test_reconfigure_applies_without_restarting_replicas(deployed, client, small_photo, astronaut_bgr):
    upscaler = serve.get_deployment_handle("UpscalerDeployment", "restore")
    _wait_for(lambda: _replicas("UpscalerDeployment") == 1, 120, "one replica")
    before = upscaler.stats.remote().result()
    changed = copy.deepcopy(deployed["config"])
    for d in changed["applications"][0]["deployments"]:
        d["user_config"]["limits"]["max_pixels"] = 5000
        d["user_config"]["request_timeout_s"] = 0.3  # x4plus on the CPU takes seconds
        d["user_config"]["upscaler_batch_wait_s"] = 0.02
    _deploy(changed, deployed["path"])
    big = _png(np.ascontiguousarray(astronaut_bgr[:100, :100]))  # 10000 pixels
    _wait_for(lambda: upscaler.stats.remote().result()["runtime"]["upscaler_batch_wait_s"] == 0.02, 60,
              "the upscaler's reconfigure")
    after = upscaler.stats.remote().result()
    assert after["pid"] == before["pid"]  # the same replica, reconfigured
    assert after["engine_builds"] == before["engine_builds"]  # its engines kept
    _wait_for(lambda: client.post("/v1/restore", content=big).status_code == 413, 60, "the new pixel limit")

    def times_out():  # each ingress replica takes the new timeout in its own time: until then, a 200
        slow = client.post("/v1/restore", params={"model": "RealESRGAN_x4plus"}, content=_png(small_photo))
        # a 504 past the timeout, or at once a 413: the upscaler knows the work takes longer
        return (slow.status_code, slow.json().get("error")) in ((504, "timeout"), (413, "too_much_work"))

    _wait_for(times_out, 60, "an answer that the new request timeout is too short")
    _deploy(deployed["config"], deployed["path"])
    # Every CPU replica must take the old limits back; after the overload test, some may still
    # be starting or waiting for room on the head, which took over a minute once.
    _wait_for(lambda: client.post("/v1/restore", content=big).status_code == 200, 180, "the old limits")


def test_a_missing_model_loads_once_its_file_appears_and_readyz_says_so(deployed, client, small_photo):
    # The offered model without weights gets its file now: the upscaler's background retry (every
    # weights.retry_interval_s) loads it, with no redeploy, and nothing is missing any more.
    folder = Path(deployed["config"]["applications"][0]["args"]["weights"]["folder"])
    save_random_checkpoint("RealESRNet_x4plus", folder, layout="params_ema")
    _wait_for(lambda: client.get("/readyz").json()["status"] == "ok", 120, "every model loaded")
    body = client.get("/readyz").json()
    assert body == {"status": "ok", "devices": {"upscaler": "cpu", "faces": "cpu"},
                    "models": {name: {"loaded": True} for name in [
                        "realesr-animevideov3", "RealESRGAN_x4plus", "RealESRNet_x4plus", "GFPGANv1.4"]}}
    assert client.get("/healthz").json() == {"status": "ok"}
    # the ingress's memory of the missing model lasts one retry interval: then it serves it
    _wait_for(lambda: client.post("/v1/restore", params={"model": "RealESRNet_x4plus"},
                                  content=_png(small_photo)).status_code == 200, 30, "the loaded model served")


def test_consumers_are_gone_once_no_job_is_left(deployed):
    # Every job of this module has ended by now; the policy sees an empty queue and nothing taken.
    _wait_for(lambda: _replicas("JobConsumer") == 0, 90, "the consumers' scale-down to zero")


def _scrape(deployed) -> dict[str, float]:
    """Every sample the nodes' metrics agents export now: 'name{labels}' -> value."""
    samples = {}
    for node in (deployed["cluster"].head_node, deployed["gpu_node"]):
        text = httpx.get(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=10).text
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                samples[series] = samples.get(series, 0.0) + float(value)
    return samples


def _total(samples: dict[str, float], family: str, **labels: str) -> float:
    """The sum of ``family``'s samples whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(value for series, value in samples.items()
               if series.split("{", 1)[0] == family and all(w in series for w in wanted))


def test_metrics_are_exported_beside_rays_own_after_known_requests(deployed, client, files, small_photo):
    # Everything this module did so far shows; three more restores must show as three more.
    restored = {"family": "ray_restore_requests_total", "route": "/v1/restore", "status": "200",
                "model": "realesr-animevideov3"}
    before = _total(_scrape(deployed), restored.pop("family"), **restored)
    for _ in range(3):
        assert client.post("/v1/restore", params={"model": "realesr-animevideov3"},
                           content=_png(small_photo)).status_code == 200
    # The consumers' counters leave with their processes, which scale to none between tests:
    # a job that succeeds and one that fails now, while a consumer is up to export them.
    jobs = [client.post("/v1/jobs", content=_png(small_photo)).json(),
            client.post("/v1/jobs", json={"image_url": f"{files.url}/nothing.png"}).json()]
    assert [_job_until(client, job["id"], _ended)["status"] for job in jobs] == ["succeeded", "failed"]
    _wait_for(lambda: _total(_scrape(deployed), "ray_restore_requests_total", **restored) >= before + 3
              and _total(_scrape(deployed), "ray_restore_jobs_total", state="failed") > 0,
              60, "the three requests and the failed job in the exported counters")
    samples = _scrape(deployed)
    assert _total(samples, "ray_serve_num_http_requests_total") > 0  # Ray's own, beside ours
    for status in ("401", "403", "429", "413", "415"):  # from the tests above
        assert _total(samples, "ray_restore_requests_total", status=status) > 0, status
    assert _total(samples, "ray_restore_rate_limited_total", key="busy") >= 20
    for step in ("decode", "tiles", "stitch", "canvas", "paste", "encode", "restore"):
        assert _total(samples, "ray_restore_step_seconds_count", step=step) > 0, step
    assert _total(samples, "ray_restore_step_seconds_sum", step="decode") > 0
    for stage, step in (("upscaler", "queued"), ("upscaler", "served"), ("faces", "detect"), ("faces", "restore")):
        assert _total(samples, "ray_restore_gpu_step_seconds_count", stage=stage, step=step) > 0, (stage, step)
    for stage in ("upscale", "detect", "restore"):
        assert _total(samples, "ray_restore_batch_size_count", stage=stage) > 0, stage
        assert _total(samples, "ray_restore_batch_size_sum", stage=stage) > 0, stage
    assert _total(samples, "ray_restore_faces_total") >= 2
    assert _total(samples, "ray_restore_gpu_memory_bytes", kind="cap") == 0  # CPU engines: no GPU memory
    assert ("ray_restore_gpu_memory_bytes", "allocated") in {
        (series.split("{")[0], series.split('kind="')[1].split('"')[0]) for series in samples
        if series.startswith("ray_restore_gpu_memory_bytes")}
    assert _total(samples, "ray_restore_jobs_total", state="queued") >= _total(
        samples, "ray_restore_jobs_total", state="succeeded") > 0
    assert _total(samples, "ray_restore_jobs_total", state="failed") > 0
    assert {"waiting", "taken"} <= {series.split('state="')[1].split('"')[0] for series in samples
                                    if series.startswith("ray_restore_job_queue{")}
    # the dashboard shipped for Grafana asks for these families and Ray's
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    asked = {re.sub(r"_(bucket|count|sum)$", "", name) for panel in dashboard["panels"]
             for target in panel.get("targets", []) for name in re.findall(r"\bray_\w+", target["expr"])}
    exported = {re.sub(r"_(bucket|count|sum)$", "", series.split("{")[0]) for series in samples}
    assert asked <= exported, asked - exported


def test_requests_enter_on_the_head_and_run_on_the_gpu_node(deployed, client, small_photo):
    head = ray.get_runtime_context().get_node_id()  # the driver runs on the head
    stats = serve.get_deployment_handle("UpscalerDeployment", "restore").stats.remote().result()
    assert stats["node_id"] == deployed["gpu_node"].node_id != head
    r = client.post("/v1/restore", params={"model": "realesr-animevideov3"}, content=_png(small_photo))
    assert r.status_code == 200


def test_losing_the_gpu_node_mid_load_fails_only_its_requests_clearly(deployed, client, small_photo):
    cluster = deployed["cluster"]

    async def load():
        async with httpx.AsyncClient(base_url=URL, timeout=180, headers=_bearer(deployed, "tests")) as http:
            requests = [http.post("/v1/restore", params={"model": "RealESRGAN_x4plus"}, content=_png(small_photo))
                        for _ in range(6)]
            tasks = [asyncio.ensure_future(r) for r in requests]
            await asyncio.sleep(1.0)  # the requests are in flight on the GPU node
            cluster.remove_node(deployed["gpu_node"], allow_graceful=False)
            return await asyncio.gather(*tasks)

    started = time.monotonic()
    responses = asyncio.run(load())  # every one answers: none hangs past the client timeout
    failed_after = time.monotonic() - started
    for r in responses:
        assert r.status_code == 200 or (r.status_code == 503 and r.json()["error"] in ("replica_lost", "overloaded")), r.text
    lost = sum(r.status_code != 200 for r in responses)
    started = time.monotonic()
    deployed["gpu_node"] = cluster.add_node(num_cpus=4, num_gpus=1)  # the autoscaler's replacement
    _wait_for(lambda: client.post("/v1/restore", params={"model": "realesr-animevideov3"},
                                  content=_png(small_photo)).status_code == 200, 180, "replacement replicas")
    print(f"GPU node lost: {lost} of 6 in-flight requests failed with 503 within {failed_after:.1f} s; "
          f"replicas serving again {time.monotonic() - started:.1f} s after a new node joined")
