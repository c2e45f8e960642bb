"""The launcher fits serve_config.yaml's replica counts to the one machine it starts Ray on."""
from pathlib import Path

import yaml

from serve_app.node_fit import fit_to_node

CONFIG = yaml.safe_load((Path(__file__).resolve().parent.parent / "serve_config.yaml").read_text())


def _demand(config: dict) -> tuple[float, float]:
    cpus = gpus = 0.0
    for d in config["applications"][0]["deployments"]:
        # a deployment that scales to zero (the job consumers) needs room for one when work comes
        count = max(1, d["autoscaling_config"]["min_replicas"]) if "autoscaling_config" in d else d.get("num_replicas", 1)
        cpus += count * d["ray_actor_options"]["num_cpus"]
        gpus += count * d["ray_actor_options"]["num_gpus"]
    return cpus, gpus


def test_the_shipped_config_does_not_fit_two_cores_as_written_and_fits_once_fitted():
    assert _demand(CONFIG)[0] > 2  # why the app never reached RUNNING on a 2-core machine
    for cpus in (1, 2, 3, 16):
        fitted, changes = fit_to_node(CONFIG, cpus, 1)
        need_cpus, need_gpus = _demand(fitted)
        assert need_cpus <= cpus + 1e-9 and need_gpus <= 1 + 1e-9, (cpus, changes)
        for d in fitted["applications"][0]["deployments"]:
            scaling = d.get("autoscaling_config")
            if scaling:  # no autoscaled replica waits forever for a node that never comes
                assert 1 <= max(1, scaling["min_replicas"]) <= scaling["max_replicas"]
                others = need_cpus - max(1, scaling["min_replicas"]) * d["ray_actor_options"]["num_cpus"]
                assert others + scaling["max_replicas"] * d["ray_actor_options"]["num_cpus"] <= cpus + 1e-9


def test_two_cores_keep_every_deployment_and_say_what_changed():
    fitted, changes = fit_to_node(CONFIG, 2, 1)
    pre = next(d for d in fitted["applications"][0]["deployments"] if d["name"] == "PreprocessDeployment")
    assert pre["autoscaling_config"]["min_replicas"] == 1 and pre["ray_actor_options"]["num_cpus"] == 1
    assert any(line.startswith("PreprocessDeployment: 2 -> 1 replicas") for line in changes)
    assert fit_to_node(CONFIG, 64, 8)[0]["applications"][0]["deployments"][1]["autoscaling_config"][
        "min_replicas"] == 2  # a big machine keeps the minimum as written
