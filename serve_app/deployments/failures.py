"""Ray's ways of failing, as the service's typed errors; used wherever a deployment awaits another."""
from __future__ import annotations

import asyncio

from ray.exceptions import NodeDiedError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from serve_app.errors import Overloaded, ReplicaLost, RequestTimeout


def typed_error(exc: BaseException) -> BaseException:
    """The error a caller should see. A replica's exception arrives wrapped in a RayTaskError
    (twice when it crossed two deployments); the first Ray failure or, failing that, the
    innermost cause is the one that names the problem."""
    while True:
        if isinstance(exc, BackPressureError):
            return Overloaded("the service is at capacity; retry shortly")
        if isinstance(exc, (RayActorError, NodeDiedError, ReplicaUnavailableError, DeploymentUnavailableError)):
            return ReplicaLost("a replica was lost while it held this request (its node may have gone); "
                               "retry: Serve is replacing it")
        if isinstance(exc, asyncio.TimeoutError):
            return RequestTimeout()
        cause = getattr(exc, "cause", None)
        if cause is None or cause is exc:
            return exc
        exc = cause
