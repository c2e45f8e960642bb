"""Batches for a device that does one batch at a time, formed when the device is free.

Why not ``@serve.batch``: in Ray 2.60 it forms a batch as soon as the first item's wait
(``batch_wait_timeout_s``) ends and queues that batch behind the one running. Under load each
batch then holds the few items that arrived in one short wait, and the upscaler ran batches
of one tile under load at half its throughput. Here the next batch is formed only when the previous one is done, so it
takes everything that queued meanwhile (up to ``max_batch_size``) and goes at once; only an
item that finds the device idle waits, at most ``wait_s``, for company.

Items wait by party (a request, or a whole video job) and a batch takes them in turns, one
item from each party with items waiting, the least recently served party first: a still
picture's few tiles go in the next batch beside a video's, rather than behind the hundreds of
tiles the video's frames queued before it.

A batch's work hands each item its result as soon as that result exists (``deliver``): work
done in several device calls, group by group or face by face, lets its first items go while
the device works on the rest, rather than every item waiting for the batch's last.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

T = TypeVar("T")
R = TypeVar("R")
Deliver = Callable[[int, R], None]  # (an item's index in its batch, its result), on the event loop
Abandoned = Callable[[], bool]  # whether every caller of the batch is gone; safe from any thread


class DeviceBatcher(Generic[T, R]):
    """``run_batch(items, deliver, abandoned)`` does one batch's device work and calls
    ``deliver(i, result)`` for every item, each as soon as its result exists; work long enough to
    matter asks ``abandoned()`` and stops once nobody waits for the batch. An item it ends
    without delivering gets an error, and every undelivered item gets the error the batch raised."""

    def __init__(self, run_batch: Callable[[list[T], Deliver, Abandoned], Awaitable[None]], max_batch_size: int,
                 wait_s: float):
        self._run_batch = run_batch
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        # each party's items in arrival order; the party served least recently first
        self._waiting: OrderedDict[Hashable, deque[tuple[T, asyncio.Future]]] = OrderedDict()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None

    async def submit(self, item: T, party: Hashable = None) -> R:
        """The result for ``item``, computed in a batch with whatever else is waiting; ``party``
        (default: the item alone) takes its turns with the other parties'."""
        return (await self.submit_timed(item, party))[0]

    async def submit_timed(self, item: T, party: Hashable = None) -> tuple[R, float, float]:
        """``submit``'s result, with the seconds ``item`` waited for its batch to start and the
        seconds from that start to its result."""
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        submitted = time.perf_counter()
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(object() if party is None else party, deque()).append((item, future))
        self._arrived.set()
        result, started, ended = await future
        return result, started - submitted, ended - started

    async def _serve(self) -> None:
        backlog = False  # whether items queued while the device ran the last batch
        while True:
            batch = await self._next_batch(backlog)
            batch = [(item, future) for item, future in batch if not future.cancelled()]
            if not batch:
                continue
            started, futures = time.perf_counter(), [future for _, future in batch]

            # This batch's futures and start bound now: a delivery scheduled from a device thread
            # must not find the next batch's.
            def deliver(i: int, result: R, futures=futures, started=started) -> None:
                if not futures[i].done():  # a caller may have gone meanwhile
                    futures[i].set_result((result, started, time.perf_counter()))

            def abandoned(futures=futures) -> bool:
                return all(future.done() for future in futures)

            try:
                await self._run_batch([item for item, _ in batch], deliver, abandoned)
                error: Exception = RuntimeError("the device batch ended without this item's result")
            except Exception as exc:  # noqa: BLE001  every caller still waiting gets the error
                error = exc
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            backlog = bool(self._waiting)

    async def _next_batch(self, backlog: bool) -> list[tuple[T, asyncio.Future]]:
        # Items that queued while the device ran the last batch go at once; only an item that
        # found the device idle waits, at most wait_s, for company. Waiting behind a backlog
        # would idle a device that has work, and lengthened the replica's tail when measured.
        await self._wait_for_arrival(None)
        batch = [self._take()]
        deadline = asyncio.get_running_loop().time() + (0.0 if backlog else self.wait_s)
        while len(batch) < self.max_batch_size:
            if self._waiting:
                batch.append(self._take())
            elif not await self._wait_for_arrival(deadline - asyncio.get_running_loop().time()):
                break
        return batch

    def _take(self) -> tuple[T, asyncio.Future]:
        """The oldest item of the party served least recently; that party goes to the back."""
        party, items = next(iter(self._waiting.items()))
        item = items.popleft()
        if items:
            self._waiting.move_to_end(party)
        else:
            del self._waiting[party]
        return item

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        """Whether an item is waiting, after at most ``timeout`` seconds (None: forever)."""
        while not self._waiting:
            if timeout is not None and timeout <= 0:
                return False
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                return bool(self._waiting)
        return True


def group_indices(items: list[T], key: Callable[[T], Hashable]) -> list[list[int]]:
    """Positions of ``items`` grouped by ``key``: the items one device call can take together."""
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())
