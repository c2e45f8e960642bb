"""The served graph over HTTP: raw image in, PNG out, at several concurrency levels.

    python bench/serve_http.py [--size 256] [--concurrency 1 4 16] [--requests 64]

Starts a local Ray instance (a logical GPU when there is none), deploys serve_config.yaml with
the `serve` command line (RealESRGAN_x4plus only; weights from the store, random where none
can be had), and prints JSON: throughput and p50/p95/p99 latency per concurrency level, the
batch sizes the upscaler formed, and the device stage alone (engine.forward on the same tile
shape in this process) for comparison.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import ray
import torch
import yaml
from ray import serve
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import _weights_in_use  # noqa: E402  (same folder)

ROOT = Path(__file__).resolve().parent.parent


def _config(folder: Path, cache: Path, tile: int) -> dict:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app["args"].update(upscalers=["RealESRGAN_x4plus"], face_models=["GFPGANv1.4"])
    app["args"]["weights"] = {"folder": str(folder), "cache_dir": str(cache), "download": False}
    for d in app["deployments"]:
        d["user_config"]["tile"]["size"] = tile
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        d["max_queued_requests"] = -1
    return config


async def _load(png: bytes, concurrency: int, total: int) -> dict:
    latencies = []

    async def one(http):
        start = time.perf_counter()
        r = await http.post("/v1/restore", content=png, params={"format": "png"})
        r.raise_for_status()
        latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url="http://127.0.0.1:8000", timeout=600) as http:
        await one(http)  # warm-up
        latencies.clear()
        start = time.perf_counter()
        queue = list(range(total))

        async def worker():
            while queue:
                queue.pop()
                await one(http)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"concurrency": concurrency, "requests": total, "images_per_s": total / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--size", type=int, default=256 if cuda else 48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16] if cuda else [1, 2])
    parser.add_argument("--requests", type=int, default=64 if cuda else 4)
    args = parser.parse_args()
    tile = 256 if cuda else 64
    tmp = Path(tempfile.mkdtemp())
    used = _weights_in_use(tmp, Path("~/.cache/restore-serve/weights").expanduser(),
                           ["RealESRGAN_x4plus", "GFPGANv1.4", "retinaface_resnet50", "parsenet"])
    ray.init(num_gpus=None if cuda else 1, include_dashboard=True, dashboard_host="127.0.0.1")
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(_config(tmp, Path("~/.cache/restore-serve/weights").expanduser(), tile)))
    time.sleep(5)  # the dashboard's REST API, which `serve deploy` talks to
    # The `serve` command, or its click group where pip --target left no script on PATH.
    serve_cli = [shutil.which("serve")] if shutil.which("serve") else [
        sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
    subprocess.run([*serve_cli, "deploy", str(config_path), "--address", "http://127.0.0.1:8265"], check=True)
    while serve.status().applications.get("restore") is None or serve.status().applications["restore"].status != "RUNNING":
        time.sleep(1)
    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    img = cv2.resize(photo, (args.size, args.size), interpolation=cv2.INTER_AREA)
    png = cv2.imencode(".png", img)[1].tobytes()
    levels = [asyncio.run(_load(png, c, args.requests)) for c in args.concurrency]
    stats = serve.get_deployment_handle("UpscalerDeployment", "restore").stats.remote().result()
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
        "settings": {"input": [args.size, args.size], "tile": tile, "weights": used},
        "replica_device": stats["device"],
        "http": levels,
        "upscaler_batch_sizes": stats["batch_sizes"],
    }, indent=2))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
