"""A Python client of the HTTP API, synchronous (``Client``) and asynchronous (``AsyncClient``).

    from serve_app.client import Client
    with Client("https://restore.example.com", api_key="rsk_...") as client:
        client.restore("old.jpg", face_enhance=True, width=2048).save("restored.jpg")

An image is a path, bytes, a numpy array (BGR, as OpenCV holds it) or an http(s) URL (run as a
job, since only jobs fetch URLs). Answers the service asks to be retried (503 ``overloaded``,
429 ``rate_limited``) are retried after their ``Retry-After``, with a growing wait; every other
error raises the service's own exception class (``serve_app.errors``: ``UnsupportedFormat``,
``TooManyPixels``...), carrying its ``code``, ``status`` and ``detail``.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import httpx

from serve_app.client.wire import (
    DEFAULT_URL, Image, Job, Result, Retry, ServiceError, auth_headers, check_wait, ended, image_bytes, is_url,
    job_id, raise_for, restore_request, result_of, submit_request,
)

__all__ = ["AsyncClient", "Client", "DEFAULT_URL", "Image", "Job", "Result", "ServiceError", "image_bytes"]


class Client:
    """The HTTP API from Python. ``api_key`` defaults to ``$RESTORE_SERVE_API_KEY``; ``timeout``
    bounds each HTTP call (seconds); ``retries`` how often a 503 ``overloaded`` or 429 is retried;
    ``verify`` is httpx's: True, False or a CA bundle's path."""

    def __init__(self, url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float = 180.0,
                 retries: int = 8, verify: bool | str = True):
        self._http = httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=timeout, verify=verify)
        self._retry = Retry(retries, give_up_s=timeout * (retries + 1))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        started = time.monotonic()
        for attempt in range(self._retry.retries + 1):
            response = self._http.request(method, path, **kwargs)
            wait = self._retry.wait(response, attempt, started)
            if wait is None:
                break
            time.sleep(wait)
        return raise_for(response)

    def restore(self, image: Image, **options: Any) -> Result:
        """``image`` restored with the options of POST /v1/restore; a URL goes through a job."""
        if is_url(image):
            return self.result(self.wait(self.submit(image, **options)))
        return result_of(self._call("POST", "/v1/restore", **restore_request(image_bytes(image), options)))

    def submit(self, image: Image, *, webhook: str | None = None, idempotency_key: str | None = None,
               **options: Any) -> Job:
        return Job.of(self._call("POST", "/v1/jobs", **submit_request(image, options, webhook,
                                                                        idempotency_key)).json())

    def job(self, job: Job | str) -> Job:
        return Job.of(self._call("GET", f"/v1/jobs/{job_id(job)}").json())

    def cancel(self, job: Job | str) -> Job:
        return Job.of(self._call("POST", f"/v1/jobs/{job_id(job)}/cancel").json())

    def wait(self, job: Job | str, *, timeout: float | None = None, poll_s: float = 0.5,
             on_update: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job ends; a failed job raises its error (``.job`` holds it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.job(job)
        while not job.done:
            if on_update:
                on_update(job)
            check_wait(job, deadline, poll_s)
            time.sleep(poll_s)
            job = self.job(job)
        return ended(job)

    def result(self, job: Job | str) -> Result:
        job = job if isinstance(job, Job) and job.output else self.job(job)
        return result_of(self._call("GET", f"/v1/jobs/{job.id}/result", follow_redirects=True), job)

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models").json()["models"]


class AsyncClient:
    """``Client`` for asyncio: the same methods, awaited."""

    def __init__(self, url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float = 180.0,
                 retries: int = 8, verify: bool | str = True):
        self._http = httpx.AsyncClient(base_url=url, headers=auth_headers(api_key), timeout=timeout, verify=verify)
        self._retry = Retry(retries, give_up_s=timeout * (retries + 1))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        started = time.monotonic()
        for attempt in range(self._retry.retries + 1):
            response = await self._http.request(method, path, **kwargs)
            wait = self._retry.wait(response, attempt, started)
            if wait is None:
                break
            await asyncio.sleep(wait)
        return raise_for(response)

    async def restore(self, image: Image, **options: Any) -> Result:
        if is_url(image):
            return await self.result(await self.wait(await self.submit(image, **options)))
        data = await asyncio.to_thread(image_bytes, image)  # a file read or a PNG encode
        return result_of(await self._call("POST", "/v1/restore", **restore_request(data, options)))

    async def submit(self, image: Image, *, webhook: str | None = None, idempotency_key: str | None = None,
                     **options: Any) -> Job:
        request = await asyncio.to_thread(submit_request, image, options, webhook, idempotency_key)
        return Job.of((await self._call("POST", "/v1/jobs", **request)).json())

    async def job(self, job: Job | str) -> Job:
        return Job.of((await self._call("GET", f"/v1/jobs/{job_id(job)}")).json())

    async def cancel(self, job: Job | str) -> Job:
        return Job.of((await self._call("POST", f"/v1/jobs/{job_id(job)}/cancel")).json())

    async def wait(self, job: Job | str, *, timeout: float | None = None, poll_s: float = 0.5,
                   on_update: Callable[[Job], None] | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        job = await self.job(job)
        while not job.done:
            if on_update:
                on_update(job)
            check_wait(job, deadline, poll_s)
            await asyncio.sleep(poll_s)
            job = await self.job(job)
        return ended(job)

    async def result(self, job: Job | str) -> Result:
        job = job if isinstance(job, Job) and job.output else await self.job(job)
        return result_of(await self._call("GET", f"/v1/jobs/{job.id}/result", follow_redirects=True), job)

    async def models(self) -> list[dict]:
        return (await self._call("GET", "/v1/models")).json()["models"]
