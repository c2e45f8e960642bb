"""cluster.yaml checked offline with Ray's own cluster-launcher code (no AWS calls)."""
import copy
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_passes_rays_own_validation():
    raw = yaml.safe_load(CLUSTER.read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert types["head"]["resources"]["GPU"] == 0  # models never land on the head
    for name, node in types.items():
        if name != "head":
            assert node["min_workers"] == 0 and node["max_workers"] > 0 and node["resources"]["GPU"] >= 1
        assert node["node_config"]["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only


def test_cluster_yaml_security_and_setup():
    raw = yaml.safe_load(CLUSTER.read_text())
    # Left out, these default to installing a nightly Ray wheel over the image's own.
    assert raw["setup_commands"] == raw["head_setup_commands"] == raw["worker_setup_commands"] == []
    open_ports = [(p["FromPort"], p["ToPort"]) for p in raw["provider"]["security_group"]["IpPermissions"]]
    assert open_ports == [(8000, 8000)]  # never 8265, 6379 or 10001
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert all("RAY_AUTH_MODE=token" in " ".join(raw[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert raw["idle_timeout_minutes"] > 0 and raw["provider"]["cache_stopped_nodes"] is False
    assert any("restore-serve/weights" in option for option in raw["docker"]["run_options"])


def test_rays_validation_is_not_a_formality():
    raw = yaml.safe_load(CLUSTER.read_text())
    raw["available_node_types"]["head"]["node_config_typo"] = {}
    try:
        validate_config(prepare_config(raw))
    except Exception as exc:  # jsonschema's ValidationError
        assert "node_config_typo" in str(exc)
    else:
        raise AssertionError("a misspelt key passed Ray's schema")
