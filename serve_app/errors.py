"""One exception hierarchy for everything a caller can get wrong or the service can lack.

Each error carries a short machine-readable ``code`` and the HTTP status the ingress answers
with, so the mapping to HTTP lives here, in one table, and nowhere else.
"""
from __future__ import annotations

import math


class RestoreError(Exception):
    """Base of every error this service reports to a caller."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail

    def to_json(self) -> dict:
        return {"error": self.code, "detail": self.detail}

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries besides the JSON body."""
        return {}


class InvalidOption(RestoreError):
    status, code = 400, "invalid_option"


class EmptyImage(RestoreError):
    status, code = 400, "empty_image"


class NotAnImage(RestoreError):
    status, code = 400, "not_an_image"


class CorruptImage(RestoreError):
    """The header parsed but the pixels did not: a truncated or damaged file."""

    status, code = 400, "corrupt_image"


class UnsupportedFormat(RestoreError):
    status, code = 415, "unsupported_format"


class TooManyBytes(RestoreError):
    status, code = 413, "too_many_bytes"


class TooManyPixels(RestoreError):
    status, code = 413, "too_many_pixels"


class CorruptVideo(RestoreError):
    """A container whose header or frames cannot be read through: truncated or damaged."""

    status, code = 400, "corrupt_video"


class NoVideoStream(RestoreError):
    status, code = 400, "no_video_stream"


class VideoTooLong(RestoreError):
    """Past the video limits: duration, frame count or output pixels a second."""

    status, code = 413, "video_too_long"


class WeightsUnavailable(RestoreError):
    """A model's weights are neither on disk nor downloadable."""

    status, code = 503, "weights_unavailable"
    model: str | None = None  # the model a replica could not load, where it is known


class WeightsCorrupt(WeightsUnavailable):
    """A file was fetched or converted but failed its integrity check."""

    code = "weights_corrupt"


class ReplicaLost(RestoreError):
    """A replica (or its node) died while it held the request."""

    status, code = 503, "replica_lost"


class TooMuchWork(RestoreError):
    """The work asked for cannot end within the request timeout on this service's devices."""

    status, code = 413, "too_much_work"


class NotFound(RestoreError):
    status, code = 404, "not_found"


class MethodNotAllowed(RestoreError):
    status, code = 405, "method_not_allowed"

    def __init__(self, detail: str, allowed: tuple[str, ...] = ()):
        super().__init__(detail)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"allow": ", ".join(self.allowed)}


class Unauthorized(RestoreError):
    """No API key, or one the service does not know."""

    status, code = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer realm="restore-serve"'}


class Forbidden(RestoreError):
    """A known API key without the scope the route needs."""

    status, code = 403, "forbidden"


class _RetryLater(RestoreError):
    """An error that tells when to try again: a ``Retry-After`` in whole seconds, at least 1."""

    def __init__(self, detail: str, retry_after_s: float = 1.0):
        super().__init__(detail)
        self.retry_after_s = max(1, math.ceil(retry_after_s))

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)}


class RateLimited(_RetryLater):
    """An API key past its request or pixel rate; Retry-After says when it has room again."""

    status, code = 429, "rate_limited"


class BodyTimeout(RestoreError):
    """The client sent its request body too slowly."""

    status, code = 408, "body_timeout"


class Overloaded(_RetryLater):
    status, code = 503, "overloaded"


class Draining(Overloaded):
    """The service is shutting down: it finishes what it holds and takes nothing new."""

    code = "draining"


class RequestTimeout(RestoreError):
    status, code = 504, "timeout"

    def __init__(self, detail: str = "the request took longer than the service's request timeout"):
        super().__init__(detail)


class UrlRefused(RestoreError):
    """A URL the service will not fetch: its scheme, or an address that is not public."""

    status, code = 400, "url_refused"


class UrlUnreachable(RestoreError):
    """A URL that could not be fetched: no such name, no answer in time, or not a 2xx answer."""

    status, code = 422, "url_unreachable"  # the caller's URL, not a fault of this service


class UrlTooLarge(RestoreError):
    status, code = 413, "url_too_large"


class QueueUnavailable(Overloaded):
    """The job queue (its broker) cannot take a job now; nothing of the job was kept."""

    code = "queue_unavailable"


class JobNotDone(RestoreError):
    """A job's result was asked for before the job succeeded."""

    status, code = 409, "job_not_done"
