"""The service's own Prometheus metrics, through Ray's metrics API.

Each node's metrics agent exports them beside Ray's ``ray_serve_*`` families, with the
``ray_`` prefix Ray gives every application metric, and Serve adds ``deployment``, ``replica``
and ``application`` tags to those recorded in a replica. A metric is made the first time a
process records it, so that importing this module needs no Ray.
"""
from __future__ import annotations

import functools

# Latencies from a millisecond (a refusal) to two minutes (a large face photo on a CPU)
SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


@functools.cache
def _metric(kind: str, name: str, description: str, tags: tuple[str, ...], boundaries: tuple | None = None):
    from ray.serve import metrics

    if kind == "histogram":
        return metrics.Histogram(name, description, boundaries=list(boundaries), tag_keys=tags)
    return getattr(metrics, kind.capitalize())(name, description, tag_keys=tags)


def count_request(route: str, status: int, model: str) -> None:
    _metric("counter", "restore_requests", "HTTP requests answered by the ingress, by route, status and "
            "model (the upscaler asked for; 'none' for faces only, '' where there is none)",
            ("route", "status", "model")).inc(tags={"route": route, "status": str(status), "model": model})


def count_rate_limited(key: str, bucket: str) -> None:
    _metric("counter", "restore_rate_limited", "Requests refused 429 for an API key's rate, by key and bucket",
            ("key", "bucket")).inc(tags={"key": key, "bucket": bucket})


def observe_steps(timings_ms: dict[str, float], faces: int) -> None:
    """A finished picture's CPU-side steps (decode, tiles, stitch, canvas, paste, encode and the
    whole restore between decode and encode), and its faces."""
    steps = _metric("histogram", "restore_step_seconds", "Time of each step of a picture in the CPU "
                    "replicas", ("step",), tuple(SECONDS))
    for step, ms in timings_ms.items():
        steps.observe(ms / 1e3, tags={"step": step})
    if faces:
        _metric("counter", "restore_faces", "Faces restored", ()).inc(faces)


def observe_gpu_steps(stage: str, steps_ms: dict[str, float]) -> None:
    """A request's time in a GPU replica: its waits for a batch and its batches."""
    histogram = _metric("histogram", "restore_gpu_step_seconds", "Time of a request in a GPU replica, "
                        "by stage (upscaler, faces) and step (waits for a batch, batches)",
                        ("stage", "step"), tuple(SECONDS))
    for step, ms in steps_ms.items():
        histogram.observe(ms / 1e3, tags={"stage": stage, "step": step})


def observe_batch(stage: str, size: int) -> None:
    _metric("histogram", "restore_batch_size", "Items in one device batch: tiles (upscale), pictures "
            "(detect) or faces (restore)", ("stage",), tuple(SIZES)).observe(size, tags={"stage": stage})


def set_gpu_memory(allocated: int, cap: int) -> None:
    gauge = _metric("gauge", "restore_gpu_memory_bytes", "A GPU replica's CUDA memory allocated now, "
                    "and its cap (0 and 0 on a CPU)", ("kind",))
    gauge.set(allocated, tags={"kind": "allocated"})
    gauge.set(cap, tags={"kind": "cap"})


def count_job(state: str) -> None:
    _metric("counter", "restore_jobs", "Jobs by the state they reached: queued, succeeded, failed, "
            "canceled", ("state",)).inc(tags={"state": state})


def set_queue_depth(waiting: int, taken: int) -> None:
    """The job queue as the consumers' autoscaling policy reads it (in Serve's controller)."""
    gauge = _metric("gauge", "restore_job_queue", "Jobs in the queue: waiting for a consumer, or taken "
                    "and not yet acknowledged", ("state",))
    gauge.set(waiting, tags={"state": "waiting"})
    gauge.set(taken, tags={"state": "taken"})
