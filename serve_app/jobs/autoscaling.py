"""How many job consumers run: enough for the jobs in the queue, waiting or taken.

serve_config.yaml names ``JobQueuePolicy`` in ``JobConsumer``'s ``autoscaling_config.policy``.
It runs in Serve's controller and reads the broker itself, so consumers scale to zero and
back. Ray's own ``AsyncInferenceAutoscalingPolicy`` counts only the messages waiting in the
queue's list. A job a consumer has taken leaves that list for Celery's ``unacked`` hash until it
is acknowledged; on the list alone, a burst's last jobs would have their replica scaled away
under them, and a job whose replica died (restored to the list by a *running* consumer after
the visibility timeout) would wait forever once none runs. So the policy counts both.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import redis
from ray.serve.config import AutoscalingContext

from serve_app.jobs.system import CONSUMER, QUEUE
from serve_app.metrics import set_queue_depth

log = logging.getLogger("ray.serve")
POLICY = f"{__name__}:JobQueuePolicy"
UNACKED = "unacked"  # kombu's Redis transport: delivered, not yet acknowledged


class JobQueuePolicy:
    """Replicas = jobs (queued, running or orphaned) / ``target_ongoing_requests``, rounded up;
    none when there is no job. Serve applies the deployment's bounds and delays to the answer."""

    def __init__(self, broker_url: str, queue_name: str = QUEUE, poll_interval_s: float = 2.0):
        self.queue_name, self.poll_interval_s = queue_name, poll_interval_s
        self.redis = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        self.jobs, self.task, self.polled_at = 0, None, -math.inf

    def _count(self) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                waiting, taken = pipe.llen(self.queue_name).hlen(UNACKED).execute()
            self.jobs = waiting + taken
            set_queue_depth(waiting, taken)
        except redis.RedisError as exc:  # the last count stands until the broker answers
            log.warning("could not count the jobs in the queue: %s", exc)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        # Called from the controller's event loop: Redis is read in a thread, at most one poll
        # at a time, and the answer uses the latest count.
        if (self.task is None or self.task.done()) and time.monotonic() - self.polled_at >= self.poll_interval_s:
            self.polled_at = time.monotonic()
            self.task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._count))
        replicas = math.ceil(self.jobs / ctx.config.get_target_ongoing_requests() - 1e-9)
        return replicas, {"jobs": self.jobs}


def with_queue_broker(config: dict) -> dict:
    """serve_config.yaml with ``args.jobs.broker_url`` also given to the consumers' policy, where
    its ``policy_kwargs`` name no broker: one URL, written once, serves both. Changes ``config``."""
    app = config["applications"][0]
    url = app.get("args", {}).get("jobs", {}).get("broker_url")
    for deployment in app.get("deployments", []):
        policy = (deployment.get("autoscaling_config") or {}).get("policy") or {}
        if deployment.get("name") == CONSUMER and policy.get("policy_function") == POLICY and url:
            policy.setdefault("policy_kwargs", {}).setdefault("broker_url", url)
    return config
