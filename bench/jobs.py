"""Jobs beside the synchronous path: the served benchmark's two pictures through POST /v1/jobs.

The graph is the one ``bench.served`` deploys, with the job queue added as ``restore-serve``
adds it on one machine (a private Redis; SQLite records and a results folder in a temporary
data folder) and the consumers fixed at serve_config.yaml's most, so the figures are per GPU.
Per path (the 256x256 picture at x4, the one-face photo at x2, PNG out):
- saturation: the synchronous closed loop at as many requests in flight as the consumers run
  jobs, and at twice that (the better is the figure to match); then ``jobs`` jobs submitted as
  fast as the ingress takes them, their throughput taken from their completion times over the
  middle 80% (the consumers' start and the last stragglers left out);
- light load: jobs at ``rate`` a second (Poisson arrivals), and the synchronous path at the
  same rate: from the job records, the time a job waited in the queue (created, then started
  by a consumer) and its whole time (created to completed), p50 and p99, against the
  synchronous latency, so the queue's added latency is their difference.
"""
from __future__ import annotations

import asyncio
import copy
import shutil
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import torch
import yaml
from ray import serve

from bench import served
from bench.arrivals import arrival_gaps
from bench.common import percentiles
from serve_app.jobs.broker import LocalBroker
from serve_app.jobs.system import CONSUMER


def jobs_config(folder: Path, cache: Path, broker_url: str, data_dir: Path, *, tile: int, batch: int,
                compile_mode: str, replicas: int | None = None, jobs_each: int | None = None) -> tuple[dict, int]:
    """The served benchmark's configuration with the job consumers put back, fixed at
    ``replicas`` running ``jobs_each`` jobs at once (default: the shipped maximum and
    max_ongoing_requests); and how many jobs they run at once in all."""
    config = served.bench_config(folder, cache, tile=tile, batch=batch, compile_mode=compile_mode)
    shipped = yaml.safe_load((served.ROOT / "serve_config.yaml").read_text())
    consumer = copy.deepcopy(next(d for d in shipped["applications"][0]["deployments"] if d["name"] == CONSUMER))
    replicas = replicas or consumer["autoscaling_config"]["max_replicas"]
    del consumer["autoscaling_config"]
    consumer.update(num_replicas=replicas, user_config=copy.deepcopy(consumer["user_config"]),
                    max_ongoing_requests=jobs_each or consumer["max_ongoing_requests"])
    app = config["applications"][0]
    app["deployments"].append(consumer)
    app["args"]["jobs"] = {"broker_url": broker_url, "data_dir": str(data_dir)}
    return config, replicas * consumer["max_ongoing_requests"]


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def _submit(http: aiohttp.ClientSession, body: bytes, params: dict) -> str:
    async with http.post("/v1/jobs", data=body, params=params) as r:
        r.raise_for_status()
        return (await r.json())["id"]


async def _ended(http: aiohttp.ClientSession, ids: list[str], poll_s: float = 0.25) -> list[dict]:
    """The jobs once none is queued or processing, as GET /v1/jobs/{id} shows each."""
    while True:
        busy = 0
        for status in ("queued", "processing"):
            async with http.get("/v1/jobs", params={"status": status, "limit": 1}) as r:
                busy += len((await r.json())["jobs"])
        if not busy:
            break
        await asyncio.sleep(poll_s)

    async def one(job_id: str) -> dict:
        async with http.get(f"/v1/jobs/{job_id}") as r:
            return await r.json()

    jobs = await asyncio.gather(*(one(i) for i in ids))
    failed = [j for j in jobs if j["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} jobs did not succeed, the first: {failed[0]}")
    return jobs


async def saturation(body: bytes, params: dict, count: int, submitters: int = 32) -> dict:
    """``count`` jobs submitted by ``submitters`` clients at once; throughput from completions."""
    ids: list[str] = []
    async with served._client() as http:
        started = time.time()

        async def submitter(share: int):
            for _ in range(share):
                ids.append(await _submit(http, body, params))

        await asyncio.gather(*(submitter(count // submitters + (i < count % submitters)) for i in range(submitters)))
        submitted_s = time.time() - started
        jobs = await _ended(http, ids)
    done = sorted(_at(j["completed_at"]) for j in jobs)
    low, high = int(0.1 * count), int(0.9 * count) - 1
    return {"jobs": count, "submit_s": submitted_s, "jobs_per_s": (high - low) / (done[high] - done[low]),
            "all_jobs_per_s": count / (done[-1] - started)}


async def light_load(body: bytes, params: dict, rate: float, seconds: float) -> dict:
    ids: list[str] = []
    gaps = arrival_gaps(rate)
    async with served._client() as http:
        start, due, tasks = time.perf_counter(), 0.0, []

        async def submit():
            ids.append(await _submit(http, body, params))

        while due < seconds:
            await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
            tasks.append(asyncio.create_task(submit()))
            due += next(gaps)
        await asyncio.gather(*tasks)
        jobs = await _ended(http, ids)
    queued = [j["metrics"]["queued_s"] * 1e3 for j in jobs]
    whole = [(_at(j["completed_at"]) - _at(j["created_at"])) * 1e3 for j in jobs]
    return {"rate_per_s": rate, "jobs": len(jobs), "queued_ms": percentiles(queued), "whole_ms": percentiles(whole)}


def run_path(name: str, body: bytes, params: dict, in_flight: int, *, count: int, seconds: float, rate: float,
             open_seconds: float) -> dict:
    asyncio.run(served.closed_loop(body, params, 2, 2))  # warm-up: first batches, every CPU replica
    asyncio.run(saturation(body, params, max(4, in_flight // 4)))  # and the consumers' first jobs
    sync = [asyncio.run(served.closed_loop(body, params, level, seconds)) for level in (in_flight, 2 * in_flight)]
    sync_best = max(level["images_per_s"] for level in sync)
    saturated = asyncio.run(saturation(body, params, count))
    sync_light = asyncio.run(served.open_loop(body, params, rate, open_seconds))
    light = asyncio.run(light_load(body, params, rate, open_seconds))
    return {"path": name, "params": params, "jobs_in_flight": in_flight,
            "synchronous": [{k: level[k] for k in ("concurrency", "images_per_s", "p50_ms", "p99_ms")} for level in sync],
            "saturation": saturated, "jobs_over_synchronous": saturated["jobs_per_s"] / sync_best,
            "light_load": light, "synchronous_light_load": {k: sync_light[k] for k in ("offered_per_s", "p50_ms", "p99_ms")},
            "added_ms": {"p50": light["whole_ms"]["p50_ms"] - sync_light["p50_ms"],
                         "p99": light["whole_ms"]["p99_ms"] - sync_light["p99_ms"]}}


def run(report: dict, folder: Path, cache: Path, *, tile: int, batch: int, upscale_size: int, compile_mode: str,
        count: int, seconds: float, rate: float, open_seconds: float, save=lambda: None) -> dict:
    """Deploy with a job queue and measure into ``report`` (inside ``served.start_ray()``'s
    instance); the application, the broker and the jobs' data are removed after."""
    data = folder / "jobs"
    broker = LocalBroker(data / "broker")
    try:
        # On a CPU (the smoke run) one consumer, one job at a time: the graph fits two cores, and
        # the synchronous loops beside it stay within the request timeout.
        smoke = None if torch.cuda.is_available() else 1
        config, in_flight = jobs_config(folder, cache, broker.start(), data, tile=tile, batch=batch,
                                        compile_mode=compile_mode, replicas=smoke, jobs_each=smoke)
        served.deploy(config, folder)
        report["settings"] = {"jobs_in_flight": in_flight, "jobs_per_path": count, "seconds_per_level": seconds,
                              "light_rate_per_s": rate, "light_seconds": open_seconds}
        for name in ("upscale", "faces"):
            report[name] = run_path(name, *served.path_request(name, upscale_size), in_flight, count=count,
                                    seconds=seconds, rate=rate, open_seconds=open_seconds)
            save()
        serve.delete("restore")
    finally:
        broker.stop()
        shutil.rmtree(data, ignore_errors=True)
    return report


def rows(jobs: dict) -> list[str]:
    """The jobs rows of the benchmark's table."""
    out = []
    for name in ("upscale", "faces"):
        path = jobs[name]
        sync = max(level["images_per_s"] for level in path["synchronous"])
        out.append(f"| {name}: jobs/s at saturation vs synchronous images/s | {path['saturation']['jobs_per_s']:.1f} "
                   f"| {sync:.1f} | {path['jobs_over_synchronous']:.2f}x |")
        light = path["light_load"]
        out.append(f"| {name}: jobs at {light['rate_per_s']:g}/s, queue wait p50 / p99; whole time p50 / p99 vs "
                   f"synchronous | {light['queued_ms']['p50_ms']:.0f} / {light['queued_ms']['p99_ms']:.0f} ms; "
                   f"{light['whole_ms']['p50_ms']:.0f} / {light['whole_ms']['p99_ms']:.0f} ms "
                   f"| {path['synchronous_light_load']['p50_ms']:.0f} / {path['synchronous_light_load']['p99_ms']:.0f} ms "
                   f"| {path['added_ms']['p50']:+.0f} / {path['added_ms']['p99']:+.0f} ms |")
    return out
