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
    """The highest tenth of the peak, up to ``LOAD``, at which ``ratio_at(load)`` (a p99 over the
    unloaded p50, measured) stays within ``TAIL_BOUND``, or None if not even 10% does; and the
    probes, by load.

    ``ratio_at_load`` is the ratio already measured at ``LOAD``. Since a queue's tail grows with
    its load, a bisection over 10-60% settles it in three probes at most, starting at 40%. This
    is the rate one GPU can be offered when the bound must hold with random arrivals, as
    capacity planning (and MLPerf's server scenario, with an absolute bound) takes it.
    """
    probes = {LOAD: ratio_at_load}
    if ratio_at_load <= TAIL_BOUND:
        return LOAD, probes
    loads = [tenth / 10 for tenth in range(1, round(LOAD * 10))]
    held, failed = -1, len(loads)  # indices into loads: the highest known to hold, the lowest known not to
    while failed - held > 1:
        mid = (held + failed + 1) // 2
        probes[loads[mid]] = ratio_at(loads[mid])
        held, failed = (mid, failed) if probes[loads[mid]] <= TAIL_BOUND else (held, mid)
    return (loads[held] if held >= 0 else None), probes
