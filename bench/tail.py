"""Where the served paths' p99 under load comes from: the measurements behind `bench/RESULTS.md`.

    python -m bench.tail queue [--rate 66.6] [--fixed-ms 4.9] [--tile-ms 9.0] [--unloaded-ms 59]
                               [--arrivals poisson|even]
    python -m bench.tail bound RESULTS.json [...]
    python -m bench.tail closed RESULTS.json [...]
    python -m bench.tail overlap          # CUDA only
    python -m bench.tail client [--rate 64]
    python -m bench.tail settings [--paths faces upscale] [--variant NAME JSON ...] [--open-seconds 16]
                                  [--arrivals poisson|even]

- ``queue``: Poisson (or, with ``--arrivals even``, evenly spaced) arrivals at one device
  that runs one batch at a time, formed as ``DeviceBatcher`` forms them (everything waiting,
  up to the cap; a lone item waits ``--wait-ms`` for company when it finds the device idle),
  a batch of n tiles taking ``fixed + n * tile`` ms: the GPU step's p50/p99 and mean batch,
  for several caps, against one request alone; and the floor of a whole request's p99 (all but
  the GPU step kept at their unloaded times) against its unloaded p50.
- ``bound``: for each served run's upscale path, the best p99 over unloaded p50 that any order
  or batching could give at 70% of its peak, on a perfect device: one that takes exactly
  1/peak seconds a tile whatever its batch (no cost per batch, no wait for company), so tiles
  go one at a time in arrival order (with equal jobs, another order only moves waiting from
  one request to another; in order keeps the longest wait shortest). Everything else in the
  request keeps its unloaded time. Also how long that other work would have to take for 2x at
  the run's peak, or how cheap a tile would have to be with the run's other work.
- ``closed``: the issue's bound read off each served run's closed loop instead: each
  concurrency level's share of the loop's peak and its p99 over the unloaded (one in flight)
  p50, and the first level that reached 70% of the peak. A fixed pool of clients, each sending
  its next picture when the last comes back, as queue workers do, sees this load.
- ``overlap``: two CUDA-graph sets of the compiled x4plus replayed from two threads on two
  streams, against the same replays one after the other: what a second device lane would gain.
- ``client``: the load generator's own share of a 3 MB answer, httpx against aiohttp, from a
  local server that does no work.
- ``settings``: served paths (by default the face path) measured with several ``user_config``
  variants in turn (a change of ``user_config`` only: the same replicas), each twice, at one
  open-loop rate per path (70% of its peak at the first variant), with the GPU replica's own
  step times: which setting grows the tail. By default ``face_batch_size`` 8 against 1: whether
  the face replica's batches are the cause (asked when each face waited for its whole batch;
  faces now leave one by one). ``face-settings``, its name until run p, still runs it. Meant
  for CUDA: on a CPU its turns take minutes.
Each prints JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.arrivals import ARRIVALS, LOAD, arrival_gaps


def simulate_queue(rate: float, batch_ms, cap: int, wait_ms: float, requests: int = 200_000,
                   seed: int = 0, arrivals: str = "poisson") -> dict:
    """The GPU step of each request (arrival to its batch's end) in a one-batch-at-a-time queue,
    ``rate`` requests a second arriving as ``arrival_gaps`` spaces them."""
    times = np.cumsum(list(itertools.islice(arrival_gaps(rate / 1e3, arrivals, seed), requests)))
    latencies, sizes, free, i = [], [], 0.0, 0
    while i < requests:
        start = max(free, times[i])
        if start == times[i]:  # the device was idle: wait for company, or until the batch is full
            full = times[i + cap - 1] if i + cap - 1 < requests else np.inf
            start = min(times[i] + wait_ms, full)
        j = i
        while j < requests and j - i < cap and times[j] <= start:
            j += 1
        end = start + batch_ms(j - i)
        latencies.extend(end - times[i:j])
        sizes.append(j - i)
        free, i = end, j
    return {"mean_ms": float(np.mean(latencies)), "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "mean_batch": float(np.mean(sizes))}


def queue(args) -> dict:
    def batch_ms(n):
        return args.fixed_ms + args.tile_ms * n

    alone = batch_ms(1) + args.wait_ms
    by_cap = {cap: simulate_queue(args.rate, batch_ms, cap, args.wait_ms, arrivals=args.arrivals)
              for cap in (2, 4, 8)}
    # The best the whole request could do: everything but the GPU step kept at its unloaded time.
    floor_ms = args.unloaded_ms - alone + by_cap[args.cap]["p99_ms"]
    return {"rate_per_s": args.rate, "arrivals": args.arrivals,
            "batch_ms": f"{args.fixed_ms} + {args.tile_ms} * tiles", "alone_ms": alone,
            "by_cap": by_cap, "request_p99_floor_ms": floor_ms,
            "request_p99_floor_over_unloaded_p50": floor_ms / args.unloaded_ms}


def perfect_device_bound(peak_per_s: float, unloaded_ms: float, inside_ms: float, load: float = 0.7) -> dict:
    """See ``bound`` in the module's note. ``inside_ms``: the unloaded time inside the GPU
    replica, the part a perfect device would replace by one tile's time."""
    tile_ms, other_ms = 1e3 / peak_per_s, unloaded_ms - inside_ms
    p99_ms = simulate_queue(load * peak_per_s, lambda n: tile_ms * n, cap=1, wait_ms=0.0)["p99_ms"]
    tiles = p99_ms / tile_ms  # the GPU step's p99 in tiles: the same for every tile time at one load
    return {"tile_ms": tile_ms, "other_ms": other_ms, "gpu_step_p99_ms": p99_ms, "gpu_step_p99_in_tiles": tiles,
            "p99_over_unloaded_p50": (other_ms + p99_ms) / (other_ms + tile_ms),
            # (other + tiles * tile) <= 2 * (other + tile), solved for each
            "other_ms_for_2x": (tiles - 2) * tile_ms, "tile_ms_for_2x": other_ms / (tiles - 2)}


def bound(args) -> dict:
    report = {}
    for path in args.results:
        upscale = json.loads(Path(path).read_text())["served"]["upscale"]
        unloaded = upscale["closed_loop"][0]
        report[Path(path).name] = {
            "peak_per_s": upscale["best_images_per_s"], "unloaded_p50_ms": unloaded["p50_ms"],
            "measured": upscale["open_loop_at_70_percent"]["p99_over_unloaded_p50"],
            "perfect_device": perfect_device_bound(upscale["best_images_per_s"], unloaded["p50_ms"],
                                                   unloaded["upscaler_replica"]["times"]["inside_ms_p50"])}
    return report


def closed_loop_reading(closed_loop: list[dict], load: float = LOAD) -> dict:
    """Each level of a closed loop (concurrency rising) as a share of the loop's best
    throughput, with its p99 over the first level's (one in flight) p50; and the first level
    that reached ``load`` of that best."""
    peak, unloaded_p50 = max(level["images_per_s"] for level in closed_loop), closed_loop[0]["p50_ms"]
    levels = [{"concurrency": level["concurrency"], "share_of_peak": level["images_per_s"] / peak,
               "p99_ms": level["p99_ms"], "p99_over_unloaded_p50": level["p99_ms"] / unloaded_p50}
              for level in closed_loop]
    first = next(level for level in levels if level["share_of_peak"] >= load)
    return {"levels": levels, "first_at_load": first}


def closed(args) -> dict:
    report = {}
    for path in args.results:
        served = json.loads(Path(path).read_text())["served"]
        report[Path(path).name] = {name: closed_loop_reading(served[name]["closed_loop"])
                                   for name in ("upscale", "faces") if name in served}
    return report


def overlap(args) -> dict:
    import torch

    from bench.common import weights_in_use
    from serve_app.config import EngineConfig, TileConfig, WeightsConfig
    from serve_app.engines.compiled import _zeros
    from serve_app.engines.cuda_graphs import CapturedCall
    from serve_app.engines.upscaler import load_upscaler
    from serve_app.weights import WeightsStore

    folder = Path(tempfile.mkdtemp())
    weights_in_use(folder, folder / "cache", ["RealESRGAN_x4plus"])
    store = WeightsStore(WeightsConfig(folder=folder, cache_dir=folder / "cache", download=False))
    engine = load_upscaler("RealESRGAN_x4plus", store, EngineConfig(device="cuda", compile="on",
                           tile=TileConfig(size=256, batch_size=8)))
    first = engine.run._graphs
    pool, warm_up = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
    second = {b: CapturedCall(engine.run._compiled, _zeros(b, 256, torch.device("cuda"), torch.half,
                                                        torch.channels_last), pool, warm_up)
              for b in sorted(first, reverse=True)}
    streams = torch.cuda.Stream(), torch.cuda.Stream()

    def replay(graph, stream, times):
        with torch.cuda.stream(stream):
            for _ in range(times):
                graph.graph.replay()
            stream.synchronize()

    results, times = {}, 20
    for b in (1, 2, 4, 8):
        replay(first[b], streams[0], 3)
        replay(second[b], streams[1], 3)
        started = time.perf_counter()
        replay(first[b], streams[0], times)
        replay(second[b], streams[1], times)
        one_after_other = time.perf_counter() - started
        threads = [threading.Thread(target=replay, args=(g, s, times)) for g, s in zip((first[b], second[b]), streams)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        together = time.perf_counter() - started
        results[f"batch_{b}"] = {"one_batch_ms": one_after_other / (2 * times) * 1e3,
                                 "two_at_once_ms": together / times * 1e3,
                                 "throughput_gain": one_after_other / together - 1}
    return {"device": torch.cuda.get_device_name(), **results}


_SERVER = """
import os
body = os.urandom(3_000_000)
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"image/png")]})
    await send({"type": "http.response.body", "body": body})
"""


async def _client_latencies(kind: str, url: str, rate: float, seconds: float) -> list[float]:
    import aiohttp
    import httpx

    body, latencies, gaps = os.urandom(130_000), [], arrival_gaps(rate)
    if kind == "httpx":
        session = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=None))
    else:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def one():
        started = time.perf_counter()
        if kind == "httpx":
            (await session.post(url, content=body)).raise_for_status()
        else:
            async with session.post(url, data=body) as r:
                r.raise_for_status()
                await r.read()
        latencies.append((time.perf_counter() - started) * 1e3)

    async with session:
        tasks, start, due = [], time.perf_counter(), 0.0
        while due < seconds:
            await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
            due += next(gaps)
        await asyncio.gather(*tasks)
    return latencies


def client(args) -> dict:
    folder = Path(tempfile.mkdtemp())
    (folder / "noop_server.py").write_text(_SERVER)
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "noop_server:app", "--port", "8011",
                               "--log-level", "warning"], cwd=folder)
    try:
        time.sleep(3)
        results = {}
        for kind in ("httpx", "aiohttp"):
            for rate in (1.0, args.rate):
                ms = asyncio.run(_client_latencies(kind, "http://127.0.0.1:8011/", rate, 8))
                results[f"{kind}_at_{rate:g}_per_s"] = {"p50_ms": float(np.percentile(ms, 50)),
                                                       "p99_ms": float(np.percentile(ms, 99))}
        return results
    finally:
        server.terminate()


def settings(args) -> dict:
    import torch
    from ray import serve

    from bench import served
    from bench.common import weights_in_use
    from serve_app.deployments.heap import freeze_heap

    variants = {name: json.loads(value) for name, value in args.variant or
                (("batch_8", '{"face_batch_size": 8}'), ("batch_1", '{"face_batch_size": 1}'))}
    folder = Path(tempfile.mkdtemp())
    weights_in_use(folder, args.cache_dir, ["RealESRGAN_x4plus", "GFPGANv1.4", "retinaface_resnet50", "parsenet"])
    served.start_ray()
    config = served.bench_config(folder, args.cache_dir, tile=256, batch=8, compile_mode="auto")
    served.deploy(config, folder)
    freeze_heap()
    report: dict = {"command": " ".join(["python -m bench.tail", *sys.argv[1:]]), "cpus": os.cpu_count(),
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "paths": {}}
    for path in args.paths:
        body, params = served.path_request(path)
        asyncio.run(served.closed_loop(body, params, 2, 3))  # warm-up
        turns, rate = report["paths"].setdefault(path, {}), None
        for turn in ("", "_again"):
            for name, changes in variants.items():
                served.deploy_changed(config, changes, folder)
                if rate is None:  # every load level's batch shapes seen (and captured) before measuring
                    rate = 0.7 * asyncio.run(served.closed_loop(body, params, 32, 8))["images_per_s"]
                served.reset_gpu_stats()
                unloaded = asyncio.run(served.closed_loop(body, params, 1, 8))
                replica_unloaded = served.gpu_replica_times(path)
                served.reset_gpu_stats()
                loaded = asyncio.run(served.open_loop(body, params, rate, args.open_seconds, args.arrivals))
                turns[name + turn] = {"settings": changes, "unloaded": unloaded, "open_loop": loaded,
                                      "p99_over_unloaded_p50": loaded["p99_ms"] / unloaded["p50_ms"],
                                      "replica_unloaded": replica_unloaded,
                                      "replica_open_loop": served.gpu_replica_times(path)}
                if args.out:  # each turn kept as it ends: a run cut short keeps its turns
                    args.out.write_text(json.dumps(report, indent=2))
    serve.delete("restore")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("queue")
    q.add_argument("--rate", type=float, default=66.6, help="arrivals per second (run l: 70%% of 95.1)")
    q.add_argument("--fixed-ms", type=float, default=4.9, help="a batch's time besides its tiles (run l: "
                   "3.1 on the GPU, 1.1 of copies, 0.7 between batches)")
    q.add_argument("--tile-ms", type=float, default=9.0, help="each tile's share of a batch's time")
    q.add_argument("--wait-ms", type=float, default=5.0, help="upscaler_batch_wait_s, in ms (run l's; the "
                   "service's default is 0 since run j)")
    q.add_argument("--cap", type=int, default=8, choices=(2, 4, 8), help="tile.batch_size, for the floor")
    q.add_argument("--arrivals", choices=ARRIVALS, default="poisson", help="how requests are spaced "
                   "(bench.arrivals)")
    q.add_argument("--unloaded-ms", type=float, default=59.0, help="a whole request's unloaded p50 (run l)")
    for reading in ("bound", "closed"):
        sub.add_parser(reading).add_argument("results", nargs="+", type=Path,
                                             help="JSON files of served runs (bench/results/)")
    sub.add_parser("overlap")
    c = sub.add_parser("client")
    c.add_argument("--rate", type=float, default=64.0)
    f = sub.add_parser("settings", aliases=["face-settings"])  # face-settings: the name of runs n-p
    f.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"),
                   help="a name and the user_config entries it changes (default: face_batch_size 8, then 1)")
    f.add_argument("--paths", nargs="+", choices=("upscale", "faces"), default=["faces"],
                   help="the served paths measured, one after the other")
    f.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "rs-cache",
                   help="weights and compiled kernels")
    f.add_argument("--open-seconds", type=float, default=16.0, help="each turn's open loop")
    f.add_argument("--arrivals", choices=ARRIVALS, default="poisson", help="how the open loop's requests "
                   "are spaced (bench.arrivals)")
    f.add_argument("--out", type=Path, help="also written here, after every turn")
    args = parser.parse_args()
    what = {"queue": queue, "bound": bound, "closed": closed, "overlap": overlap, "client": client,
            "settings": settings, "face-settings": settings}[args.what]
    print(json.dumps(what(args), indent=2))


if __name__ == "__main__":
    main()
