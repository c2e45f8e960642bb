"""``restore-serve``: start a local Ray instance fit for serve_config.yaml, deploy the graph on it,
and drain it on Ctrl-C or SIGTERM.

serve_config.yaml gives the model deployments a fraction of a GPU each. A machine without
one would leave them unschedulable, so on such a machine Ray is started with one *logical*
GPU: the fractions place as they would on a GPU node, and the engines, finding no CUDA, run
on the CPU in fp32 (each deployment logs its device). Replica counts are fitted to the machine
(``node_fit``). When a Ray cluster is already running (``ray up``, ``ray start``), the
configuration is deployed on it as written.

Stopping drains: the ingress answers new requests 503 ``draining`` while those in flight
finish (up to the ingress's ``graceful_shutdown_timeout_s``), then Serve and the Ray instance
started here stop. ``serve run`` would stop Serve's HTTP proxies at once, cutting off every
request in flight.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

log = logging.getLogger("restore-serve")
APP_NAME, INGRESS = "restore", "Ingress"
# The ray command installed beside this Python (a virtual environment need not be activated).
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"


def _ray_is_running() -> bool:
    return subprocess.run([RAY, "status"], capture_output=True).returncode == 0


def ray_start_command(num_cpus: int | None = None) -> list[str]:
    import torch

    command = [RAY, "start", "--head", "--disable-usage-stats"]
    if not torch.cuda.is_available():
        command.append("--num-gpus=1")  # logical: lets the fractional GPU deployments place
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    return command


def _deploy(config: dict):
    """Start Serve as the config says and apply it: what ``serve run CONFIG`` does (its own
    functions), with the driver kept here so that stopping can drain first."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                                   grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                                   controller_options=schema.controller_options)
    client.deploy_apps(schema, _blocking=False)
    return client


def _report_until_running(stop: threading.Event) -> None:
    """Log, until the application runs, each deployment that is not HEALTHY and why (Serve names
    the resources a replica that cannot be placed needs)."""
    from ray import serve

    said: dict[str, str] = {}
    while not stop.wait(2.0):
        app = serve.status().applications.get(APP_NAME)
        if app is None:
            continue
        if app.status == "RUNNING":
            log.info("application %r RUNNING: listening", APP_NAME)
            return
        for name, deployment in app.deployments.items():
            line = f"{deployment.status} {dict(deployment.replica_states)} {deployment.message}".strip()
            if deployment.status != "HEALTHY" and said.get(name) != line:
                log.warning("%s: %s", name, line)
                said[name] = line


def _ingress_ongoing() -> int:
    """Requests inside the ingress replicas now, as Serve's own routers read it from each replica."""
    import ray

    prefix = f"SERVE_REPLICA::{APP_NAME}#{INGRESS}#"
    counts = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(prefix):
            replica = ray.get_actor(actor["name"], namespace=actor["namespace"])
            counts.append(replica.get_num_ongoing_requests.remote())
    return sum(ray.get(counts, timeout=10))


def drain(client, config: dict) -> None:
    """Turn the ingress to draining, wait for the requests it holds (at most its graceful
    timeout), then delete the application, Serve waiting for what is still in flight."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    draining = copy.deepcopy(config)
    ingress = next(d for d in draining["applications"][0]["deployments"] if d["name"] == INGRESS)
    ingress["user_config"] = {**ingress.get("user_config", {}), "draining": True}
    timeout = float(ingress.get("graceful_shutdown_timeout_s", 20))
    log.info("draining: new requests get 503; waiting up to %g s for those in flight", timeout)
    try:
        client.deploy_apps(ServeDeploySchema.model_validate(draining), _blocking=True)
    except Exception as exc:  # noqa: BLE001  still stop, without the wait
        log.warning("could not turn the ingress to draining: %s", exc)
        timeout = 0
    ends, quiet = time.monotonic() + timeout, 0
    while time.monotonic() < ends and quiet < 2:  # two readings in a row with nothing inside
        quiet = quiet + 1 if _ingress_ongoing() == 0 else 0
        time.sleep(0.2)
    serve.delete(APP_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restore-serve", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="serve_config.yaml")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the Ray instance started here (default: all of this machine's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s restore-serve %(levelname)s %(message)s")
    config = yaml.safe_load(Path(args.config).read_text())
    _listen_as_keys_allow(config)
    broker = _start_broker(config)
    started_here = "RAY_ADDRESS" not in os.environ and not _ray_is_running()
    ray_session = None
    if started_here:
        # In a session of its own, Ray's daemons do not get the terminal's Ctrl-C: this process
        # drains first, then stops them.
        starting = subprocess.Popen(ray_start_command(args.num_cpus), start_new_session=True)
        if starting.wait() != 0:
            raise SystemExit(f"ray start failed ({starting.returncode})")
        ray_session = starting.pid
        address = _ray_address_file()
        started_address = address.read_text() if address.exists() else None
    try:
        return _serve(config, started_here)
    finally:
        if ray_session is not None:
            stop_session(ray_session)
            if address.exists() and address.read_text() == started_address:
                address.unlink()  # as `ray stop` does: the next `ray status` finds no cluster
            log.info("stopped the Ray instance started here")
        if broker is not None:
            broker.stop()
            log.info("stopped the job queue's Redis")


def _ray_address_file() -> Path:
    """Where `ray start` writes the address of the instance it began (``ray status`` reads it)."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def stop_session(session: int, grace_s: float = 15.0) -> None:
    """Stop every process of ``session``: the Ray instance ``ray start`` began there, its daemons
    and workers (they keep the session they were born in). ``ray stop`` would end every Ray
    process on the machine, other users' instances included. SIGTERM first, SIGKILL after
    ``grace_s``."""
    def members() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    # fields after the name in parentheses: state, ppid, pgrp, session
                    state, _, _, sid = stat.rsplit(")", 1)[1].split()[:4]
                except (OSError, ValueError):  # gone meanwhile
                    continue
                if int(sid) == session and state != "Z":  # a zombie has ended already
                    found.append(int(entry))
        return found

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in members():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        ends = time.monotonic() + wait_s
        while members() and time.monotonic() < ends:
            time.sleep(0.2)
        if not members():
            return


def _start_broker(config: dict):
    """Where the config names no broker for jobs, a private Redis under jobs.data_dir; the
    consumers' autoscaling policy polls the same broker."""
    from serve_app.config import JobsConfig
    from serve_app.jobs.autoscaling import with_queue_broker
    from serve_app.jobs.broker import LocalBroker

    jobs = config["applications"][0].setdefault("args", {}).setdefault("jobs", {})
    broker = None
    if not jobs.get("broker_url"):
        broker = LocalBroker(JobsConfig.model_validate(jobs).resolved_data_dir() / "broker")
        jobs["broker_url"] = broker.start()
        log.info("the job queue's Redis runs in %s", broker.folder)
    with_queue_broker(config)
    return broker


def _listen_as_keys_allow(config: dict) -> None:
    """With no API keys, listen on localhost only, where no key is needed (unless ``auth.required: false``
    says otherwise): the ingress would refuse to serve beyond it."""
    from serve_app.access.keys import KeyRing, is_loopback
    from serve_app.config import AuthConfig

    auth = AuthConfig.model_validate(config["applications"][0].get("args", {}).get("auth", {}))
    http = config.setdefault("http_options", {})
    host, port, keys = http.get("host", "127.0.0.1"), http.get("port", 8000), len(KeyRing(auth))
    if keys:
        log.info("%d API keys: listening on %s:%s; requests need 'Authorization: Bearer <key>'", keys, host, port)
    elif not auth.required:
        log.warning("auth.required is false: listening on %s:%s with no API key asked", host, port)
    elif is_loopback(host):
        log.info("listening on %s:%s; on localhost no API key is needed", host, port)
    else:
        http["host"] = "127.0.0.1"
        log.info("no API keys configured: listening on 127.0.0.1:%s only, where no key is needed; "
                 "configure auth.keys (restore-serve-keys create) to listen on %s", port, host)


def _serve(config: dict, started_here: bool) -> int:
    import ray
    from ray import serve

    from serve_app.node_fit import fit_to_node

    ray.init(address="auto", namespace="serve", log_to_driver=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, whose core worker installs its own
        signal.signal(sig, lambda *_: stop.set())
    if started_here:
        resources = ray.cluster_resources()
        config, changes = fit_to_node(config, resources.get("CPU", 0), resources.get("GPU", 0))
        for change in changes:
            log.info("fitted to this machine: %s", change)
    client = _deploy(config)
    _report_until_running(stop)
    stop.wait()
    drain(client, config)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
