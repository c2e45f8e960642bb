"""Per-key rate limits: token buckets on requests and on input pixels.

A bucket holds up to its burst; it fills at its sustained rate and each request takes its cost.
With a Redis URL (the job queue's broker) the buckets live in Redis, so every ingress replica
draws on the same ones, and one Lua script reads, refills and takes atomically on Redis's own
clock (the replicas' clocks never meet). Without one, or while Redis does not answer, each
replica keeps its own buckets: a key then gets its limit once per ingress replica.
"""
from __future__ import annotations

import logging
import math
import time

from serve_app.config import RateLimitConfig
from serve_app.errors import RateLimited, TooManyPixels
from serve_app.metrics import count_rate_limited

log = logging.getLogger("ray.serve")
_PREFIX = "restore-serve:limit:"

# KEYS: the buckets; ARGV: rate, burst, cost of each. Returns the wait (s) before all the costs
# fit, as a string (Lua numbers come back as integers); "0" means they were taken.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local wait, tokens = 0, {}
for i = 1, #KEYS do
  local rate, burst, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'at')
  local held = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  tokens[i] = math.min(burst, held + math.max(0, now - at) * rate)
  if tokens[i] < cost then wait = math.max(wait, (cost - tokens[i]) / rate) end
end
if wait > 0 then return tostring(wait) end
for i = 1, #KEYS do
  local rate, burst, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  redis.call('HSET', KEYS[i], 'tokens', tostring(tokens[i] - cost), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
end
return "0"
"""


class RateLimiter:
    def __init__(self, redis_url: str | None = None):
        self._local: dict[str, tuple[float, float]] = {}  # bucket -> (tokens, at)
        self._script = None
        self._warned = 0.0
        if redis_url:
            import redis.asyncio as redis

            client = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
            self._script = client.register_script(_TAKE)

    @property
    def shared(self) -> bool:
        return self._script is not None

    async def take(self, name: str, limit: RateLimitConfig, *, requests: int = 0, pixels: int = 0) -> None:
        """Take ``requests`` and ``pixels`` from key ``name``'s buckets, or raise RateLimited
        with the wait until they fit (taking nothing)."""
        if pixels > limit.pixel_burst and limit.pixels_per_s:
            raise TooManyPixels(f"this picture's {pixels} pixels exceed API key {name!r}'s pixel burst "
                                f"of {limit.pixel_burst}")
        buckets = [(f"{_PREFIX}{name}:{kind}", rate, burst, cost) for kind, rate, burst, cost in (
            ("requests", limit.requests_per_s, limit.request_burst, requests),
            ("pixels", limit.pixels_per_s, limit.pixel_burst, pixels)) if rate and cost]
        if not buckets:
            return
        wait = None
        if self._script is not None:
            try:
                wait = float(await self._script(keys=[b[0] for b in buckets],
                                                args=[v for b in buckets for v in b[1:]]))
            except Exception as exc:  # noqa: BLE001  Redis is down: this replica's own buckets meanwhile
                if time.monotonic() - self._warned > 60:
                    self._warned = time.monotonic()
                    log.warning("rate limits: Redis does not answer (%s); each ingress replica limits alone", exc)
        if wait is None:
            wait = self._take_here(buckets)
        if wait > 0:
            kinds = " and ".join(b[0].rsplit(":", 1)[1] for b in buckets)
            count_rate_limited(name, kinds)
            raise RateLimited(f"API key {name!r} is past its rate of {kinds}; retry in {math.ceil(wait)} s", wait)

    def _take_here(self, buckets: list[tuple[str, float, int, int]]) -> float:
        now, tokens, wait = time.monotonic(), [], 0.0
        for bucket, rate, burst, cost in buckets:
            held, at = self._local.get(bucket, (float(burst), now))
            tokens.append(min(burst, held + (now - at) * rate))
            if tokens[-1] < cost:
                wait = max(wait, (cost - tokens[-1]) / rate)
        if wait == 0:
            for (bucket, _, _, cost), held in zip(buckets, tokens):
                self._local[bucket] = (held - cost, now)
        return wait
