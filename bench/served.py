"""The served graph over HTTP, as users call it: a raw image in, a PNG out.

Deploys serve_config.yaml with the `serve` command line (one Real-ESRGAN and one GFPGAN model,
one GPU replica each at about half a GPU, CPU replicas as set below) and measures, per path:
- closed loop at several concurrency levels, doubled past the last while throughput still grows
  (``more_load``): throughput, p50/p95/p99 latency, and from the GPU replica where a request's
  time went (queued, served, bare forward);
- open loop (Poisson arrivals) at 70% of the best throughput: p50/p99 against the unloaded p50;
  then the same rate evenly spaced, where a tail left is the service's own (``bench.arrivals``);
  and, where Poisson arrivals at 70% take the p99 past 2x, the highest tenth of the peak that
  keeps it within 2x (``highest_load_within_bound``): what one GPU serves under that bound;
- at every level and in the Poisson loop, the node's busy cores, whole and per kind of process
  (``bench.host_cpu``), so the cores one GPU needs count the proxy, the ingress and Ray too;
- the largest input the service accepts by default (2048x2048 at x4), under the memory cap of a
  24 GB card shared half and half;
- each GPU replica's peak memory against its cap.
The face path uses the one-face photo; the detector runs for real and answers with that face
(``FixedFaceDeployment``), since random detector weights would find none.
"""
from __future__ import annotations

import asyncio
import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import ray
import torch
import yaml
from ray import serve

from bench.arrivals import LOAD, TAIL_BOUND, arrival_gaps, highest_load_within_bound
from bench.common import known_face_detector, percentiles, photo, png
from bench.host_cpu import LOAD_GENERATOR, HostCpu
from serve_app.config import AppArgs
from serve_app.deployments.faces import FaceDeployment
from serve_app.deployments.heap import freeze_heap
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.preprocess import PreprocessDeployment
from serve_app.deployments.upscaler import UpscalerDeployment
from serve_app.jobs.consumer import consumer_deployment
from serve_app.jobs.system import CONSUMER

ROOT = Path(__file__).resolve().parent.parent
URL = "http://127.0.0.1:8000"
EMULATED_CARD_GIB = 24  # the memory cap emulates this card, shared half and half


@serve.deployment
class FixedFaceDeployment(FaceDeployment.func_or_class):
    """The face deployment, its detector answering with the photo's known face after running."""

    def _load(self, name):
        engine = super()._load(name)
        engine.detector = known_face_detector(engine.detector)
        return engine


def build_bench_app(args: dict):
    """serve_app.app.build_app with the fixed-face deployment under the face deployment's name."""
    args = AppArgs.model_validate(args)
    upscaler = UpscalerDeployment.bind(args)
    faces = FixedFaceDeployment.options(name="FaceDeployment").bind(args)
    preprocess = PreprocessDeployment.bind(args, upscaler, faces)
    consumer = consumer_deployment(args).bind(args, preprocess) if args.jobs.broker_url else None  # bench.jobs
    return Ingress.bind(args, preprocess, upscaler, faces, consumer)


def _config(folder: Path, cache: Path, tile: int, batch: int, cpu_replicas: int, card_fraction: float | None,
            compile_mode: str) -> dict:
    """serve_config.yaml with fixed replica counts; each GPU replica's memory capped at its share
    of the emulated card (``card_fraction``: that card's memory over this one's)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    config["http_options"]["host"] = "127.0.0.1"  # the load generator is on this node: no API keys needed
    app["import_path"] = "bench.served:build_bench_app"
    app["logging_config"]["log_level"] = "WARNING"
    app["args"].update(upscalers=["RealESRGAN_x4plus"], face_models=["GFPGANv1.4"], compile=compile_mode)
    app["args"]["tile"].update(size=tile, batch_size=batch)
    app["args"]["weights"] = {"folder": str(folder), "cache_dir": str(cache), "download": False}
    # The synchronous path only: no broker, so no job consumers.
    app["deployments"] = [d for d in app["deployments"] if d["name"] != CONSUMER]
    for d in app["deployments"]:
        d["user_config"] = copy.deepcopy(d["user_config"])  # one YAML anchor: one shared dict
        gpus = d["ray_actor_options"]["num_gpus"]
        d["user_config"]["gpu_memory_fraction"] = gpus * card_fraction if card_fraction and gpus else None
        if d["name"] == "PreprocessDeployment":
            d["num_replicas"] = cpu_replicas
        elif "num_replicas" not in d:  # a fixed count (the ingress's four) stays as the file sets it
            d["num_replicas"] = d.get("autoscaling_config", {}).get("min_replicas", 1)
        d.pop("autoscaling_config", None)  # fixed replicas: the figures are per GPU
        d["max_queued_requests"] = -1
        if d["name"] == "PreprocessDeployment":
            d["ray_actor_options"]["num_cpus"] = min(1.0, (os.cpu_count() or 2) / (cpu_replicas + 2))
    return config


def node_shares() -> tuple[int, float | None]:
    """CPU replicas for this node (all cores but four), and the fraction of this GPU's memory
    that emulates a 24 GB card (None without CUDA)."""
    fraction = None
    if torch.cuda.is_available():
        fraction = min(1.0, EMULATED_CARD_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    return max(2, (os.cpu_count() or 2) - 4), fraction


def bench_config(folder: Path, cache: Path, *, tile: int, batch: int, compile_mode: str) -> dict:
    """serve_config.yaml as the benchmark deploys it on this node (see ``_config``)."""
    cpu_replicas, fraction = node_shares()
    return _config(folder, cache, tile, batch, cpu_replicas, fraction, compile_mode)


def deploy(config: dict, tmp: Path) -> None:
    path = tmp / "bench_config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = [shutil.which("serve")] if shutil.which("serve") else [
        sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
    # The command's messages go to stderr: stdout carries the benchmarks' JSON.
    subprocess.run([*serve_cli, "deploy", str(path), "--address", "http://127.0.0.1:8265"], check=True,
                   stdout=sys.stderr)
    deadline = time.time() + 900
    while time.time() < deadline:
        app = serve.status().applications.get("restore")
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(app.message)
        time.sleep(2)
    raise TimeoutError("the benchmark application did not start in 15 minutes")


def deploy_changed(config: dict, changes: dict, tmp: Path) -> None:
    """Deploy ``config`` with ``changes`` made to every deployment's ``user_config``: on a
    running application, the same replicas reconfigured (or reloaded, where a change needs it)."""
    changed = copy.deepcopy(config)
    for deployment in changed["applications"][0]["deployments"]:
        deployment["user_config"].update(changes)
    deploy(changed, tmp)
    time.sleep(5)  # the application reads RUNNING before every replica has its new user_config


CPU_STEPS = ("decode", "tiles", "stitch", "canvas", "paste", "encode")  # the CPU deployment's own work


def _client() -> aiohttp.ClientSession:
    """The load generator's HTTP client. aiohttp parses answers in C; httpx, in Python, added
    12-18 ms of its own to a 3 MB answer, and 63 ms at p99 at 64 answers/s, from a server that
    did no work (aiohttp: 3-4 and 8 ms; ``python -m bench.tail client``): time that would
    have been charged to the service."""
    return aiohttp.ClientSession(URL, timeout=aiohttp.ClientTimeout(total=600),
                                 connector=aiohttp.TCPConnector(limit=0))


async def _post(http: aiohttp.ClientSession, body: bytes, params: dict, latencies: list,
                steps: dict[str, list] | None = None) -> None:
    start = time.perf_counter()
    async with http.post("/v1/restore", data=body, params=params) as r:
        r.raise_for_status()
        await r.read()
    latencies.append((time.perf_counter() - start) * 1e3)
    for header, value in r.headers.items() if steps is not None else ():
        header = header.lower()
        if header.startswith("x-timing-"):  # x-timing-STEP-ms
            steps.setdefault(header.removeprefix("x-timing-").removesuffix("-ms"), []).append(float(value))


async def closed_loop(body: bytes, params: dict, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    steps: dict[str, list] = {}
    async with _client() as http:
        start = time.perf_counter()

        async def worker():
            while time.perf_counter() - start < seconds:
                await _post(http, body, params, latencies, steps)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(latencies), "images_per_s": len(latencies) / wall,
            **percentiles(latencies), "steps_ms_p50": {k: float(np.median(v)) for k, v in steps.items()},
            "steps_ms_p99": {k: float(np.percentile(v, 99)) for k, v in steps.items()}}


async def open_loop(body: bytes, params: dict, rate: float, seconds: float, arrivals: str = "poisson") -> dict:
    """Requests arriving at ``rate`` per second (``arrival_gaps``), whatever the answers' pace."""
    latencies: list[float] = []
    steps: dict[str, list] = {}
    gaps = arrival_gaps(rate, arrivals)
    async with _client() as http:
        tasks, start, due = [], time.perf_counter(), 0.0
        while due < seconds:
            await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
            tasks.append(asyncio.create_task(_post(http, body, params, latencies, steps)))
            due += next(gaps)
        await asyncio.gather(*tasks)
    # where the tail is: each step's p50 and p99 (x-timing headers; "restore" holds the GPU work)
    return {"offered_per_s": rate, "arrivals": arrivals, "requests": len(latencies), **percentiles(latencies),
            "steps_ms": {k: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
                         for k, v in steps.items()}}


def _gpu_stats() -> dict:
    return {name: serve.get_deployment_handle(name, "restore").stats.remote().result()
            for name in ("UpscalerDeployment", "FaceDeployment")}


PEAK_GAIN = 1.05  # a doubled concurrency that adds less throughput than this has found the peak
MAX_CONCURRENCY = 512


def more_load(results: list[dict]) -> int | None:
    """The next concurrency to try after the closed-loop ``results`` so far, or None once the
    peak is found: while the last level still added 5% or more to the one before, double it.
    The open loop runs at 70% of the peak, so a peak taken too early is a lighter load."""
    if len(results) < 2 or results[-1]["concurrency"] * 2 > MAX_CONCURRENCY:
        return None
    if results[-1]["images_per_s"] < PEAK_GAIN * results[-2]["images_per_s"]:
        return None
    return results[-1]["concurrency"] * 2


def _path(name: str, body: bytes, params: dict, levels: list[int], seconds: float, open_seconds: float) -> dict:
    asyncio.run(closed_loop(body, params, 2, 2))  # warm-up: first batches, every CPU replica
    results = []
    concurrency = levels[0]
    while concurrency is not None:
        reset_gpu_stats()
        with HostCpu() as host:
            level = asyncio.run(closed_loop(body, params, concurrency, seconds))
        results.append({**level, **gpu_replica_times(name), "host_cpu": host.report})
        concurrency = levels[len(results)] if len(results) < len(levels) else more_load(results)
    best = max(r["images_per_s"] for r in results)
    reset_gpu_stats()
    with HostCpu() as host:
        loaded = asyncio.run(open_loop(body, params, LOAD * best, open_seconds))
    loaded.update(gpu_replica_times(name), host_cpu=host.report)
    # The same rate evenly spaced: what is left of the tail is the service's own, not the
    # bunching of random arrivals that any single queue turns into waiting.
    reset_gpu_stats()
    even = asyncio.run(open_loop(body, params, LOAD * best, open_seconds, arrivals="even"))
    even.update(gpu_replica_times(name))
    for loop in (loaded, even):
        loop["p99_over_unloaded_p50"] = loop["p99_ms"] / results[0]["p50_ms"]
        # how much of that tail a request has alone, and how much the load adds to it
        loop["p99_over_unloaded_p99"] = loop["p99_ms"] / results[0]["p99_ms"]
    bounded = _latency_bounded(body, params, best, results[0]["p50_ms"], loaded["p99_over_unloaded_p50"],
                               open_seconds / 2)
    # CPU time of a request measured unloaded (no thread waits), and the cores it takes at the
    # best rate; Ray's and the HTTP proxy's own CPU come on top.
    cpu_ms = sum(v for k, v in results[0]["steps_ms_p50"].items() if k in CPU_STEPS)
    return {"path": name, "params": params, "closed_loop": results, "best_images_per_s": best,
            "open_loop_at_70_percent": loaded, "open_loop_at_70_percent_even": even,
            "latency_bounded": bounded, "cpu_ms_per_request": cpu_ms,
            "cpu_cores_at_best_rate": cpu_ms * best / 1e3,
            "node_cores_at_best_rate": _service_cores(max(results, key=lambda r: r["images_per_s"])["host_cpu"])}


def _latency_bounded(body: bytes, params: dict, best: float, unloaded_p50: float, ratio_at_load: float,
                     seconds: float) -> dict:
    """The highest Poisson rate, in tenths of the peak, whose p99 stays within ``TAIL_BOUND`` of
    the unloaded p50 (``highest_load_within_bound``; at ``LOAD`` it was ``ratio_at_load``), each
    probe ``seconds`` long."""
    loops = {}

    def ratio_at(load: float) -> float:
        loops[load] = asyncio.run(open_loop(body, params, load * best, seconds))
        return loops[load]["p99_ms"] / unloaded_p50

    load, probes = highest_load_within_bound(ratio_at, ratio_at_load)
    return {"bound": TAIL_BOUND, "arrivals": "poisson", "probe_seconds": seconds, "load": load,
            "images_per_s": None if load is None else load * best,
            "probes": [{"load": at, "p99_over_unloaded_p50": ratio,
                        **{k: loops[at][k] for k in ("offered_per_s", "requests", "p50_ms", "p99_ms") if at in loops}}
                       for at, ratio in sorted(probes.items())]}


def path_request(name: str, upscale_size: int = 256) -> tuple[bytes, dict]:
    """The request a served path is measured with: its PNG body and its query parameters."""
    if name == "upscale":
        return png(photo(upscale_size)), {"model": "RealESRGAN_x4plus", "format": "png"}
    return png(photo()), {"model": "none", "face_enhance": "true", "scale": 2, "format": "png"}


def _service_cores(host: dict) -> float:
    """The node's busy cores less the load generator's own: what serving took, all processes."""
    return round(host["busy_cores"] - host["cores_by_process"].get(LOAD_GENERATOR, 0.0), 2)


def reset_gpu_stats() -> None:
    for deployment in ("UpscalerDeployment", "FaceDeployment"):
        serve.get_deployment_handle(deployment, "restore").reset_stats.remote().result()


def gpu_replica_times(path: str) -> dict:
    """Where the path's requests spent their time inside its GPU replica, and its batch sizes."""
    deployment, key = ("UpscalerDeployment", "upscaler_replica") if path == "upscale" else (
        "FaceDeployment", "face_replica")
    stats = serve.get_deployment_handle(deployment, "restore").stats.remote().result()
    return {key: {"times": stats["times"], "batch_sizes": stats["batch_sizes"]}}


def start_ray() -> None:
    """A local Ray instance with its dashboard (a logical GPU when there is none)."""
    # Ray's workers inherit this, so the controller can import bench.served:build_bench_app.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_gpus=None if torch.cuda.is_available() else 1, include_dashboard=True,
             dashboard_host="127.0.0.1")
    time.sleep(5)  # the dashboard's REST API, which `serve deploy` talks to


def run(report: dict, folder: Path, cache: Path, *, tile: int, batch: int, sizes: dict, levels: list[int],
        seconds: float, open_seconds: float, compile_mode: str, save=lambda: None) -> dict:
    """Deploy and measure into ``report`` (inside ``start_ray()``'s instance), calling ``save``
    after each part; the application is deleted after."""
    cuda = torch.cuda.is_available()
    cpu_replicas, fraction = node_shares()
    started = time.perf_counter()
    deploy(bench_config(folder, cache, tile=tile, batch=batch, compile_mode=compile_mode), folder)
    report["settings"] = {"cpu_replicas": cpu_replicas, "emulated_card_fraction": fraction,
                           "emulated_card_gib": EMULATED_CARD_GIB if cuda else None,
                           "deploy_s": time.perf_counter() - started, "tile": tile, "batch": batch,
                           "seconds_per_level": seconds, "open_loop_seconds": open_seconds}
    # The load generator's heap too: a full collection here (torch and Ray are imported) would
    # pause the client and count as the service's latency.
    freeze_heap()
    for name in ("upscale", "faces"):
        report[name] = _path(name, *path_request(name, sizes["upscale"]), levels, seconds, open_seconds)
        save()
    big = photo(sizes["largest"])
    latencies: list[float] = []
    asyncio.run(_one(png(big), latencies))
    report["largest"] = {"input": list(big.shape[:2]), "scale": 4, "ms": latencies[0]}
    report["gpu_replicas"] = {name: {"device": s["device"], "gpu_memory": s["gpu_memory"], "gpu_waits": s["gpu_waits"]}
                              for name, s in _gpu_stats().items()}
    serve.delete("restore")
    return report


async def _one(body: bytes, latencies: list) -> None:
    async with _client() as http:
        await _post(http, body, {"model": "RealESRGAN_x4plus", "format": "png"}, latencies)
