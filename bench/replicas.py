"""Several GPU replicas of each model on one GPU: how the graph routes and batches across them.

With one GPU, the upscaler and face deployments are deployed with 1 and then 2 replicas each,
their share of the GPU (and of the emulated card's memory, and their CPU share) divided between
them. The served
benchmark's two requests (a 256x256 PNG at x4; the one-face photo at x2) run closed loop at a
few concurrencies; per replica: the tiles or faces it batched, its batch sizes, and its GPU
memory against its cap. Replicas are told apart by their process id.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from ray import serve

from bench import served

GPU_DEPLOYMENTS = {"upscale": "UpscalerDeployment", "faces": "FaceDeployment"}


def config_with(folder: Path, cache: Path, replicas: int, **settings) -> dict:
    """The benchmark's configuration with ``replicas`` of each GPU deployment sharing its GPU share."""
    config = served.bench_config(folder, cache, **settings)
    for d in config["applications"][0]["deployments"]:
        if d["name"] in GPU_DEPLOYMENTS.values():
            d["num_replicas"] = replicas
            d["ray_actor_options"]["num_gpus"] /= replicas
            d["ray_actor_options"]["num_cpus"] /= replicas  # the node's CPU budget as with one
            if d["user_config"].get("gpu_memory_fraction"):
                d["user_config"]["gpu_memory_fraction"] /= replicas
    return config


def replica_stats(deployment: str, calls: int = 24) -> dict[int, dict]:
    """Each replica's ``stats()``, by process id: the handle routes each call to one of them."""
    handle = serve.get_deployment_handle(deployment, "restore")
    seen: dict[int, dict] = {}
    for _ in range(calls):
        stats = handle.stats.remote().result()
        seen[stats["pid"]] = stats
    return seen


def _items(stats: dict) -> Counter:
    """Batch sizes as counts: the upscaler's tiles, or the face replica's restore step."""
    sizes = stats["batch_sizes"]
    return Counter({int(k): v for k, v in (sizes.get("restore", {}) if "restore" in sizes else sizes).items()})


def run(report: dict, folder: Path, cache: Path, *, tile: int, batch: int, compile_mode: str, upscale_size: int,
        levels: list[int], seconds: float, save=lambda: None) -> dict:
    for replicas in (1, 2):
        served.deploy(config_with(folder, cache, replicas, tile=tile, batch=batch, compile_mode=compile_mode), folder)
        entry = report[f"{replicas}_per_model"] = {}
        for path, deployment in GPU_DEPLOYMENTS.items():
            body, params = served.path_request(path, upscale_size)
            asyncio.run(served.closed_loop(body, params, 2, 2))  # warm-up: first batches, every replica
            rows = []
            for concurrency in levels:
                before = replica_stats(deployment)
                level = asyncio.run(served.closed_loop(body, params, concurrency, seconds))
                after = replica_stats(deployment)
                per_replica = []
                for pid, stats in sorted(after.items()):
                    sizes = _items(stats) - _items(before.get(pid, {"batch_sizes": {}}))
                    per_replica.append({"pid": pid, "items": sum(k * v for k, v in sizes.items()),
                                        "batches": sum(sizes.values()), "batch_sizes": dict(sorted(sizes.items())),
                                        "gpu_memory": stats["gpu_memory"]})
                rows.append({k: level[k] for k in ("concurrency", "requests", "images_per_s", "p50_ms", "p99_ms")}
                            | {"replicas": per_replica})
            entry[path] = rows
            save()
        serve.delete("restore")
    return report


def rows(report: dict) -> list[str]:
    """The replica rows of the benchmark's table: images a second at the highest concurrency."""
    out = []
    for path in GPU_DEPLOYMENTS:
        one, two = (report.get(f"{n}_per_model", {}).get(path) for n in (1, 2))
        if one and two:
            a, b = one[-1]["images_per_s"], two[-1]["images_per_s"]
            out.append(f"| {path}, 2 replicas of each model on one GPU vs 1, images/s at {one[-1]['concurrency']} "
                       f"| {b:.1f} | {a:.1f} | {b / a:.2f}x |")
    return out
