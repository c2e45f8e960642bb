"""What /healthz and /readyz say: whether the graph can serve, which models, and if not, why.

Serve's own status comes first: a deployment with no running replica cannot answer a handle
call (the call would wait for one), and a replica that cannot be placed carries Serve's message
naming the resources it needs. Then the model deployments are asked which offered models they
could not load.
"""
from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.deployments.failures import typed_error
from serve_app.jobs.system import CONSUMER

_ANSWER_WITHIN_S = 10.0


def _deployment_problems() -> tuple[dict[str, dict], bool]:
    """(deployments that are not HEALTHY, with Serve's status and message; whether each
    deployment a request goes through has at least one running replica). The job consumers are
    not on a request's path, and have none while no job waits."""
    context = serve.get_replica_context()
    app = serve.status().applications.get(context.app_name)
    if app is None:
        return {}, False
    problems, all_running = {}, True
    for name, deployment in app.deployments.items():
        running = deployment.replica_states.get("RUNNING", 0)
        all_running = all_running and (running > 0 or name == CONSUMER)
        if deployment.status != "HEALTHY":
            problems[name] = {"status": str(deployment.status), "replicas": dict(deployment.replica_states),
                              "message": deployment.message}
    return problems, all_running


async def graph_health(upscaler: DeploymentHandle, faces: DeploymentHandle, preprocess: DeploymentHandle,
                       offered: list[str]) -> dict:
    """The readiness answer's body. Its ``status``: "ok" when every offered model is loaded,
    "degraded" when some are, and otherwise why nothing can be served: "starting", "unavailable"
    or "no_model"."""
    try:
        problems, all_running = await asyncio.wait_for(asyncio.to_thread(_deployment_problems), _ANSWER_WITHIN_S)
        if not all_running:
            return {"status": "starting", "detail": "some deployments have no running replica",
                    "deployments": problems}
        up, face, _ = await asyncio.wait_for(asyncio.gather(
            upscaler.stats.remote(), faces.stats.remote(), preprocess.ping.remote()), _ANSWER_WITHIN_S)
    except Exception as exc:  # noqa: BLE001
        return {"status": "unavailable", "detail": str(typed_error(exc))}
    failures = {**up["failures"], **face["failures"]}
    models = {name: {"loaded": False, "detail": failures[name]} if name in failures else {"loaded": True}
              for name in offered}
    body: dict = {"status": "ok", "devices": {"upscaler": up["device"], "faces": face["device"]}, "models": models}
    if not any(model["loaded"] for model in models.values()):
        body.update(status="no_model", detail="no offered model is loaded")
    elif failures:
        body.update(status="degraded", detail="some offered models are not loaded")
    if problems:  # serving, but some replicas are starting, stopping or cannot be placed
        body["deployments"] = problems
    return body


def can_serve(body: dict) -> bool:
    return body["status"] in ("ok", "degraded")
