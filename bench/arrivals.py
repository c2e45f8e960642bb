"""When an open loop's requests arrive: the load model behind "p99 at 70% of the peak"."""
from __future__ import annotations

import random
from typing import Callable, Iterator

ARRIVALS = ("poisson", "even")
LOAD = 0.7        # the load, a fraction of the closed loop's peak
TAIL_BOUND = 2.0  # the bound on the p99 under that load, over the unloaded p50


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


def highest_load_within_bound(ratio_at: Callable[[float], float], ratio_at_load: float) -> tuple[float | None, dict]:
    """The highest of 40, 50, 60 and 70% of the peak at which ``ratio_at(load)`` (a p99 over the
    unloaded p50, measured) stays within ``TAIL_BOUND``, or None if none does; and the probes.

    ``ratio_at_load`` is the ratio already measured at ``LOAD``. Since a queue's tail grows with
    its load, two probes settle it: 50%, then 60% if that held or 40% if not. This is the rate
    one GPU can be offered when the bound must hold with random arrivals, as capacity planning
    (and MLPerf's server scenario, with an absolute bound) takes it.
    """
    probes = {LOAD: ratio_at_load}
    if ratio_at_load <= TAIL_BOUND:
        return LOAD, probes
    load = 0.5
    for _ in range(2):
        probes[load] = ratio_at(load)
        load = round(load + (0.1 if probes[load] <= TAIL_BOUND else -0.1), 1)
    held = [load for load, ratio in probes.items() if ratio <= TAIL_BOUND]
    return (max(held) if held else None), probes
