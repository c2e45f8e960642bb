"""An experiment: face requests whose picture size the service has not seen, served end to end.

    python -m bench.new_sizes [--out FILE.json] [--sizes 8] [--compile off|auto]
                              [--variants shipped cudnn_always]      # meant for CUDA; prints JSON

Question: what does a new picture size cost a whole face request over HTTP, with a shape's
first detector pass skipping cuDNN (the shipped settings) and without (the detector before)?
``bench.detector_shapes`` times the detector alone; this times what a user waits for.

Deploys serve_config.yaml as the served benchmark does, by default with ``compile: off`` so
that it starts in seconds (the detector then keeps no CUDA graphs: a shape's later passes all
go through cuDNN); ``--compile auto`` runs it as shipped, graphs and all. Requests go one at a
time, each photo three times: its first, second and third sight. Two variants on one
deployment, changed through ``user_config`` (which reloads the face engines), in the order
``--variants`` gives: ``shipped``, and ``cudnn_always`` (``face_detect_batch_pixels: 1``: no
pass is small enough to skip cuDNN, and each picture is a pass of its own). Each variant gets
sizes of its own, since cuDNN's plans last as long as the process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench import served
from bench.common import photo, png, weights_in_use
from serve_app.deployments.heap import freeze_heap

VARIANTS = {"shipped": {}, "cudnn_always": {"face_detect_batch_pixels": 1}}
SIGHTS = ("first", "second", "third")


def measure(cache: Path, sizes: int, compile_mode: str, variants: list[str]) -> dict:
    folder = Path(tempfile.mkdtemp())
    weights = weights_in_use(folder, cache, ["RealESRGAN_x4plus", "GFPGANv1.4", "retinaface_resnet50", "parsenet"])
    served.start_ray()
    config = served.bench_config(folder, cache, tile=256, batch=8, compile_mode=compile_mode)
    report: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "cpus": os.cpu_count(), "weights": weights, "compile": compile_mode, "order": variants,
                    "variants": {}}
    _, params = served.path_request("faces")
    for k, name in enumerate(variants):
        changes = VARIANTS[name]
        served.deploy_changed(config, changes, folder)
        freeze_heap()  # the load generator's too: a full collection would count as latency
        asyncio.run(_sights(png(photo()), params))  # warm-up: the 512x512 photo
        # 520, 536, ... for the first variant, 528, 544, ... for the second: no size twice
        sides = [520 + 8 * k + 16 * i for i in range(sizes)]
        served.reset_gpu_stats()
        sights = [asyncio.run(_sights(png(photo(side)), params)) for side in sides]
        report["variants"][name] = {
            "settings": changes, "sizes": sides,
            **{f"{sight}_ms": [s[j] for s in sights] for j, sight in enumerate(SIGHTS)},
            **{f"{sight}_ms_median": float(np.median([s[j] for s in sights])) for j, sight in enumerate(SIGHTS)},
            "face_replica": served.gpu_replica_times("faces")["face_replica"]}
    return report


async def _sights(body: bytes, params: dict) -> list[float]:
    """One photo sent three times, one after the other: each answer's latency in ms."""
    latencies: list[float] = []
    async with served._client() as http:
        for _ in SIGHTS:
            await served._post(http, body, params, latencies)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, default=8, help="new picture sizes per variant")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "rs-cache",
                        help="weights and compiled kernels")
    parser.add_argument("--compile", default="off", choices=["off", "auto"], help="the engines' compile setting")
    parser.add_argument("--variants", nargs=2, default=list(VARIANTS), choices=list(VARIANTS),
                        help="the two variants, in the order they run")
    parser.add_argument("--out", type=Path, help="where to write the JSON report too")
    args = parser.parse_args()
    report = json.dumps(measure(args.cache_dir, args.sizes, args.compile, args.variants), indent=2)
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
