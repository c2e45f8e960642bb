"""An experiment: a PNG answer deflated in halves on two threads, against one thread.

    python -m bench.png_halves [--out FILE.json]      # any machine; prints JSON

Question: what does a free second thread of a CPU replica take off the encode of a 1024x1024
answer (the face photo at x2, as the served benchmark returns it)? Each way runs the encode on
one thread of a two-thread pool, as the CPU deployment does, with the replicas' heap setting,
and times 50 encodes; the other thread is the helper or stays idle.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bench.common import experiment_main, percentiles, photo
from serve_app.deployments.heap import keep_freed_memory
from serve_app.engines.lanczos import lanczos_upscale
from serve_app.imageio.png import encode_png

ENCODES = 50


def measure() -> dict:
    keep_freed_memory()
    answer = lanczos_upscale(photo(), 2)
    report = {"cpus": os.cpu_count(), "picture": list(answer.shape)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, helper in (("one_thread", None), ("halves_on_two_threads", pool)):
            pool.submit(encode_png, answer, helper=helper).result()  # warm the heap
            times, size = [], 0
            for _ in range(ENCODES):
                started = time.perf_counter()
                size = len(pool.submit(encode_png, answer, helper=helper).result())
                times.append((time.perf_counter() - started) * 1e3)
            report[name] = {**percentiles(times), "bytes": size}
    report["saved_ms_p50"] = report["one_thread"]["p50_ms"] - report["halves_on_two_threads"]["p50_ms"]
    return report


if __name__ == "__main__":
    experiment_main(measure, __doc__)
