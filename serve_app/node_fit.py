"""Fitting serve_config.yaml's replica counts to the one machine ``restore-serve`` starts Ray on.

serve_config.yaml is sized for a GPU node (several CPU replicas of one core each beside the GPU
replicas). On a smaller machine its minimum would not place: a replica waits for resources
forever and the application never reaches RUNNING. On a single machine nothing will ever add
a node, so the launcher lowers the minimum and maximum replica counts to what the machine
holds (and, where even one replica of a deployment would not fit, its CPU share) and says so.
On a cluster the configuration is applied as written: the cluster autoscaler adds nodes.
"""
from __future__ import annotations

import copy
import math

_RESOURCES = ("num_cpus", "num_gpus")


def _minimum(deployment: dict) -> int:
    scaling = deployment.get("autoscaling_config")
    if scaling:
        return int(scaling.get("min_replicas", 1))
    return int(deployment.get("num_replicas", 1))


def _room_for(deployment: dict) -> int:
    """Replicas the machine must hold room for: one at least, for a deployment that scales to
    zero (the job consumers) must still start one when work comes."""
    return max(1, _minimum(deployment))


def _set_minimum(deployment: dict, count: int) -> None:
    if deployment.get("autoscaling_config"):
        deployment["autoscaling_config"]["min_replicas"] = count
    else:
        deployment["num_replicas"] = count


def fit_to_node(config: dict, cpus: float, gpus: float) -> tuple[dict, list[str]]:
    """``config`` with its replica counts fitted to ``cpus`` and ``gpus``, and a line for each change."""
    config = copy.deepcopy(config)
    changes: list[str] = []
    capacity = {"num_cpus": cpus, "num_gpus": gpus}
    for app in config.get("applications", []):
        deployments = app.get("deployments", [])

        def need(d: dict, resource: str) -> float:
            return float(d.get("ray_actor_options", {}).get(resource, 0))

        def demand(resource: str) -> float:
            return sum(_room_for(d) * need(d, resource) for d in deployments)

        # 1. The minimum must place: shrink the minimum of the deployments with more than one
        # replica, largest CPU share first, down to one replica each.
        for d in sorted(deployments, key=lambda d: -need(d, "num_cpus")):
            excess, before = demand("num_cpus") - capacity["num_cpus"], _minimum(d)
            if excess > 1e-9 and before > 1 and need(d, "num_cpus") > 0:
                after = max(1, before - math.ceil(excess / need(d, "num_cpus") - 1e-9))
                _set_minimum(d, after)
                changes.append(f"{d['name']}: {before} -> {after} replicas at least, to fit {cpus:g} CPUs")
        # Where one replica each still does not fit, the largest CPU share gives way.
        over = demand("num_cpus") - capacity["num_cpus"]
        if over > 1e-9:
            widest = max(deployments, key=lambda d: need(d, "num_cpus"))
            share = round(max(0.05, need(widest, "num_cpus") - over), 2)
            changes.append(f"{widest['name']}: num_cpus {need(widest, 'num_cpus'):g} -> {share:g}, to fit {cpus:g} CPUs")
            widest["ray_actor_options"]["num_cpus"] = share
        # 2. Autoscaling cannot grow past the machine: cap each maximum at what the room left holds.
        for d in deployments:
            scaling = d.get("autoscaling_config")
            if not scaling:
                continue
            room = [(capacity[r] - demand(r)) / need(d, r) for r in _RESOURCES if need(d, r) > 0]
            most = _room_for(d) + max(0, math.floor(min(room) + 1e-9) if room else 0)
            if scaling.get("max_replicas", most) > most:
                changes.append(f"{d['name']}: at most {scaling['max_replicas']} -> {most} replicas, "
                               f"as this machine holds")
                scaling["max_replicas"] = most
    return config, changes
