"""Engines by key, loaded once, with a bound, and the reasons some could not load.

A model whose weights cannot be had is known to be missing: a request for it is refused at
once, without rebuilding its network or trying the download again, and the load is retried in
the background, on a thread of its own, every ``retry_interval_s``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

from serve_app.errors import RestoreError, WeightsUnavailable

log = logging.getLogger("ray.serve")
E = TypeVar("E")


class EngineCache(Generic[E]):
    """Built on first use (so the service starts even when weights are missing), least recently
    used dropped past ``capacity`` (each ``denoise`` value of realesr-general-x4v3 is a network)."""

    def __init__(self, build: Callable[..., E], capacity: int = 8, retry_interval_s: float = 60.0):
        self._build, self._capacity, self.retry_interval_s = build, capacity, retry_interval_s
        self._engines: OrderedDict[tuple, E] = OrderedDict()
        self._failed: dict[tuple, tuple[str, float]] = {}  # key -> (why, when it failed)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-load")
        self._retrying: asyncio.Task | None = None
        # Engines built per model: each build compiles where the engines compile, so a setting
        # that rebuilt them behind the user's back would show here.
        self.builds: Counter[str] = Counter()

    @property
    def failures(self) -> dict[str, str]:
        """Model name -> why it is not loaded (for /healthz and stats)."""
        return {str(key[0]): why for key, (why, _) in self._failed.items()}

    def get(self, *key) -> E:
        if key in self._engines:
            self._engines.move_to_end(key)
            return self._engines[key]
        if key in self._failed:  # known missing: the background retry brings it back
            raise _unavailable(key, self._failed[key][0])
        return self._load(key)

    def _load(self, key: tuple) -> E:
        try:
            engine = self._build(*key)
        except RestoreError as exc:
            self._failed[key] = (exc.detail, time.monotonic())
            self._schedule_retries()
            raise _unavailable(key, exc.detail) from None
        self._add(key, engine)
        return engine

    def _add(self, key: tuple, engine: E) -> None:
        self.builds[str(key[0])] += 1
        self._failed.pop(key, None)
        self._engines[key] = engine
        if len(self._engines) > self._capacity:
            self._engines.popitem(last=False)
        log.info("loaded %s", key)

    def any_loaded(self) -> E | None:
        """One of the engines loaded now, if any (to share what all of them hold alike)."""
        return next(iter(self._engines.values()), None)

    def preload(self, keys: list[tuple]) -> None:
        """Load what the service offers now; a failure is recorded for /healthz, not raised."""
        for key in keys:
            try:
                self.get(*key)
            except WeightsUnavailable as exc:
                log.warning("%s not loaded: %s", key[0], exc.detail)

    def _schedule_retries(self) -> None:
        """Start the retry loop on the running event loop, if there is one and it is not running
        yet (a replica's constructor has none: ``start_retries`` starts it from the first call)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._retrying is None or self._retrying.done():
            self._retrying = loop.create_task(self._retry_failed())

    def start_retries(self) -> None:
        if self._failed:
            self._schedule_retries()

    async def _retry_failed(self) -> None:
        loop = asyncio.get_running_loop()
        while self._failed:
            await asyncio.sleep(self.retry_interval_s)
            for key in [k for k, (_, when) in self._failed.items()
                        if time.monotonic() - when >= self.retry_interval_s]:
                try:
                    engine = await loop.run_in_executor(self._loader, self._build, *key)
                except RestoreError as exc:
                    if key in self._failed:  # not cleared by a reconfigure meanwhile
                        self._failed[key] = (exc.detail, time.monotonic())
                    continue
                except Exception as exc:  # noqa: BLE001  a retry must never end the loop
                    log.warning("retrying %s failed: %s", key[0], exc)
                    continue
                if key in self._failed:
                    self._add(key, engine)


def _unavailable(key: tuple, detail: str) -> WeightsUnavailable:
    error = WeightsUnavailable(detail)
    error.model = str(key[0])  # so the ingress can refuse the next request for it before any work
    return error
