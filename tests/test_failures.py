"""How failures that come from Ray rather than from our own code are named to callers."""
import asyncio

from ray.exceptions import ActorDiedError, NodeDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from serve_app.deployments.failures import typed_error
from serve_app.errors import InvalidOption, Overloaded, ReplicaLost, RequestTimeout


def test_ray_failures_become_typed_service_errors():
    assert isinstance(typed_error(BackPressureError(num_queued_requests=4, max_queued_requests=4)), Overloaded)
    assert isinstance(typed_error(asyncio.TimeoutError()), RequestTimeout)
    lost = typed_error(ActorDiedError())
    assert isinstance(lost, ReplicaLost) and lost.status == 503 and lost.to_json()["error"] == "replica_lost"
    assert isinstance(typed_error(NodeDiedError("node gone")), ReplicaLost)


def test_causes_are_unwrapped_across_two_deployments():
    # ingress <- CPU deployment <- GPU deployment: each hop wraps the error once more
    def hop(name, cause):
        return RayTaskError(name, "traceback", cause).as_instanceof_cause()

    assert isinstance(typed_error(hop("restore_bytes", hop("forward", ActorDiedError()))), ReplicaLost)
    typed = typed_error(hop("restore_bytes", hop("forward", InvalidOption("bad scale"))))
    assert isinstance(typed, InvalidOption) and typed.detail == "bad scale"
    plain = KeyError("x")
    assert typed_error(plain) is plain  # becomes a plain 500 without a traceback
