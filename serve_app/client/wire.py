"""What the client sends and gets back, apart from the sending: request shapes, the answer's
types, the service's errors by code, and when to try again. Shared by ``Client`` and ``AsyncClient``."""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import httpx
import numpy as np

from serve_app import errors
from serve_app.imageio.png import encode_png

Image = Union[str, os.PathLike, bytes, np.ndarray]
DEFAULT_URL = "http://127.0.0.1:8000"
_RETRIED = {"overloaded", "rate_limited", "queue_unavailable"}
_ENDED = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Result:
    """A restored picture: its encoded bytes and what they are."""

    data: bytes
    format: str
    width: int
    height: int
    faces: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)

    def array(self) -> np.ndarray:
        """The pixels as OpenCV reads them (BGR or BGRA, 8 or 16 bit)."""
        import cv2

        return cv2.imdecode(np.frombuffer(self.data, np.uint8), cv2.IMREAD_UNCHANGED)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file; its name's suffix is the caller's choice, the format the service's."""
        path = Path(path)
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class Job:
    """A job as the service reports it (``docs/jobs.md``); ``raw`` holds every field."""

    id: str
    status: str
    error: dict | None
    output: dict | None
    raw: dict

    @classmethod
    def of(cls, view: dict) -> Job:
        return cls(view["id"], view["status"], view.get("error"), view.get("output"), view)

    @property
    def done(self) -> bool:
        return self.status in _ENDED


class ServiceError(errors.RestoreError):
    """An error code this client does not know (a newer service): its code and status as sent."""

    def __init__(self, detail: str, code: str, status: int):
        super().__init__(detail)
        self.code, self.status = code, status


def _error_classes(base: type = errors.RestoreError) -> dict[str, type]:
    classes = {}
    for cls in base.__subclasses__():
        classes.update(_error_classes(cls))
        if "code" in vars(cls):
            classes[cls.code] = cls
    return classes


_ERRORS = _error_classes()


def error_of(code: str, detail: str, status: int, retry_after: float | None = None) -> errors.RestoreError:
    """The service's exception for ``code``."""
    cls = _ERRORS.get(code)
    if cls is None:
        return ServiceError(detail, code, status)
    error = cls.__new__(cls)
    errors.RestoreError.__init__(error, detail)
    if retry_after is not None:
        error.retry_after_s = retry_after
    return error


def raise_for(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        body = response.json()
        code, detail = body["error"], body.get("detail", "")
    except (ValueError, KeyError, TypeError):
        code, detail = f"http_{response.status_code}", response.text[:500]
    raise error_of(code, detail, response.status_code, _retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


class Retry:
    """When to try a refused request again: the service's Retry-After or a doubling wait,
    whichever is longer, plus a random part of the doubling wait so that clients refused
    together do not all come back together; ``retries`` times, never past ``give_up_s``."""

    def __init__(self, retries: int, give_up_s: float):
        self.retries, self.give_up_s = retries, give_up_s

    def wait(self, response: httpx.Response, attempt: int, started: float) -> float | None:
        if response.status_code not in (429, 503) or attempt >= self.retries:
            return None
        try:
            if response.json().get("error") not in _RETRIED:
                return None
        except ValueError:
            return None
        backoff = min(0.25 * 2**attempt, 30.0)
        wait = max(_retry_after(response) or 0.0, backoff) + random.uniform(0, backoff)
        return wait if time.monotonic() + wait - started < self.give_up_s else None


def restore_request(image: bytes, options: dict) -> dict:
    return {"content": image, "params": _params(options),
            "headers": {"content-type": "application/octet-stream"}}


def submit_request(image: Image, options: dict, webhook: str | None, idempotency_key: str | None) -> dict:
    headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
    if is_url(image):
        body = {"image_url": str(image), **({"webhook": webhook} if webhook else {}), **_drop_none(options)}
        return {"json": body, "headers": headers}
    params = _params({**options, "webhook": webhook})
    return {"content": image_bytes(image), "params": params,
            "headers": {**headers, "content-type": "application/octet-stream"}}


def _params(options: dict) -> dict:
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in _drop_none(options).items()}


def _drop_none(options: dict) -> dict:
    return {k: v for k, v in options.items() if v is not None}


def is_url(image: Image) -> bool:
    return isinstance(image, str) and image.startswith(("http://", "https://"))


def image_bytes(image: Image) -> bytes:
    """A path's, an array's (as a lossless PNG) or bytes' own bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        return encode_png(image, 1)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    raise TypeError(f"an image is a path, bytes, a numpy array or a URL, not {type(image).__name__}")


def result_of(response: httpx.Response, job: Job | None = None) -> Result:
    headers = response.headers
    timings = {k[len("x-timing-"):-len("-ms")]: float(v) for k, v in headers.items()
               if k.startswith("x-timing-") and k.endswith("-ms")}
    fmt = headers.get("content-type", "").split("/")[-1]
    if job is not None and job.output:
        out = job.output
        return Result(response.content, out["format"], out["width"], out["height"], out.get("faces", 0), timings)
    from serve_app.imageio.probe import probe  # the size from the file's header, no pixel decoded

    header = probe(response.content, max_bytes=len(response.content), max_pixels=1 << 62)
    return Result(response.content, fmt, header.width, header.height,
                  int(headers.get("x-faces-restored", 0)), timings)


def auth_headers(api_key: str | None) -> dict:
    api_key = api_key if api_key is not None else os.environ.get("RESTORE_SERVE_API_KEY")
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


def check_wait(job: Job, deadline: float | None, poll_s: float) -> None:
    if deadline is not None and time.monotonic() + poll_s > deadline:
        raise TimeoutError(f"job {job.id} is still {job.status}")


def ended(job: Job) -> Job:
    if job.status == "failed":
        error = error_of(job.error["code"], job.error.get("detail", ""), 0)
        error.job = job
        raise error
    if job.status == "canceled":
        raise errors.JobNotDone(f"job {job.id} was canceled")
    return job
