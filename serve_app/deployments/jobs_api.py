"""The jobs half of the ingress: submit, read, list, cancel, and hand out results.

A submit is checked as /v1/restore is (options, offered models, the image header and its
limits; for a URL, its scheme and addresses) before anything is kept; then the input goes to
the object store, the record is written, and the job is queued. If the queue cannot take it,
the record and the input are removed and the answer is 503 ``queue_unavailable``: a 202
means the job is durably queued. Database, object-store and broker calls are blocking, so they
run on threads.
"""
from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from ray.serve.task_consumer import instantiate_adapter_from_config
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response

from serve_app.api import RestoreOptions, parse_options
from serve_app.config import AppArgs, LimitsConfig
from serve_app.errors import InvalidOption, JobNotDone, MethodNotAllowed, NotFound, QueueUnavailable
from serve_app.imageio import CONTENT_TYPES, probe
from serve_app.jobs.records import STATUSES, new_id
from serve_app.jobs.system import TASK, JobSystem, task_processor_config
from serve_app.metrics import count_job
from serve_app.video.options import VIDEO_FORMATS, split_video_options
from serve_app.video.probe import check_output, looks_like_video, probe_video


class JobsApi:
    def __init__(self, args: AppArgs, check_models):
        self.args, self.system, self.check_models = args, JobSystem(args.jobs), check_models
        self._queue = None

    def _enqueue(self, job_id: str) -> None:
        if self._queue is None:
            self._queue = instantiate_adapter_from_config(task_processor_config(self.args.jobs))
        self._queue.enqueue_task_sync(TASK, args=[job_id])

    # ------------------------------------------------------------------ the operations
    async def submit(self, data: bytes | None, values: dict, limits: LimitsConfig,
                     idempotency_key: str | None = None, owner: str | None = None) -> tuple[dict, bool]:
        """(the job's view, whether it is new). ``values``: the options of /v1/restore plus
        ``image_url`` (instead of ``data``) and ``webhook``; ``owner``: the API key's name, whose
        idempotency keys are its own."""
        values = dict(values)
        image_url, webhook = values.pop("image_url", None), values.pop("webhook", None)
        values, video = split_video_options(values)  # for a video, found at submit or once fetched
        options = parse_options(values)
        self.check_models(options)
        if (data is None) == (image_url is None):
            raise InvalidOption("a job takes an image or an image_url, one of the two")
        system = self.system
        for url in filter(None, (image_url, webhook)):
            if not isinstance(url, str):
                raise InvalidOption("image_url and webhook must be URL strings")
            await asyncio.to_thread(system.urls.check, url)
        if data is not None and looks_like_video(data):
            header = await asyncio.to_thread(probe_video, data, limits)
            fitted = options.fitted(header.width, header.height, limits.max_output_pixels)
            check_output(header, fitted.output_size(header.width, header.height), limits)
        elif data is not None:
            header = probe(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
            options.fitted(*header.upright_size, limits.max_output_pixels)  # refused now, not when run
        job_id = new_id()
        input_key = None if data is None else f"inputs/{job_id}"
        if input_key:
            await asyncio.to_thread(system.objects.put, input_key, data, "application/octet-stream")
        job, created = await asyncio.to_thread(
            system.records.create, job_id=job_id, options={**_stored(options), **video}, input_key=input_key,
            image_url=image_url, webhook=webhook, owner=owner,
            idempotency_key=None if idempotency_key is None else f"{owner or ''}:{idempotency_key}")
        if not created:
            if input_key:
                await asyncio.to_thread(system.objects.delete, [input_key])
            return system.view(job), False
        try:
            await asyncio.to_thread(self._enqueue, job.id)
            count_job("queued")
        except Exception as exc:  # noqa: BLE001  the broker is down or unreachable
            await asyncio.to_thread(system.records.delete, [job.id])
            if input_key:
                await asyncio.to_thread(system.objects.delete, [input_key])
            raise QueueUnavailable(f"the job queue cannot take jobs now ({type(exc).__name__}); "
                                   "nothing was kept, retry shortly", retry_after_s=5) from None
        return system.view(job), True

    # ``owner`` below: the API key's name whose jobs alone it may see; None: every job.
    async def get(self, job_id: str, owner: str | None = None) -> dict:
        return self.system.view(await self._job(job_id, owner))

    async def cancel(self, job_id: str, owner: str | None = None) -> dict:
        before = await self._job(job_id, owner)
        after = await asyncio.to_thread(self.system.records.cancel, job_id)
        if before.status == "queued" and after.status == "canceled":
            count_job("canceled")  # a running job is counted by its consumer, which sees it stop
        return self.system.view(after)

    async def page(self, status: str | None, cursor: str | None, limit: int, owner: str | None = None) -> dict:
        if status is not None and status not in STATUSES:
            raise InvalidOption(f"status must be one of {', '.join(STATUSES)}")
        if not 1 <= limit <= 1000:
            raise InvalidOption("limit must be between 1 and 1000")
        try:
            jobs, after = await asyncio.to_thread(self.system.records.page, status=status, cursor=cursor,
                                                  limit=limit, owner=owner)
        except KeyError:
            raise InvalidOption("the cursor names no job") from None
        return {"jobs": [self.system.view(job) for job in jobs], "next_cursor": after}

    async def result(self, job_id: str, owner: str | None = None) -> tuple[bytes | None, str | None, str]:
        """(the image, or None with a URL to fetch it from; its format)."""
        job = await self._job(job_id, owner)
        if job.status != "succeeded":
            raise JobNotDone(f"job {job_id} is {job.status}; its result exists once it has succeeded")
        key, fmt = job.output["key"], job.output["format"]
        url = await asyncio.to_thread(self.system.objects.url, key, 3600)
        if url is not None:
            return None, url, fmt
        if fmt in VIDEO_FORMATS:  # a video is sent from its file as it is read, never whole in memory
            return None, None, fmt
        return await asyncio.to_thread(self.system.objects.get, key), None, fmt

    async def _job(self, job_id: str, owner: str | None):
        job = await asyncio.to_thread(self.system.records.get, job_id)
        if job is None or (owner is not None and job.owner != owner):  # another key's: as if none
            raise NotFound(f"no job {job_id} (jobs are kept {self.args.jobs.retention_s / 3600:g} h)")
        return job

    # ------------------------------------------------------------------ HTTP
    async def http(self, request: Request, parts: list[str], read_submit, owner: str | None,
                   sees_all: bool) -> Response:
        """Routes under /v1/jobs; ``read_submit`` reads a submit's body (admission, time limit).
        New jobs are ``owner``'s; the caller sees only those unless ``sees_all``."""
        visible = None if sees_all else owner
        method, path = request.method, urlsplit(str(request.url)).path
        shape = tuple(parts[1:]) if parts else None  # None: /v1/jobs itself; (): one job; ("cancel",) ...
        allowed = {None: ("GET", "POST"), (): ("GET",), ("cancel",): ("POST",), ("result",): ("GET",)}.get(shape)
        if allowed is None:
            raise NotFound(f"no route {path}")
        if method not in allowed:  # as the ingress's other routes answer
            raise MethodNotAllowed(f"{path} takes {', '.join(allowed)}, not {method}", allowed)
        if shape is None and method == "POST":
            data, values, limits = await read_submit()
            view, created = await self.submit(data, values, limits, request.headers.get("idempotency-key"), owner)
            return JSONResponse(view, 202 if created else 200, headers={"location": view["urls"]["get"]})
        if shape is None:
            q = request.query_params
            limit = q.get("limit", "50")
            if not limit.isdigit():
                raise InvalidOption("limit must be a whole number")
            return JSONResponse(await self.page(q.get("status"), q.get("cursor"), int(limit), visible))
        if shape == ():
            return JSONResponse(await self.get(parts[0], visible))
        if shape == ("cancel",):
            return JSONResponse(await self.cancel(parts[0], visible))
        data, url, fmt = await self.result(parts[0], visible)
        if url is not None:
            return RedirectResponse(url, 307)
        if data is None:
            job = await self._job(parts[0], visible)
            return FileResponse(self.system.objects.file(job.output["key"]), media_type=CONTENT_TYPES[fmt],
                                filename=f"{job.id}.{fmt}")
        return Response(data, media_type=CONTENT_TYPES[fmt])


def _stored(options: RestoreOptions) -> dict:
    return options.model_dump(mode="json", exclude_none=True)
