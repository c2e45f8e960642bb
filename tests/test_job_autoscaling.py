"""The consumers' autoscaling policy, against a real Redis holding real queued jobs: what it asks
Serve for, from the jobs waiting and those taken but not yet acknowledged."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from kombu import Connection
from ray.serve.config import AutoscalingConfig, AutoscalingContext
from ray.serve.task_consumer import instantiate_adapter_from_config

from serve_app.config import JobsConfig
from serve_app.jobs.autoscaling import CONSUMER, POLICY, JobQueuePolicy, with_queue_broker
from serve_app.jobs.broker import LocalBroker
from serve_app.jobs.system import QUEUE, TASK, task_processor_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def broker(tmp_path):
    local = LocalBroker(tmp_path / "broker")
    url = local.start()
    yield url
    local.stop()


def _context(replicas: int, target: float = 8) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=None, deployment_name=CONSUMER, app_name="restore", current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=[], total_num_requests=0, total_queued_requests=0,
        aggregated_metrics={}, raw_metrics=None, capacity_adjusted_min_replicas=0,
        capacity_adjusted_max_replicas=4, policy_state={}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=None,
        config=AutoscalingConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=target))


def _ask(policy: JobQueuePolicy, replicas: int = 1) -> int:
    async def ask():
        policy(_context(replicas))  # starts a count of the queue in a thread
        await policy.task
        return policy(_context(replicas))[0]
    return asyncio.run(ask())


def test_replicas_follow_the_jobs_waiting_and_taken(broker):
    policy = JobQueuePolicy(broker_url=broker, poll_interval_s=0)
    assert _ask(policy, replicas=0) == 0  # no job: no consumer
    queue = instantiate_adapter_from_config(task_processor_config(JobsConfig(broker_url=broker)))
    for i in range(20):
        queue.enqueue_task_sync(TASK, args=[f"job_{i}"])
    assert _ask(policy, replicas=0) == 3  # 20 jobs, 8 a replica
    # A consumer takes 12 (Celery acknowledges a job when it ends): they still count.
    with Connection(broker) as taker:
        inbox = taker.SimpleQueue(QUEUE)
        taken = [inbox.get(timeout=5) for _ in range(12)]
        assert _ask(policy) == 3
        for message in taken[:10]:
            message.ack()
        assert _ask(policy) == 2  # 8 waiting, 2 taken
        # The consumer dies without acknowledging the other two (its connection simply stays
        # open here): Redis keeps them aside until the visibility timeout; they still count.
        inbox.queue.purge()
        assert _ask(policy, replicas=0) == 1


def test_a_broker_that_is_down_leaves_the_last_count():
    down = JobQueuePolicy(broker_url="redis://127.0.0.1:1/0", poll_interval_s=0)
    down.jobs = 9  # the count before the broker went away
    assert _ask(down) == 2


def test_restore_serve_gives_the_policy_the_jobs_broker():
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    consumer = next(d for d in config["applications"][0]["deployments"] if d["name"] == CONSUMER)
    assert consumer["autoscaling_config"]["policy"]["policy_function"] == POLICY
    assert consumer["autoscaling_config"]["min_replicas"] == 0  # none while there is no job
    config["applications"][0]["args"]["jobs"] = {"broker_url": "redis://:secret@10.0.0.5:6379/0"}
    with_queue_broker(config)
    kwargs = consumer["autoscaling_config"]["policy"]["policy_kwargs"]
    assert kwargs["broker_url"] == "redis://:secret@10.0.0.5:6379/0" and kwargs["queue_name"] == "restore-jobs"
