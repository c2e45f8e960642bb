"""An experiment: the cores a device thread keeps busy while the GPU runs its batches.

    python -m bench.gpu_waits [--out FILE.json]      # CUDA; prints JSON

Question: with one CUDA context and more cores than that, CUDA's default is to spin while a
thread waits for the GPU; ``sleep_while_gpu_works`` (``serve_app/deployments/gpu.py``), which
every GPU replica calls at its start, makes those waits sleep. What does each cost in CPU, and
in throughput? Two fresh processes, one with CUDA's default and one with the setting, each run
RealESRGAN_x4plus (random weights, fp16, eager) on 8-bit 256x256 tiles through the engine's own
``forward_timed`` for six seconds at batches of 8 and of 1: batches a second and the process's
CPU time over the wall time.
"""
from __future__ import annotations

import json
import subprocess
import sys

from bench.common import experiment_main

_ONE_SETTING = r"""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
from serve_app.deployments.gpu import gpu_waits, sleep_while_gpu_works
if sys.argv[1] == "sleep":
    sleep_while_gpu_works()  # before the CUDA context, as a replica does
from bench.common import weights_in_use
from serve_app.config import EngineConfig, TileConfig, WeightsConfig
from serve_app.engines.upscaler import load_upscaler
from serve_app.weights import WeightsStore

folder = Path(tempfile.mkdtemp())
weights_in_use(folder, folder / "cache", ["RealESRGAN_x4plus"])
store = WeightsStore(WeightsConfig(folder=folder, cache_dir=folder / "cache", download=False))
engine = load_upscaler("RealESRGAN_x4plus", store, EngineConfig(device="cuda", compile="off",
                       tile=TileConfig(size=256, batch_size=8)))
report = {"gpu_waits": gpu_waits()}
for batch in (8, 1):
    tiles = np.random.default_rng(0).integers(0, 256, (batch, 3, 256, 256), np.uint8)
    for _ in range(3):
        engine.forward_timed(tiles)
    started, cpu_started, batches = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - started < 6:
        engine.forward_timed(tiles)
        batches += 1
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    report[f"batch_{batch}"] = {"batches_per_s": batches / wall, "ms_per_batch": wall / batches * 1e3,
                                "cores": cpu / wall}
print(json.dumps(report))
"""


def measure() -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_waits measures waits for a GPU: it needs CUDA")
    report = {}
    for setting in ("cuda_default", "sleep"):
        done = subprocess.run([sys.executable, "-c", _ONE_SETTING, setting], capture_output=True, text=True,
                              check=True)
        report[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


if __name__ == "__main__":
    experiment_main(measure, __doc__)
