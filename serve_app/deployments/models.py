"""Load engines lazily, once per model, and remember why one could not load."""
from __future__ import annotations

import logging
from typing import Callable, Generic, TypeVar

from serve_app.errors import RestoreError, WeightsUnavailable

log = logging.getLogger(__name__)
E = TypeVar("E")


class EngineCache(Generic[E]):
    """Engines by key, built on first use so the service starts even when weights are missing."""

    def __init__(self, build: Callable[..., E]):
        self._build = build
        self._engines: dict[tuple, E] = {}
        self.failures: dict[str, str] = {}

    def get(self, *key) -> E:
        if key not in self._engines:
            try:
                self._engines[key] = self._build(*key)
            except RestoreError as exc:
                self.failures[str(key[0])] = exc.detail
                raise WeightsUnavailable(exc.detail) from None
            self.failures.pop(str(key[0]), None)
            log.info("loaded %s", key)
        return self._engines[key]
