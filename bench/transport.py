"""An experiment: what a Serve handle call costs to carry the service's arrays, by Ray's inline limit.

    python -m bench.transport [--out FILE.json]      # CPU only; prints JSON

Question: a request's arrays cross two handle calls on their way through the graph (the
CPU replica sends the upscaler its tiles and gets their outputs back; it sends the face replica
the photo and gets the faces back). Ray passes an argument or a result of up to
``max_direct_call_object_size`` bytes (100 KiB by default) inside the call's own message, and
a larger one through the node's shared-memory object store, which takes a few round trips to
the raylet. Which is faster for the sizes the service sends?

For each limit, a fresh local Ray instance runs a caller deployment that calls a callee
deployment whose method returns at once, with each payload below, one call at a time and eight
at once: the round trip's p50 and p99 as the caller sees it, and the time until the callee had
the call. The callee takes 5 calls at once (Serve's default), so of eight, three wait in turn.
"""
from __future__ import annotations

import json
import subprocess
import sys

from bench.common import experiment_main

# (name, bytes sent, bytes returned)
PAYLOADS = [
    ("nothing", 16, 16),
    ("upscale_tile", 3 * 256 * 256, 3 * 1024 * 1024),  # one 8-bit 256x256 tile, its x4 output
    ("face_photo", 512 * 512 * 3, 512 * 512 * 3),  # a 512x512 photo in, one restored face out
]
LIMITS = {"ray_default": 100 * 1024, "one_mib": 1024 * 1024}
CALLS = 300
IN_FLIGHT = (1, 8)

_ONE_LIMIT = r"""
import asyncio, json, sys, time
import numpy as np
import ray
from ray import serve
from bench.common import percentiles

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Callee:
    async def call(self, payload: np.ndarray, returned: int):
        return time.perf_counter(), np.ones(returned, np.uint8)

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Caller:
    def __init__(self, callee):
        self.callee = callee

    async def measure(self, sent: int, returned: int, calls: int, in_flight: int) -> dict:
        payload, trips, arrivals = np.ones(sent, np.uint8), [], []
        async def one_after_another(n):
            for _ in range(n):
                started = time.perf_counter()
                arrived, _ = await self.callee.call.remote(payload, returned)
                trips.append((time.perf_counter() - started) * 1e3)
                arrivals.append((arrived - started) * 1e3)  # one host: one perf_counter clock
        await one_after_another(20)  # warm-up
        trips.clear(); arrivals.clear()
        await asyncio.gather(*(one_after_another(calls // in_flight) for _ in range(in_flight)))
        return {"round_trip": percentiles(trips), "until_callee_p50_ms": float(np.median(arrivals))}

limit, payloads, calls, in_flight = json.loads(sys.argv[1])
ray.init(_system_config={"max_direct_call_object_size": limit}, include_dashboard=False, log_to_driver=False)
caller = serve.run(Caller.bind(Callee.bind()), name="transport", route_prefix=None)
report = {}
for name, sent, returned in payloads:
    report[name] = {f"in_flight_{n}": caller.measure.remote(sent, returned, calls, n).result() for n in in_flight}
print(json.dumps(report))
"""


def measure() -> dict:
    report = {"payloads": {name: {"sent_bytes": sent, "returned_bytes": returned}
                           for name, sent, returned in PAYLOADS}, "calls": CALLS}
    for name, limit in LIMITS.items():
        # A fresh process each: Ray reads its system configuration once, at its start.
        out = subprocess.run([sys.executable, "-c", _ONE_LIMIT, json.dumps([limit, PAYLOADS, CALLS, IN_FLIGHT])],
                             check=True, capture_output=True, text=True).stdout
        report[name] = {"max_direct_call_object_size": limit, **json.loads(out.strip().splitlines()[-1])}
    return report


if __name__ == "__main__":
    experiment_main(measure, __doc__)
