"""What the ingress and the job consumers share: the records, the objects, the URL policy, the
queue's configuration and the job's public view."""
from __future__ import annotations

import secrets
from datetime import datetime
from pathlib import Path

from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig

from serve_app.config import JobsConfig
from serve_app.jobs.objects import FolderStore, ObjectStore, S3Store
from serve_app.jobs.records import JobRecord, JobRecords
from serve_app.jobs.urls import UrlPolicy

QUEUE = "restore-jobs"
TASK = "restore"
CONSUMER = "JobConsumer"  # the consumers' deployment


def task_processor_config(config: JobsConfig) -> TaskProcessorConfig:
    """Ray Serve's asynchronous-inference settings for the job queue (Celery on Redis).

    Celery acknowledges a job once its handler returns (``task_acks_late``, set by Ray's
    adapter), so a consumer killed mid-job leaves it unacknowledged, and Redis hands it out
    again after ``visibility_timeout_s``."""
    broker = config.broker_url
    if broker is None:
        raise ValueError("jobs.broker_url is unset: restore-serve fills it in with its own broker")
    return TaskProcessorConfig(
        queue_name=QUEUE, max_retries=config.max_retries,  # the handler raises only passing failures
        adapter_config=CeleryAdapterConfig(
            broker_url=broker, backend_url=broker,
            # kombu looks for jobs past their visibility timeout only every 10th pass by default,
            # about 100 s apart: every pass (about 10 s) hands a dead consumer's job out sooner.
            broker_transport_options={"visibility_timeout": config.visibility_timeout_s,
                                      "unacked_restore_throttle": 1},
            app_custom_config={
                "broker_connection_timeout": 3, "broker_connection_retry_on_startup": True,
                "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.4},
                "result_expires": int(config.retention_s), "worker_prefetch_multiplier": 1,
                "worker_hijack_root_logger": False, "worker_redirect_stdouts": False,
            }))


def webhook_secret(config: JobsConfig) -> str:
    """The configured secret, or one made once and kept in data_dir (readable by its owner only)."""
    if config.webhook_secret:
        return config.webhook_secret
    path = config.resolved_data_dir() / "webhook_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    return path.read_text().strip()


class JobSystem:
    def __init__(self, config: JobsConfig):
        self.config = config
        self.records = JobRecords(config.resolved_database_url(), retention_s=config.retention_s)
        self.objects: ObjectStore = (
            S3Store(config.s3_bucket, prefix=config.s3_prefix, endpoint_url=config.s3_endpoint_url,
                    region=config.s3_region)
            if config.s3_bucket else FolderStore(Path(config.resolved_data_dir()) / "objects"))
        self.urls = UrlPolicy(config.urls)

    def sweep(self, at: datetime | None = None) -> int:
        """Remove the jobs past their retention at ``at`` (default now): their inputs and results
        first, then their records, so an object is never left without the record that names it.
        Returns how many jobs went."""
        expired = self.records.expired(at)
        self.objects.delete([key for job in expired for key in (job.input_key, (job.output or {}).get("key")) if key])
        return self.records.delete([job.id for job in expired])

    def view(self, job: JobRecord) -> dict:
        """The job as the API shows it; its links are paths on the service."""
        link = f"/v1/jobs/{job.id}"
        view = {"id": job.id, "status": job.status, "created_at": _iso(job.created_at),
                "started_at": _iso(job.started_at), "completed_at": _iso(job.completed_at),
                "updated_at": _iso(job.updated_at), "expires_at": _iso(job.expires_at),
                "options": job.options, "image_url": job.image_url, "webhook": job.webhook,
                "metrics": _metrics(job), "progress": job.progress, "output": None, "error": job.error,
                "urls": {"get": link, "cancel": f"{link}/cancel", "result": f"{link}/result"}}
        if job.output is not None:
            view["output"] = {k: v for k, v in job.output.items() if k != "key"}  # the storage key stays inside
            view["output"]["url"] = f"{link}/result"
        return view


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat().replace("+00:00", "Z")


def _metrics(job: JobRecord) -> dict:
    queued = (job.started_at or job.completed_at or job.updated_at) - job.created_at if job.status != "queued" else None
    taken = job.completed_at - job.started_at if job.completed_at and job.started_at else None
    return {"queued_s": None if queued is None else round(queued.total_seconds(), 3),
            "run_s": None if taken is None else round(taken.total_seconds(), 3),
            "attempts": job.attempt}  # deliveries: more than one after a consumer was lost
