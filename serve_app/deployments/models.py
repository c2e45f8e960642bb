"""Engines by key, loaded once, with a bound, and the reasons some could not load."""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

from serve_app.errors import RestoreError, WeightsUnavailable

log = logging.getLogger("ray.serve")
E = TypeVar("E")


class EngineCache(Generic[E]):
    """Built on first use (so the service starts even when weights are missing), least recently
    used dropped past ``capacity`` (each ``denoise`` value of realesr-general-x4v3 is a network)."""

    def __init__(self, build: Callable[..., E], capacity: int = 8):
        self._build, self._capacity = build, capacity
        self._engines: OrderedDict[tuple, E] = OrderedDict()
        self.failures: dict[str, str] = {}

    def get(self, *key) -> E:
        if key in self._engines:
            self._engines.move_to_end(key)
            return self._engines[key]
        try:
            engine = self._build(*key)
        except RestoreError as exc:
            self.failures[str(key[0])] = exc.detail
            raise WeightsUnavailable(exc.detail) from None
        self.failures.pop(str(key[0]), None)
        self._engines[key] = engine
        if len(self._engines) > self._capacity:
            self._engines.popitem(last=False)
        log.info("loaded %s", key)
        return engine

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

    def clear(self) -> None:
        self._engines.clear()
        self.failures.clear()
