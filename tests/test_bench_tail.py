"""The queue simulation behind the README's tail figures, against queueing theory's exact answers."""
import itertools
import math

import pytest

from bench.arrivals import LOAD, arrival_gaps, highest_load_within_bound
from bench.tail import closed_loop_reading, perfect_device_bound, simulate_queue

TILE_MS, RATE = 10.0, 70.0  # a device 70% busy, one tile at a time


def _md1_wait_cdf(t_ms: float) -> float:
    """P(wait <= t) in an M/D/1 queue (Erlang's formula for a fixed service time)."""
    lam, rho = RATE / 1e3, RATE * TILE_MS / 1e3
    total = sum((-lam * (t_ms - k * TILE_MS)) ** k / math.factorial(k) * math.exp(lam * (t_ms - k * TILE_MS))
                for k in range(int(t_ms // TILE_MS) + 1))
    return (1 - rho) * total


def _md1_p99_ms() -> float:
    low, high = 0.0, 30 * TILE_MS
    while high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (mid, high) if _md1_wait_cdf(mid) < 0.99 else (low, mid)
    return low + TILE_MS  # waited, then served


def test_one_tile_at_a_time_matches_the_exact_m_d_1_queue():
    simulated = simulate_queue(RATE, lambda n: TILE_MS * n, cap=1, wait_ms=0.0)
    rho = RATE * TILE_MS / 1e3
    pollaczek_khinchine_ms = TILE_MS + rho * TILE_MS / (2 * (1 - rho))  # served plus the mean wait
    assert simulated["mean_ms"] == pytest.approx(pollaczek_khinchine_ms, rel=0.03)
    assert simulated["p99_ms"] == pytest.approx(_md1_p99_ms(), rel=0.03)
    assert simulated["mean_batch"] == 1.0


def test_evenly_spaced_arrivals_under_the_device_rate_never_wait():
    # D/D/1 at 70%: each tile is done before the next arrives, whatever the batch cap.
    for cap in (1, 8):
        simulated = simulate_queue(RATE, lambda n: TILE_MS * n, cap=cap, wait_ms=0.0, arrivals="even")
        assert simulated["p99_ms"] == pytest.approx(TILE_MS) and simulated["mean_batch"] == 1.0


def test_arrival_gaps_keep_the_rate_and_differ_only_in_spread():
    even = list(itertools.islice(arrival_gaps(50.0, "even"), 20_000))
    poisson = list(itertools.islice(arrival_gaps(50.0, "poisson"), 20_000))
    assert set(even) == {1 / 50.0}
    assert sum(poisson) / len(poisson) == pytest.approx(1 / 50.0, rel=0.03)
    # exponential gaps: as spread as they are long, and about 1% longer than 4.6 mean gaps
    assert (sum(g * g for g in poisson) / len(poisson) - (1 / 50.0) ** 2) ** 0.5 == pytest.approx(1 / 50.0, rel=0.05)
    assert sum(g > 4.6 / 50.0 for g in poisson) / len(poisson) == pytest.approx(0.01, abs=0.003)
    with pytest.raises(ValueError, match="arrivals must be one of"):
        next(arrival_gaps(50.0, "bursty"))


def test_batches_of_equal_tiles_make_the_tail_longer_on_a_device_with_no_cost_per_batch():
    # Each tile of a batch waits for the whole batch, and nothing is saved by batching.
    one = simulate_queue(RATE, lambda n: TILE_MS * n, cap=1, wait_ms=0.0)
    eight = simulate_queue(RATE, lambda n: TILE_MS * n, cap=8, wait_ms=0.0)
    assert eight["mean_batch"] > 1.2 and eight["p99_ms"] > one["p99_ms"]


def test_the_perfect_device_bound_is_2x_exactly_where_it_says_2x_needs():
    bound = perfect_device_bound(peak_per_s=100.0, unloaded_ms=60.0, inside_ms=18.0)
    assert bound["other_ms"] == 42.0 and bound["tile_ms"] == 10.0
    # The tail in tiles depends on the load only, so the answers solve the equation exactly.
    with_needed_other = perfect_device_bound(100.0, unloaded_ms=bound["other_ms_for_2x"] + 18.0, inside_ms=18.0)
    with_needed_tile = perfect_device_bound(1e3 / bound["tile_ms_for_2x"], unloaded_ms=60.0, inside_ms=18.0)
    for answer in (with_needed_other, with_needed_tile):
        assert answer["p99_over_unloaded_p50"] == pytest.approx(2.0, rel=1e-9)
    assert bound["gpu_step_p99_in_tiles"] == pytest.approx(with_needed_tile["gpu_step_p99_in_tiles"], rel=1e-9)


def test_the_latency_bounded_load_on_a_perfect_device_is_the_highest_tenth_it_passes():
    # A perfect device at run u's peak and other work (104.9 tiles/s, 40.9 ms): 2x lies between
    # 60% of the peak (1.85x) and 70% (2.23x), so the search ends at 60%.
    peak, other_ms = 104.9, 40.9
    probed = []

    def ratio_at(load):
        probed.append(load)
        p99 = simulate_queue(load * peak, lambda n: 1e3 / peak * n, cap=1, wait_ms=0.0)["p99_ms"]
        return (other_ms + p99) / (other_ms + 1e3 / peak)

    load, probes = highest_load_within_bound(ratio_at, ratio_at(LOAD))
    assert probed == [LOAD, 0.4, 0.6] and load == 0.6
    assert probes[0.6] <= 2.0 < probes[LOAD]


@pytest.mark.parametrize("slope, expected, probed", [
    (4.0, 0.5, [0.4, 0.6, 0.5]),  # 2.0 at half the peak holds (the bound is inclusive), 2.4 at 60% does not
    (6.0, 0.3, [0.4, 0.2, 0.3]),
    (15.0, 0.1, [0.4, 0.2, 0.1]),
    (25.0, None, [0.4, 0.2, 0.1]),  # past the bound at every load probed
])
def test_the_latency_bounded_search_bisects_the_tenths_below_70_percent(slope, expected, probed):
    calls = []
    load, probes = highest_load_within_bound(lambda at: calls.append(at) or slope * at, slope * LOAD)
    assert load == expected and calls == probed and set(probes) == {LOAD, *probed}


def test_a_load_that_already_holds_at_70_percent_needs_no_probe():
    assert highest_load_within_bound(lambda at: pytest.fail("probed"), 1.9) == (LOAD, {LOAD: 1.9})


def test_the_closed_loop_reading_takes_the_first_level_that_reaches_70_percent_of_its_peak():
    def level(concurrency, per_s, p50_ms, p99_ms):
        return {"concurrency": concurrency, "images_per_s": per_s, "p50_ms": p50_ms, "p99_ms": p99_ms}

    loop = [level(1, 20.0, 50.0, 60.0), level(4, 60.0, 65.0, 90.0), level(8, 75.0, 100.0, 140.0),
            level(16, 100.0, 160.0, 230.0), level(32, 98.0, 320.0, 400.0)]
    reading = closed_loop_reading(loop)
    # 60/s is under 70% of the best level's 100/s; 75/s is the first at or past it
    first = reading["first_at_load"]
    assert first["concurrency"] == 8 and first["share_of_peak"] == pytest.approx(0.75)
    assert first["p99_over_unloaded_p50"] == pytest.approx(140.0 / 50.0)
    assert [level["share_of_peak"] for level in reading["levels"]] == pytest.approx([0.2, 0.6, 0.75, 1.0, 0.98])
