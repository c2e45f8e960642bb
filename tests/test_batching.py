"""DeviceBatcher: batches form while the device is busy; errors and cancellations stay contained."""
import asyncio
import gc
import threading
import weakref

import numpy as np
import pytest
import torch

from serve_app.deployments.batching import DeviceBatcher, group_indices
from serve_app.deployments.faces import _by_pixels
from serve_app.deployments.gpu import StepTimes, cap_gpu_memory, gpu_memory, timed_call
from serve_app.deployments.heap import freeze_heap
from serve_app.deployments.threads import Workers


def _device(sizes, seconds=0.05, fail_on=None):
    async def run(items, deliver, abandoned):
        sizes.append(len(items))
        await asyncio.sleep(seconds)  # the forward pass; the event loop stays free meanwhile
        if fail_on is not None and fail_on in items:
            raise ValueError("bad tile")
        for i, item in enumerate(items):
            deliver(i, item * 10)
    return run


def test_items_arriving_during_a_batch_form_the_next_full_batch():
    sizes = []

    async def main():
        batcher = DeviceBatcher(_device(sizes), max_batch_size=4, wait_s=0.005)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.02)  # the first batch (one item) is on the device now
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 10)]
        return await asyncio.gather(first, *rest)

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    # @serve.batch (Ray 2.60) would have formed the later ones 5 ms apart: batches of one.
    assert sizes == [1, 4, 4, 1]


def test_a_lone_item_waits_at_most_the_wait():
    sizes = []

    async def main():
        batcher = DeviceBatcher(_device(sizes, seconds=0), max_batch_size=8, wait_s=0.01)
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await batcher.submit(3)
        return result, loop.time() - start

    result, elapsed = asyncio.run(main())
    assert result == 30 and sizes == [1] and elapsed < 1.0  # bounded by wait_s, not by a full batch


def test_items_queued_behind_a_batch_go_at_once_without_waiting_for_company():
    sizes = []

    async def main():
        # A wait far longer than the device's 50 ms: any wait for company would show.
        batcher = DeviceBatcher(_device(sizes), max_batch_size=4, wait_s=5.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]  # full: no wait
        await asyncio.sleep(0.02)
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (4, 5)]  # behind the first batch
        results = await asyncio.gather(*first, *queued)
        return results, loop.time() - start

    results, elapsed = asyncio.run(main())
    assert results == [i * 10 for i in range(6)] and sizes == [4, 2]
    assert elapsed < 2.5  # two 50 ms batches; waiting for company would take 5 s


def test_parties_take_turns_so_a_late_small_request_does_not_wait_behind_a_large_one():
    batches = []

    async def device(items, deliver, abandoned):
        batches.append(list(items))
        await asyncio.sleep(0.02)
        for i, item in enumerate(items):
            deliver(i, item)

    async def main():
        batcher = DeviceBatcher(device, max_batch_size=4, wait_s=0.005)
        # a video's frames: 24 tiles of one party, queued first
        video = [asyncio.ensure_future(batcher.submit(f"v{i}", "job_1")) for i in range(24)]
        await asyncio.sleep(0.01)  # its first batch is on the device
        # then a still picture of three tiles and another of one, each a party of its own
        still = object()
        stills = [asyncio.ensure_future(batcher.submit(f"s{i}", still)) for i in range(3)]
        single = asyncio.ensure_future(batcher.submit("t0"))
        await asyncio.gather(*stills, single, *video)

    asyncio.run(main())
    # one item from each waiting party in turn: both pictures done in the two batches after the
    # first, not after the video's 24 tiles (first in, first out would have put them in the seventh)
    assert batches[0] == ["v0", "v1", "v2", "v3"]
    assert batches[1] == ["v4", "s0", "t0", "v5"] and batches[2] == ["s1", "v6", "s2", "v7"]
    assert [item for batch in batches[3:] for item in batch] == [f"v{i}" for i in range(8, 24)]


def test_a_failing_batch_fails_its_callers_only_and_cancelled_callers_are_skipped():
    sizes = []

    async def main():
        batcher = DeviceBatcher(_device(sizes, fail_on=2), max_batch_size=2, wait_s=0.005)
        failing = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        results = await asyncio.gather(*failing, return_exceptions=True)
        cancelled = asyncio.ensure_future(batcher.submit(5))
        kept = asyncio.ensure_future(batcher.submit(6))
        await asyncio.sleep(0)
        cancelled.cancel()
        return results, await kept

    (errors, kept) = asyncio.run(main())
    assert all(isinstance(e, ValueError) for e in errors) and kept == 60
    assert sizes == [2, 1]  # the cancelled item never reached the device


def test_step_times_and_memory_helpers_off_cuda():
    times = StepTimes("upscaler", window=3)
    assert times.summary() == {"requests": 0}
    for served in (11.0, 12.0, 13.0, 50.0):  # the window keeps the last three
        times.add(queued=1.0, served=served)
    summary = times.summary()
    assert summary["requests"] == 3 and summary["served_ms_p50"] == 13.0 and summary["queued_ms_p99"] == 1.0
    assert summary["served_ms_p99"] == pytest.approx(13 + 0.98 * (50 - 13))  # numpy's linear percentile
    assert times.total("served") == 12 + 13 + 50
    times.clear()
    assert times.summary() == {"requests": 0}
    assert cap_gpu_memory(torch.device("cpu"), 0.5) is None and gpu_memory(torch.device("cpu"), None) == {}


def test_a_timed_call_returns_the_result_and_the_time_on_its_own_thread():
    def work(x):
        threading.Event().wait(0.02)
        return x * 2, threading.get_ident()

    async def main():
        workers = Workers()
        return await workers.device(timed_call, work, 21)

    (result, thread), ms = asyncio.run(main())
    assert result == 42 and thread != threading.get_ident()  # run on the device lane
    assert 20 <= ms < 1000


def test_a_batched_item_is_told_how_long_it_waited_and_how_long_its_batch_took():
    async def main():
        started = []
        batcher = DeviceBatcher(_device(started, seconds=0.05), max_batch_size=4, wait_s=0.005)
        first = asyncio.ensure_future(batcher.submit_timed(1))
        while not started:  # until the first batch is on the device (a fixed sleep races a busy machine)
            await asyncio.sleep(0.001)
        second = await batcher.submit_timed(2)  # waits for it, then runs in the next
        return await first, second

    (first, waited_1, ran_1), (second, waited_2, ran_2) = asyncio.run(main())
    assert (first, second) == (10, 20)
    assert waited_1 < 0.04 <= waited_2  # at most the wait for company, then the whole first batch
    assert ran_1 >= 0.05 and ran_2 >= 0.05


def test_an_item_delivered_early_does_not_wait_for_the_rest_of_its_batch():
    async def main():
        rest_may_go = asyncio.Event()

        async def face_by_face(items, deliver, abandoned):
            deliver(0, items[0] * 10)  # the first face is done; the others are still on the device
            await rest_may_go.wait()
            for i in range(1, len(items)):
                deliver(i, items[i] * 10)

        batcher = DeviceBatcher(face_by_face, max_batch_size=4, wait_s=0.005)
        items = [asyncio.ensure_future(batcher.submit_timed(i)) for i in (1, 2, 3)]
        early, _, took_early = await items[0]  # returns while the batch still runs
        assert not any(item.done() for item in items[1:])
        await asyncio.sleep(0.05)
        rest_may_go.set()
        rest = await asyncio.gather(*items[1:])
        return early, took_early, rest

    early, took_early, rest = asyncio.run(main())
    assert early == 10 and [r for r, _, _ in rest] == [20, 30]
    assert all(took >= 0.05 > took_early for _, _, took in rest)  # each told the time until its own result


def test_an_item_its_batch_never_delivered_gets_an_error_and_the_next_batch_runs():
    async def main():
        async def forgets_the_second(items, deliver, abandoned):
            deliver(0, items[0] * 10)

        batcher = DeviceBatcher(forgets_the_second, max_batch_size=2, wait_s=0.005)
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        return results, await batcher.submit(3)

    (first, second), third = asyncio.run(main())
    assert first == 10 and isinstance(second, RuntimeError) and "without this item's result" in str(second)
    assert third == 30


def test_groups_keep_order_and_detector_runs_keep_within_their_pixels():
    assert group_indices(["a1", "b1", "a2", "c1", "b2"], key=lambda s: s[0]) == [[0, 2], [1, 4], [3]]
    pictures = [np.zeros((h, 100), np.uint8) for h in (10, 20, 30, 50, 5)]
    # budget 3,000 pixels: 1,000 + 2,000 | 3,000 | 5,000 alone though over | 500
    assert _by_pixels([7, 8, 9, 10, 11], pictures, 3000) == [[7, 8], [9], [10], [11]]


def test_device_lanes_are_persistent_threads_that_run_side_by_side():
    workers = Workers(device_lanes=2)
    both_in = threading.Barrier(2, timeout=5)  # passes only when both lanes run at once

    def where():
        both_in.wait()
        stream = torch.cuda.current_stream() if torch.cuda.is_available() else None
        return threading.get_ident(), stream

    async def main():
        first = await asyncio.gather(workers.device(where, lane=0), workers.device(where, lane=1))
        again = await asyncio.gather(workers.device(where, lane=0), workers.device(where, lane=1))
        return first, again

    (lane0, lane1), (lane0_again, lane1_again) = asyncio.run(main())
    assert lane0[0] != lane1[0] and (lane0[0], lane1[0]) == (lane0_again[0], lane1_again[0])
    if torch.cuda.is_available():  # each lane on a CUDA stream of its own, not the default one
        assert lane0[1] != lane1[1] and torch.cuda.default_stream() not in (lane0[1], lane1[1])


def test_freezing_the_heap_hides_start_up_objects_from_the_collector_but_still_collects_new_garbage():
    class Node:
        pass

    try:
        freeze_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # the test process's imports: torch, numpy, Ray
        node = Node()
        node.self = node  # a cycle only the collector frees
        gone = weakref.ref(node)
        del node
        gc.collect()
        assert gone() is None and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_a_batch_learns_when_every_caller_is_gone():
    seen = []

    async def main():
        started, release = asyncio.Event(), asyncio.Event()

        async def run(items, deliver, abandoned):
            seen.append(abandoned())
            started.set()
            await release.wait()
            seen.append(abandoned())  # the device work asks between its steps

        batcher = DeviceBatcher(run, max_batch_size=4, wait_s=0)
        callers = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
        await started.wait()
        for caller in callers:
            caller.cancel()
        await asyncio.sleep(0)
        release.set()
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert seen == [False, True]
