"""The job consumers: a Ray Serve task consumer (Celery on Redis) that runs each queued job
through the same CPU deployment as /v1/restore, so jobs share its engines, limits and errors.

A delivery is processed at least once; its record changes exactly once (``JobRecords``):
- a redelivered job that already ended is acknowledged and dropped;
- an error in the input (the synchronous path's 4xx: an SVG, a pixel bomb, a refused URL)
  fails the job at once, never retried;
- a graph at capacity (``overloaded``) makes the job wait and try again within the delivery;
- a passing failure (a lost replica, lasting overload, a timeout) is retried by raising, up to
  ``max_retries`` (Celery waits 1, 2, 4... s between), then fails the job with its code;
- a job cancelled while it runs is abandoned: its work downstream is cancelled and whatever it
  produced is discarded.
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.task_consumer import task_consumer, task_handler

from serve_app.api import RestoreOptions
from serve_app.config import AppArgs, RuntimeConfig
from serve_app.deployments.failures import typed_error
from serve_app.errors import (
    CorruptImage, NotAnImage, Overloaded, ReplicaLost, RequestTimeout, RestoreError, TooManyBytes,
    WeightsUnavailable,
)
from serve_app.imageio import CONTENT_TYPES, probe
from serve_app.jobs.system import CONSUMER, TASK, JobSystem, task_processor_config, webhook_secret
from serve_app.jobs.webhooks import Webhooks
from serve_app.metrics import count_job
from serve_app.video.options import split_video_options
from serve_app.video.pipeline import OnFrames, Progress, Segment, VideoOutput, restore_video
from serve_app.video.probe import HEAD_BYTES, check_output, looks_like_video, probe_video

log = logging.getLogger("ray.serve")
PASSING = (Overloaded, ReplicaLost, RequestTimeout, WeightsUnavailable)  # may succeed if tried again


class Canceled(Exception):
    pass


class JobConsumer:
    def __init__(self, args: AppArgs, preprocess: DeploymentHandle):
        self.args, self.preprocess, self.runtime = args, preprocess, RuntimeConfig()
        self.jobs = JobSystem(args.jobs)
        self.webhooks = Webhooks(self.jobs.urls, webhook_secret(args.jobs), give_up_s=args.jobs.webhook_give_up_s)
        self.stop = threading.Event()
        threading.Thread(target=self._sweep, name="job-sweeper", daemon=True).start()

    def reconfigure(self, user_config: dict) -> None:
        self.runtime = RuntimeConfig.model_validate(user_config)

    @task_handler(name=TASK)
    def restore(self, job_id: str) -> str:
        records = self.jobs.records
        attempt = records.start(job_id)
        if attempt is None:
            return "ended"  # a redelivery of a job that ended, or a cancelled one
        job = records.get(job_id)
        log.info("job %s attempt %d started", job_id, attempt)
        try:
            key, output = self._run(job, attempt)
        except Canceled:
            log.info("job %s cancelled while it ran", job_id)
            count_job("canceled")
            return "canceled"
        except Exception as exc:  # noqa: BLE001  every failure is recorded or retried
            error = typed_error(exc)
            if not isinstance(error, RestoreError):
                error = ReplicaLost(f"the job failed unexpectedly: {type(exc).__name__}: {exc}")
            if isinstance(error, PASSING) and attempt <= self.args.jobs.max_retries:
                log.warning("job %s attempt %d failed (%s), retried", job_id, attempt, error.code)
                raise  # unacknowledged: Celery hands it out again
            if records.fail(job_id, attempt, error.code, error.detail):
                log.info("job %s failed: %s", job_id, error.code)
                count_job("failed")
                self._notify(job_id, "failed")
            return "failed"
        if not records.succeed(job_id, attempt, output):
            self.jobs.objects.delete([key])  # cancelled at the last moment, or taken over
            return "discarded"
        log.info("job %s succeeded", job_id)
        count_job("succeeded")
        self._notify(job_id, "succeeded")
        return "succeeded"

    def _run(self, job, attempt: int) -> tuple[str, dict]:
        with tempfile.TemporaryDirectory(prefix=f"{job.id}-") as work:
            source = Path(work) / "input"
            self._fetch(job, source)
            with source.open("rb") as f:
                is_video = looks_like_video(f.read(HEAD_BYTES))
            values, video = split_video_options(job.options)
            options = RestoreOptions.model_validate(values)
            if is_video:
                return self._run_video(job, attempt, source, Path(work), options, VideoOutput(**video))
            if source.stat().st_size > self.runtime.limits.max_bytes:
                raise TooManyBytes(f"the image is {source.stat().st_size} bytes; the limit is "
                                   f"{self.runtime.limits.max_bytes}")
            return self._run_image(job, source.read_bytes(), options)

    def _fetch(self, job, target: Path) -> None:
        """The job's input into ``target``: a picture up to ``max_bytes``, a video up to ``max_video_bytes``."""
        limits = self.runtime.limits
        if job.input_key is not None:
            self.jobs.objects.get_file(job.input_key, target)
            return

        def check_head(head: bytes) -> int | None:  # a pixel bomb or an SVG stops the download
            if looks_like_video(head):
                return None  # its header is read whole once it is here
            try:
                probe(head, max_bytes=len(head), max_pixels=limits.max_pixels)
            except (CorruptImage, NotAnImage):
                pass  # a header longer than what came so far: the whole decode decides
            return limits.max_bytes  # a picture stops at the picture limit, not the video one
        with target.open("wb") as f:
            self.jobs.urls.fetch_to(job.image_url, f, max_bytes=max(limits.max_bytes, limits.max_video_bytes),
                                    check_head=check_head)

    def _run_image(self, job, data: bytes, options: RestoreOptions) -> tuple[str, dict]:
        # A graph at capacity makes a job wait, not fail: it is tried again after the Retry-After
        # the graph gave, for up to half the visibility timeout (past that Redis would hand the
        # job to another consumer), before the attempt counts as failed.
        waits_until = time.monotonic() + self.args.jobs.visibility_timeout_s / 2
        while True:
            try:
                encoded = self._restore(job.id, data, options)
                break
            except Canceled:
                raise
            except Exception as exc:  # noqa: BLE001  anything but overload goes up
                error = typed_error(exc)
                if not isinstance(error, Overloaded) or time.monotonic() + error.retry_after_s > waits_until:
                    raise
                log.info("job %s waits %d s: the graph is at capacity", job.id, error.retry_after_s)
                self._pause(job.id, error.retry_after_s)
        key = f"results/{job.id}.{encoded.format}"
        self.jobs.objects.put(key, encoded.data, CONTENT_TYPES[encoded.format])
        return key, {"key": key, "format": encoded.format, "bytes": len(encoded.data),
                     "width": encoded.width, "height": encoded.height, "faces": encoded.faces}

    def _run_video(self, job, attempt: int, source: Path, work: Path, options: RestoreOptions,
                   output: VideoOutput) -> tuple[str, dict]:
        """A video cut into segments, each decoded, restored and encoded by a CPU replica (its
        frames' tiles join the GPU's batches beside pictures), joined here with the input's
        audio. Progress goes into the job's record; a cancel is seen there too."""
        jobs, limits = self.args.jobs, self.runtime.limits
        header = probe_video(source, limits)
        options = options.fitted(header.width, header.height, limits.max_output_pixels)
        size = options.output_size(header.width, header.height)
        check_output(header, size, limits)
        fmt = "mp4" if header.container == "mp4" else "mkv"
        target = work / f"result.{fmt}"
        segments = work / "segments"
        segments.mkdir()

        def report(progress: Progress) -> None:
            if not self.jobs.records.report(job.id, attempt, asdict(progress)):
                raise Canceled()  # cancelled, or the job was handed to another consumer
            log.info("job %s: %d of %d frames, %.1f frames/s", job.id, progress.frames_done,
                     progress.frames_total, progress.fps)

        def run_segment(segment: Segment, encoding: Path, on_frames: OnFrames) -> int:
            stream = self.preprocess.options(stream=True).restore_video_segment.remote(
                segment, segment.path.read_bytes(), options, output, size, jobs.video_frames_in_flight, job.id)
            frames = 0
            try:
                for item in stream:
                    if isinstance(item, bytes):
                        encoding.write_bytes(item)
                    else:
                        frames += item
                        on_frames(item)
            except BaseException:
                stream.cancel()  # its replica stops at its next frame
                raise
            return frames

        result = restore_video(source, target, header, run_segment, workdir=segments, segment_s=jobs.video_segment_s,
                               parallel=jobs.video_segments_in_flight, on_progress=report)
        key = f"results/{job.id}.{fmt}"
        self.jobs.objects.put_file(key, target, CONTENT_TYPES[fmt])
        return key, {"key": key, "format": fmt, "bytes": target.stat().st_size, "width": result.width,
                     "height": result.height, "frames": result.frames, "fps": float(result.rate),
                     "duration_s": round(result.duration_s, 3), "segments": result.segments}

    def _restore(self, job_id: str, data: bytes, options: RestoreOptions):
        deadline = time.time() + self.runtime.request_timeout_s
        response = self.preprocess.restore_bytes.remote(data, options, deadline)
        while True:  # wait, looking for a cancellation now and then
            try:
                return response.result(timeout_s=0.5)
            except TimeoutError:
                if self._canceled(job_id):
                    response.cancel()
                    raise Canceled() from None

    def _pause(self, job_id: str, seconds: float) -> None:
        ends = time.monotonic() + seconds
        while (left := ends - time.monotonic()) > 0:
            if self._canceled(job_id):
                raise Canceled()
            time.sleep(min(0.5, left))

    def _canceled(self, job_id: str) -> bool:
        return self.jobs.records.get(job_id).status == "canceled"

    def _notify(self, job_id: str, event: str) -> None:
        job = self.jobs.records.get(job_id)
        if job is not None and job.webhook:
            self.webhooks.send(job.webhook, f"job.{event}", self.jobs.view(job))

    def _sweep(self) -> None:
        """Remove what passed its retention: records, inputs and results."""
        while not self.stop.wait(60):
            try:
                if swept := self.jobs.sweep():
                    log.info("removed %d jobs past their retention", swept)
            except Exception:  # noqa: BLE001  the next sweep tries again
                log.exception("job sweep failed")


def consumer_deployment(args: AppArgs):
    """The consumer as a deployment: the task processor's settings come from ``args.jobs``, so the
    class is decorated here, when the graph is built (serve_config.yaml's ``JobConsumer``
    entry sets its replicas)."""
    consumer = task_consumer(task_processor_config=task_processor_config(args.jobs))(JobConsumer)
    return serve.deployment(name=CONSUMER)(consumer)
