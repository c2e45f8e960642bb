"""What /healthz says: whether the graph can serve, and if not, why.

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


async def graph_health(upscaler: DeploymentHandle, faces: DeploymentHandle, preprocess: DeploymentHandle) -> dict:
    """The health answer's body; its ``status`` is "ok" only when the graph can serve every offered model."""
    try:
        problems, all_running = await asyncio.wait_for(asyncio.to_thread(_deployment_problems), _ANSWER_WITHIN_S)
        if not all_running:
            return {"status": "starting", "detail": "some deployments have no running replica",
                    "deployments": problems}
        up, face, _ = await asyncio.wait_for(asyncio.gather(
            upscaler.stats.remote(), faces.stats.remote(), preprocess.ping.remote()), _ANSWER_WITHIN_S)
    except Exception as exc:  # noqa: BLE001
        return {"status": "unavailable", "detail": str(typed_error(exc))}
    body: dict = {"status": "ok", "devices": {"upscaler": up["device"], "faces": face["device"]}}
    failures = {**up["failures"], **face["failures"]}
    if failures:
        body.update(status="degraded", detail="some models are not loaded", models=failures)
    if problems:  # serving, but some replicas are starting, stopping or cannot be placed
        body["deployments"] = problems
    return body
