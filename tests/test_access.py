"""API keys and rate limits, apart from Ray: the key command, the key ring and its sources, the
rule that keeps a keyless service on localhost, and token buckets here and in a real Redis."""
from __future__ import annotations

import asyncio
import time

import pytest
import yaml

from serve_app.access import keys as keys_module
from serve_app.access.cli import main as keys_command
from serve_app.access.keys import KeyRing, key_hash
from serve_app.access.limits import RateLimiter
from serve_app.config import AuthConfig, RateLimitConfig
from serve_app.errors import Forbidden, RateLimited, TooManyPixels, Unauthorized
from serve_app.jobs.broker import LocalBroker
from serve_app.launch import _listen_as_keys_allow


def _created(capsys, *argv) -> tuple[str, dict]:
    """The key ``restore-serve-keys create`` prints, and its entry."""
    assert keys_command(["create", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = next(line for line in lines if line.startswith("rsk_"))
    entry = yaml.safe_load("\n".join(line for line in lines if not line.startswith(("#", "rsk_"))))[0]
    return key, entry


def test_a_created_key_is_printed_once_with_the_entry_that_admits_it(capsys):
    key, entry = _created(capsys, "alice", "--scopes", "restore,admin")
    assert entry == {"name": "alice", "hash": key_hash(key), "scopes": ["restore", "admin"]}
    assert key not in yaml.safe_dump(entry) and len(key) > 40
    ring = KeyRing(AuthConfig(keys=[entry], keys_env=None))
    assert ring.identify(f"Bearer {key}", "restore").name == "alice"
    assert ring.identify(f"bearer  {key} ", None).name == "alice"  # any key will do for ANY_KEY routes
    with pytest.raises(Forbidden, match="lacks the scope 'jobs'"):
        ring.identify(f"Bearer {key}", "jobs")
    for header in (None, "", f"Basic {key}", "Bearer ", f"Bearer {key}x", "Bearer rsk_guess"):
        with pytest.raises(Unauthorized) as refused:
            ring.identify(header, "restore")
        assert refused.value.status == 401 and refused.value.headers()["www-authenticate"].startswith("Bearer")
    with pytest.raises(SystemExit):  # a name the config would refuse is refused before a key is shown
        keys_command(["create", "two words"])
    assert "rsk_" not in capsys.readouterr().out


def test_the_hash_command_gives_the_hash_of_a_key_on_stdin(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("rsk_example\n"))
    assert keys_command(["hash"]) == 0
    assert capsys.readouterr().out.strip() == key_hash("rsk_example")


def test_keys_from_a_file_and_a_variable_are_read_again_when_they_change(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(keys_module, "_RECHECK_S", 0.0)
    (a, entry_a), (b, entry_b) = _created(capsys, "a"), _created(capsys, "b")
    path = tmp_path / "keys.yaml"
    ring = KeyRing(AuthConfig(keys_file=path, keys_env="TEST_API_KEYS"))
    assert len(ring) == 0  # a file that does not exist (yet) gives none
    path.write_text(yaml.safe_dump([entry_a]))
    assert ring.identify(f"Bearer {a}", "jobs").name == "a"
    monkeypatch.setenv("TEST_API_KEYS", yaml.safe_dump({"keys": [entry_b]}))
    assert ring.identify(f"Bearer {b}", "jobs").name == "b" and len(ring) == 2
    path.write_text("[]")  # a revoked: gone at the next look, no redeploy
    with pytest.raises(Unauthorized):
        ring.identify(f"Bearer {a}", "jobs")
    path.write_text("- {name: c, hash: not-a-hash}")  # a broken edit keeps the keys read before
    assert ring.identify(f"Bearer {b}", "jobs").name == "b"
    monkeypatch.setenv("TEST_API_KEYS", yaml.safe_dump([entry_b, entry_b]))
    assert len(ring) == 1  # two keys of one name: the change is refused too
    with pytest.raises(ValueError, match="not a YAML list of keys"):  # at start, a broken source is an error
        KeyRing(AuthConfig(keys_file=path, keys_env=None))


def test_with_no_keys_the_service_serves_only_on_localhost_unless_told_otherwise(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("RESTORE_SERVE_API_KEYS", raising=False)
    none = {"keys_file": tmp_path / "absent.yaml"}
    for host in ("127.0.0.1", "localhost", "::1"):
        assert KeyRing(AuthConfig(**none), host).caller(None, "restore") is None  # keyless, on localhost
    with pytest.raises(ValueError, match="no API keys"):
        KeyRing(AuthConfig(**none), "0.0.0.0")
    assert KeyRing(AuthConfig(required=False, **none), "0.0.0.0").caller(None, "restore") is None
    key, entry = _created(capsys, "ops")
    ring = KeyRing(AuthConfig(keys=[entry], **none), "127.0.0.1")
    with pytest.raises(Unauthorized):  # with keys, even localhost asks for one
        ring.caller(None, "restore")
    assert ring.caller(f"Bearer {key}", "restore").name == "ops"
    with pytest.raises(ValueError, match="choose one"):
        AuthConfig(keys=[entry], required=False)

    # restore-serve on one machine: keyless, it binds localhost whatever the config says, and says so
    def launched(auth: dict) -> str:
        config = {"http_options": {"host": "0.0.0.0", "port": 8000},
                  "applications": [{"args": {"auth": {**auth, "keys_file": str(none["keys_file"])}}}]}
        _listen_as_keys_allow(config)
        return config["http_options"]["host"]

    assert launched({}) == "127.0.0.1"
    assert launched({"required": False}) == "0.0.0.0"
    assert launched({"keys": [entry]}) == "0.0.0.0"
    monkeypatch.setenv("RESTORE_SERVE_API_KEYS", yaml.safe_dump([entry]))
    assert launched({}) == "0.0.0.0"


def test_fetch_writes_the_key_list_of_a_secret_for_the_ingress_to_read(tmp_path, capsys, monkeypatch):
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    key, entry = _created(capsys, "ops")
    path = tmp_path / "config" / "api-keys.yaml"
    with mock_aws():  # Secrets Manager as moto emulates it, in this process
        secrets = boto3.client("secretsmanager", region_name="us-west-2")
        secrets.create_secret(Name="restore-serve/api-keys", SecretString=yaml.safe_dump([entry]))
        secrets.create_secret(Name="broken", SecretString="- {name: x}")
        fetch = ["fetch", "--file", str(path), "--region", "us-west-2"]
        assert keys_command([*fetch, "restore-serve/api-keys"]) == 0
        assert "1 keys written" in capsys.readouterr().out
        with pytest.raises(ValueError, match="secret broken is not a YAML list of keys"):
            keys_command([*fetch, "broken"])
    assert path.stat().st_mode & 0o777 == 0o600 and not list(path.parent.glob("*.partial"))
    assert KeyRing(AuthConfig(keys_file=path, keys_env=None)).identify(f"Bearer {key}", "jobs").name == "ops"


# Slow rates: a refusal right after a burst stays a refusal however long a loaded machine takes.
LIMIT = RateLimitConfig(requests_per_s=0.01, request_burst=3, pixels_per_s=10, pixel_burst=5000)


def _outcomes(limiter: RateLimiter, name: str, n: int, limit: RateLimitConfig = LIMIT, **cost) -> list[int]:
    """0 for each take admitted, else the Retry-After it was refused with."""
    async def takes():
        out = []
        for _ in range(n):
            try:
                await limiter.take(name, limit, **cost)
                out.append(0)
            except RateLimited as refused:
                assert refused.status == 429 and refused.code == "rate_limited"
                out.append(int(refused.headers()["retry-after"]))
        return out
    return asyncio.run(takes())


def test_a_key_gets_its_burst_then_its_rate_and_other_keys_are_untouched():
    limiter = RateLimiter()
    busy = _outcomes(limiter, "busy", 5, requests=1)
    assert busy[:3] == [0, 0, 0] and all(95 <= wait <= 100 for wait in busy[3:])  # one each 100 s
    assert _outcomes(limiter, "calm", 3, requests=1) == [0, 0, 0]
    assert _outcomes(limiter, "busy", 1, pixels=4000) == [0]  # buckets apart: pixels still full
    assert 290 <= _outcomes(limiter, "busy", 1, pixels=4000)[0] <= 300  # 3000 short at 10 a second
    with pytest.raises(TooManyPixels, match="pixel burst"):  # it would never fit: 413, not 429
        asyncio.run(limiter.take("busy", LIMIT, pixels=6000))
    asyncio.run(limiter.take("busy", RateLimitConfig(), requests=100, pixels=10**9))  # no limits set
    quick = RateLimitConfig(requests_per_s=4, request_burst=1)
    assert _outcomes(limiter, "quick", 1, quick, requests=1) == [0]
    time.sleep(0.3)  # a refill of more than one request at 4 a second
    assert _outcomes(limiter, "quick", 1, quick, requests=1) == [0]


@pytest.fixture()
def redis_url(tmp_path):
    broker = LocalBroker(tmp_path / "broker")
    url = broker.start()
    yield url, broker
    broker.stop()


def test_replicas_draw_on_the_same_buckets_in_redis_and_alone_while_it_is_down(redis_url):
    url, broker = redis_url
    replicas = [RateLimiter(url) for _ in range(3)]  # as three ingress replicas hold them
    assert all(limiter.shared for limiter in replicas)
    admitted = [_outcomes(limiter, "busy", 2, requests=1) for limiter in replicas]
    assert sum(outcome == 0 for run in admitted for outcome in run) == 3  # one burst, not three
    assert _outcomes(replicas[0], "calm", 3, requests=1) == [0, 0, 0]
    broker.stop()  # Redis gone: each replica limits on its own rather than refuse or admit all
    assert [wait > 0 for wait in _outcomes(replicas[1], "busy", 4, requests=1)] == [False, False, False, True]


def test_beyond_localhost_a_key_list_emptied_later_refuses_everyone(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(keys_module, "_RECHECK_S", 0.0)
    key, entry = _created(capsys, "ops")
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump([entry]))
    ring = KeyRing(AuthConfig(keys_file=path, keys_env=None), "0.0.0.0")
    assert ring.caller(f"Bearer {key}", "jobs").name == "ops"
    path.write_text("[]")  # every key revoked: nobody gets in, rather than everybody
    for header in (None, f"Bearer {key}"):
        with pytest.raises(Unauthorized):
            ring.caller(header, "jobs")
