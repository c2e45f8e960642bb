"""cluster.yaml checked offline with Ray's own cluster-launcher code (no AWS calls)."""
import copy
import ipaddress
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from serve_app.access.keys import KeyRing, is_loopback
from serve_app.config import AuthConfig

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"


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
    assert raw["setup_commands"] == raw["worker_setup_commands"] == []
    assert raw["head_setup_commands"] == ["restore-serve-keys fetch restore-serve/api-keys --region us-west-2"]
    rules = raw["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in rules] == [(8000, 8000)]  # never 8265, 6379 or 10001
    # and only to the VPC, where the load balancer terminating TLS stands: never the world
    assert all(not ipaddress.ip_network(r["CidrIp"]).is_global for p in rules for r in p["IpRanges"])
    assert raw["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # Ray's token on every node
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert all("RAY_AUTH_MODE=token" in " ".join(raw[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    # Prometheus scrapes every node's metrics agent at one port, from inside the group
    assert all("--metrics-export-port=8080" in " ".join(raw[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
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


def test_the_shipped_serve_config_serves_a_cluster_only_with_keys(tmp_path, monkeypatch):
    # serve deploy serve_config.yaml listens on 0.0.0.0: with no key, the ingress would refuse to start
    monkeypatch.delenv("RESTORE_SERVE_API_KEYS", raising=False)
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    auth = AuthConfig.model_validate(config["applications"][0]["args"]["auth"])
    assert not is_loopback(config["http_options"]["host"]) and auth.required and not auth.keys
    with pytest.raises(ValueError, match="no API keys"):
        KeyRing(auth.model_copy(update={"keys_file": tmp_path / "none.yaml"}), config["http_options"]["host"])
    # the head fetches the keys into the file the shipped config names
    assert str(auth.keys_file) == str(AuthConfig().keys_file)
