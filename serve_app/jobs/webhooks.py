"""Webhooks: a signed POST when a job ends (or starts), retried with backoff for a bounded time.

Signatures follow the Standard Webhooks scheme (https://www.standardwebhooks.com/), as
Replicate's do: headers ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``
(``v1,`` then the base64 HMAC-SHA256, under the configured secret, of
``"{id}.{timestamp}.{body}"``), so a receiver can check the sender and refuse replays.
Deliveries run on threads of their own: a slow or dead receiver never holds up a job, its
cancellation or the queue.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from serve_app.errors import UrlRefused
from serve_app.jobs.urls import UrlPolicy

log = logging.getLogger("ray.serve")


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, message_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {"content-type": "application/json", "webhook-id": message_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, message_id, timestamp, body)}


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300) -> bool:
    """What a receiver runs: the signature matches and the timestamp is recent."""
    try:
        timestamp = int(headers["webhook-timestamp"])
        expected = signature(secret, headers["webhook-id"], timestamp, body)
    except (KeyError, ValueError):
        return False
    offered = headers.get("webhook-signature", "").split()
    return abs(time.time() - timestamp) <= tolerance_s and any(hmac.compare_digest(expected, s) for s in offered)


class Webhooks:
    """Delivers events in the background, each retried until a 2xx answer or ``give_up_s``."""

    def __init__(self, policy: UrlPolicy, secret: str, *, give_up_s: float = 600.0, first_wait_s: float = 1.0,
                 max_wait_s: float = 60.0, threads: int = 4):
        self.policy, self.secret = policy, secret
        self.give_up_s, self.first_wait_s, self.max_wait_s = give_up_s, first_wait_s, max_wait_s
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="webhook")
        self.stopping = threading.Event()

    def send(self, url: str, event: str, job: dict) -> Future:
        """Queue one delivery of ``{"type": event, "data": job}``; the future says whether it landed."""
        body = json.dumps({"type": event, "data": job}, separators=(",", ":"), sort_keys=True).encode()
        message_id = f"msg_{job['id']}_{event}"  # the same on every retry: receivers can drop repeats
        return self.pool.submit(self._deliver, url, message_id, body)

    def _deliver(self, url: str, message_id: str, body: bytes) -> bool:
        give_up, wait, attempt = time.monotonic() + self.give_up_s, self.first_wait_s, 0
        while not self.stopping.is_set():
            attempt += 1
            try:
                answer = self.policy.post(url, body, signed_headers(self.secret, message_id, body))
                if 200 <= answer.status_code < 300:
                    return True
                why = f"HTTP {answer.status_code}"
            except UrlRefused as exc:  # the URL will not become acceptable: no retry
                log.warning("webhook %s refused: %s", message_id, exc.detail)
                return False
            except Exception as exc:  # noqa: BLE001  any failure to deliver is retried
                why = getattr(exc, "detail", str(exc))
            if time.monotonic() + wait > give_up:
                log.warning("webhook %s gave up after %d attempts: %s", message_id, attempt, why)
                return False
            log.info("webhook %s attempt %d failed (%s); again in %.0f s", message_id, attempt, why, wait)
            self.stopping.wait(wait)
            wait = min(wait * 2, self.max_wait_s)
        return False

    def close(self) -> None:
        self.stopping.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
