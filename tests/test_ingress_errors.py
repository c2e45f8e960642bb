"""How the ingress names failures that come from Ray rather than from our own code."""
import asyncio

from ray.exceptions import ActorDiedError, NodeDiedError
from ray.serve.exceptions import BackPressureError

from serve_app.deployments.ingress import _unwrap
from serve_app.errors import InvalidOption, Overloaded, ReplicaLost, RequestTimeout


def test_ray_failures_become_typed_service_errors():
    assert isinstance(_unwrap(BackPressureError(num_queued_requests=4, max_queued_requests=4)), Overloaded)
    assert isinstance(_unwrap(asyncio.TimeoutError()), RequestTimeout)
    lost = _unwrap(ActorDiedError())
    assert isinstance(lost, ReplicaLost) and lost.status == 503 and lost.to_json()["error"] == "replica_lost"
    assert isinstance(_unwrap(NodeDiedError("node gone")), ReplicaLost)


def test_a_typed_cause_is_unwrapped_and_others_pass_through():
    class Wrapped(Exception):
        cause = InvalidOption("bad scale")

    assert isinstance(_unwrap(Wrapped()), InvalidOption)
    plain = KeyError("x")
    assert _unwrap(plain) is plain  # becomes a plain 500 without a traceback
