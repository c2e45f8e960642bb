"""When an open loop's requests arrive: the load model behind "p99 at 70% of the peak"."""
from __future__ import annotations

import random
from typing import Iterator

ARRIVALS = ("poisson", "even")


def arrival_gaps(rate: float, arrivals: str = "poisson", seed: int = 0) -> Iterator[float]:
    """Endless gaps between one request and the next, at ``rate`` a unit of time on average.

    ``poisson``: exponential gaps, as many independent users send requests; requests bunch, and
    a single queue's tail comes mostly from the bunches. ``even``: every gap ``1 / rate``, as
    constant-rate load tools (wrk2, vegeta) send them; a tail left there is the service's own.
    """
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {ARRIVALS}, not {arrivals!r}")
    rng = random.Random(seed)
    while True:
        yield rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
