"""The benchmark deploys serve_config.yaml as the service runs it, with fixed replica counts."""
from pathlib import Path

import yaml

from bench import served


def test_benchmark_config_keeps_the_files_replica_counts_and_fixes_the_autoscaled_ones(tmp_path):
    shipped = {d["name"]: d for d in yaml.safe_load((served.ROOT / "serve_config.yaml").read_text())
               ["applications"][0]["deployments"]}
    config = served.bench_config(tmp_path, Path(tmp_path / "cache"), tile=96, batch=2, compile_mode="off")
    deployed = {d["name"]: d for d in config["applications"][0]["deployments"]}
    cpu_replicas, _ = served.node_shares()
    assert deployed["Ingress"]["num_replicas"] == shipped["Ingress"]["num_replicas"] > 1
    assert deployed["PreprocessDeployment"]["num_replicas"] == cpu_replicas
    for name in ("UpscalerDeployment", "FaceDeployment"):  # one GPU replica each: figures per GPU
        assert deployed[name]["num_replicas"] == shipped[name]["autoscaling_config"]["min_replicas"] == 1
    assert not any("autoscaling_config" in d for d in deployed.values())
    assert all(d["ray_actor_options"]["num_gpus"] == shipped[n]["ray_actor_options"]["num_gpus"]
               for n, d in deployed.items())
