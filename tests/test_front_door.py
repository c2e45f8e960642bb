"""The README's main command on a 2-core machine, and the front door under abuse.

``restore-serve`` runs as a user runs it (its own Ray instance, 2 CPUs, one logical GPU, the
shipped serve_config.yaml with test weights and a shorter timeout), and is stopped with
SIGTERM at the end of the module. Everything goes over real HTTP.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import yaml


ROOT = Path(__file__).resolve().parent.parent
URL = "http://127.0.0.1:8000"
TIMEOUT_S, BODY_TIMEOUT_S, IN_FLIGHT = 30, 3, 4
RAY_PROCESSES = ("raylet", "gcs_server", "ray::", "dashboard.py", "log_monitor.py", "default_worker.py")


def _config(weights_dir: Path, cache: Path) -> dict:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())  # host 0.0.0.0, no API keys
    app = config["applications"][0]
    app["args"].update(device="cpu", upscalers=["RealESRGAN_x4plus", "realesr-animevideov3", "RealESRNet_x4plus"],
                       face_models=["GFPGANv1.4", "GFPGANv1.3"])  # RealESRNet_x4plus, GFPGANv1.3: no weights
    app["args"]["weights"] = {"folder": str(weights_dir), "cache_dir": str(cache), "download": False,
                              "retry_interval_s": 30}
    # The launcher starts its Redis there; a job whose consumer is lost is handed out again soon.
    app["args"]["jobs"] = {"data_dir": str(cache.parent / "jobs"), "visibility_timeout_s": 15}
    for d in app["deployments"]:
        d["user_config"] = {**d["user_config"], "request_timeout_s": TIMEOUT_S, "max_in_flight": IN_FLIGHT,
                            "body_timeout_s": BODY_TIMEOUT_S}
        if d["name"] == "Ingress":
            d["graceful_shutdown_timeout_s"] = 40
        if d["name"] == "JobConsumer":
            d["max_ongoing_requests"] = 1  # one job at a time: the others wait in the queue
    return config


def _ray_processes(names=RAY_PROCESSES) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in cmdline for name in names):
            found.append(f"{pid} {cmdline[:120]}")
    return found


def _wait_for(condition, timeout: float, what: str):
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _health() -> httpx.Response | None:
    try:
        return httpx.get(f"{URL}/healthz", timeout=5)
    except httpx.HTTPError:
        return None


def _png(img) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def _launch(config_path: Path, log_path: Path) -> subprocess.Popen:
    """The README's main command, as a user runs it; returned once the application is RUNNING."""
    command = [str(Path(sys.executable).parent / "restore-serve"), str(config_path), "--num-cpus", "2"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "RAY_SERVE_SLOW_STARTUP_WARNING_S": "5"})
    _wait_for(lambda: "RUNNING: listening" in log_path.read_text() or process.poll() is not None, 300,
              "the application RUNNING")
    assert process.poll() is None, log_path.read_text()[-3000:]
    return process


@pytest.fixture(scope="module")
def launched(weights_dir, tmp_path_factory):
    assert not _ray_processes(), "another Ray instance is running: this module starts its own"
    tmp = tmp_path_factory.mktemp("front_door")
    config_path = tmp / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(_config(weights_dir, tmp / "cache")))
    log_path = tmp / "restore-serve.log"
    state = {"process": _launch(config_path, log_path), "log": log_path, "config": config_path}
    try:
        yield state
    finally:
        process = state["process"]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                process.kill()
                subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)


def _serve_logs() -> list[dict]:
    """The JSON lines of the Serve logs of the Ray session now running."""
    lines = []
    for path in Path("/tmp/ray/session_latest/logs/serve").glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
    return lines


def test_the_main_command_reaches_running_on_two_cores(launched):
    log = launched["log"].read_text()
    assert "fitted to this machine: PreprocessDeployment: 2 -> 1 replicas at least, to fit 2 CPUs" in log
    # no API keys: it listens on localhost only, and says so
    assert "no API keys configured: listening on 127.0.0.1:8000 only, where no key is needed" in log
    assert _listeners(8000) == {"127.0.0.1"}
    # up and serving; two offered models have no weights: alive, and ready saying which
    assert _health().json() == {"status": "degraded", "detail": "some offered models are not loaded"}
    ready = httpx.get(f"{URL}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert {name for name, model in ready.json()["models"].items() if not model["loaded"]} == {
        "RealESRNet_x4plus", "GFPGANv1.3"}


def _listeners(port: int) -> set[str]:
    """The IPv4 addresses a TCP socket listens on at ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def test_a_default_photo_on_the_cpu_is_refused_at_once_naming_a_lighter_model(launched, astronaut_bgr):
    started = time.monotonic()
    r = httpx.post(f"{URL}/v1/restore", content=_png(astronaut_bgr), timeout=TIMEOUT_S)  # 512x512, defaults
    assert time.monotonic() - started < 10
    assert (r.status_code, r.json()["error"]) == (413, "too_much_work"), r.text
    assert "RealESRGAN_x4plus" in r.json()["detail"] and "model=realesr-animevideov3" in r.json()["detail"]


def test_a_request_whose_client_went_away_stops_its_running_pass(launched, astronaut_bgr, small_photo):
    slow = _png(np.ascontiguousarray(astronaut_bgr[:128, :128]))  # x4plus: about 9 s on two cores
    small = _png(small_photo)
    httpx.post(f"{URL}/v1/restore", params={"model": "realesr-animevideov3"}, content=small, timeout=60)  # warm
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{URL}/v1/restore", params={"model": "RealESRGAN_x4plus"}, content=slow, timeout=3)
    started = time.monotonic()
    r = httpx.post(f"{URL}/v1/restore", params={"model": "realesr-animevideov3"}, content=small, timeout=60)
    waited = time.monotonic() - started
    assert r.status_code == 200
    assert waited < 8, f"the abandoned x4plus pass held the upscaler for {waited:.1f} s"


def test_requests_for_a_missing_model_cost_the_others_no_more_than_any_refusal(launched, small_photo):
    """Four clients hammer a model whose weights are missing. Each of their requests is refused
    at once from the ingress's memory, never rebuilding the network or retrying the download, so
    the throughput left to everyone else is what four clients sending plainly invalid requests
    (refused by the ingress's option check) leave. On two cores any request costs the proxy and
    the ingress some CPU: that cost is the baseline."""
    picture = _png(small_photo)

    async def phase(bad_params: dict | None, seconds: float = 6.0) -> tuple[int, list]:
        ends = time.monotonic() + seconds
        refusals = []
        async with httpx.AsyncClient(base_url=URL, timeout=60) as http:
            async def good():
                done = 0
                while time.monotonic() < ends:
                    r = await http.post("/v1/restore", params={"model": "realesr-animevideov3"}, content=picture)
                    done += r.status_code == 200
                return done

            async def bad():
                while time.monotonic() < ends:
                    started = time.monotonic()
                    r = await http.post("/v1/restore", params=bad_params, content=picture)
                    refusals.append((r.status_code, r.json()["error"], time.monotonic() - started))
                    await asyncio.sleep(0.1)

            counts = await asyncio.gather(*(good() for _ in range(2)), *(bad() for _ in range(4 if bad_params else 0)))
        return sum(counts[:2]), refusals

    missing = {"model": "RealESRNet_x4plus"}
    invalid = {"model": "realesr-animevideov3", "scale": "-1"}
    alone, beside_invalid, beside_missing = asyncio.run(phase(None))[0], 0, 0
    for first, second in ((invalid, missing), (missing, invalid)):  # a drift of the machine's speed falls on both
        for bad in (first, second):
            done, refusals = asyncio.run(phase(bad))
            if bad is invalid:
                beside_invalid += done
                assert {(code, error) for code, error, _ in refusals} == {(400, "invalid_option")}
            else:
                beside_missing += done
                assert {(code, error) for code, error, _ in refusals} == {(503, "weights_unavailable")}
                assert max(seconds for *_, seconds in refusals) < 2.0  # refused at once, never rebuilt
    print(f"good requests in 6 s: {alone} alone; beside 4 clients of refused requests, "
          f"{beside_invalid / 2:.0f} (invalid option) and {beside_missing / 2:.0f} (missing model)")
    assert beside_missing >= 0.9 * beside_invalid, (alone, beside_invalid, beside_missing)


def test_a_face_request_whose_face_weights_are_missing_is_refused_before_its_background(launched, astronaut_bgr):
    picture = _png(np.ascontiguousarray(astronaut_bgr[:96, :96]))  # an x4plus background: about 5 s
    options = {"model": "RealESRGAN_x4plus", "face_enhance": "true", "face_model": "GFPGANv1.3"}
    for _ in range(2):  # the face replica's refusal stops the background; then the ingress knows
        started = time.monotonic()
        r = httpx.post(f"{URL}/v1/restore", params=options, content=picture, timeout=TIMEOUT_S)
        assert (r.status_code, r.json()["error"]) == (503, "weights_unavailable") and "GFPGANv1.3" in r.text
        assert time.monotonic() - started < 3


def test_a_burst_ten_times_what_the_graph_holds_gets_json_answers_in_time(launched, small_photo):
    holds = IN_FLIGHT * 4  # per ingress replica, four replicas
    picture = _png(small_photo)

    async def one(http):
        started = time.monotonic()
        r = await http.post("/v1/restore", params={"model": "realesr-animevideov3"}, content=picture)
        return r, time.monotonic() - started

    async def burst():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=URL, timeout=TIMEOUT_S + 30, limits=limits) as http:
            return await asyncio.gather(*(one(http) for _ in range(10 * holds)))

    answers = asyncio.run(burst())
    codes = [r.status_code for r, _ in answers]
    assert set(codes) <= {200, 503, 504} and 200 in codes and 503 in codes, codes
    for r, seconds in answers:
        assert seconds < TIMEOUT_S + 5
        if r.status_code != 200:
            assert r.json()["error"] in ("overloaded", "timeout"), r.text
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
    refused = sorted(s for r, s in answers if r.status_code == 503)
    accepted = sorted(s for r, s in answers if r.status_code == 200)
    # overload is said at once, not after a queue: faster than the work accepted
    assert refused[len(refused) // 2] < accepted[len(accepted) // 2] and refused[-1] < 10, (refused, accepted)


def test_slow_uploads_get_408_and_do_not_starve_normal_clients(launched, small_photo):
    picture = _png(small_photo)

    async def trickle() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", 8000)
        writer.write(b"POST /v1/restore HTTP/1.1\r\nHost: x\r\ncontent-type: image/png\r\n"
                     b"content-length: 100000\r\n\r\n")
        await writer.drain()
        answer = b""
        for _ in range(BODY_TIMEOUT_S * 4):
            try:
                writer.write(b"\0")  # a byte a second
                await writer.drain()
            except ConnectionError:  # answered and closed: the answer is still to read
                pass
            try:
                answer = await asyncio.wait_for(reader.read(4096), 1.0)
            except asyncio.TimeoutError:
                continue
            except ConnectionError:
                break
            if answer:
                break
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while answer and len(body) < length:  # the JSON body may come in a later read
            try:
                more = await asyncio.wait_for(reader.read(4096), 5.0)
            except (asyncio.TimeoutError, ConnectionError):
                break
            if not more:
                break
            body += more
        writer.close()
        return head.split(b"\r\n")[0] + b" " + body

    async def normal(http) -> list[float]:
        waits = []
        await asyncio.sleep(1.0)  # once every slow client holds its slot
        for _ in range(3):
            started = time.monotonic()
            r = await http.post("/v1/restore", params={"model": "realesr-animevideov3"}, content=picture)
            assert r.status_code == 200, r.text
            waits.append(time.monotonic() - started)
        return waits

    async def main():
        async with httpx.AsyncClient(base_url=URL, timeout=60) as http:
            return await asyncio.gather(normal(http), *(trickle() for _ in range(300)))

    waits, *answers = asyncio.run(main())
    assert max(waits) < 10, waits  # normal clients served while 300 slow ones trickle
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408") and b'"error":"body_timeout"' in a]
    assert len(timed_out) >= 250, sorted({a[:60] for a in answers if a not in timed_out})


def test_wrong_methods_request_ids_and_one_line_logs(launched):
    wrong = httpx.get(f"{URL}/v1/restore", timeout=10)
    assert (wrong.status_code, wrong.json()["error"], wrong.headers["allow"]) == (405, "method_not_allowed", "POST")
    bad = httpx.post(f"{URL}/v1/restore", content=b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                     headers={"x-request-id": "front-door-svg"}, timeout=10)
    assert bad.status_code == 415 and bad.headers.get_list("x-request-id") == ["front-door-svg"]
    for k in range(3):
        assert httpx.get(f"{URL}/healthz", headers={"x-request-id": f"front-door-health-{k}"}, timeout=10)

    def lines_of(request_id):
        return [line for line in _serve_logs() if line.get("request_id") == request_id]

    svg = _wait_for(lambda: lines_of("front-door-svg"), 20, "the refused request's log line")
    assert all("Traceback" not in line.get("message", "") and not line.get("exc_text") for line in svg), svg
    assert all(line["levelname"] in ("INFO", "WARNING") for line in svg), svg
    ingress = [line for line in svg if "unsupported_format" in line["message"] and "/v1/restore" in line["message"]]
    assert len(ingress) == 1, svg
    # Nothing at INFO for a health check, but Serve's note when a replica first uses a handle
    first_use = "Initialized DeploymentHandle"
    assert not [line for k in range(3) for line in lines_of(f"front-door-health-{k}")
                if line["levelname"] == "INFO" and not line["message"].startswith(first_use)]


# Generated requests in each of three rounds; more for a longer run (RESTORE_SERVE_FUZZ_EXAMPLES=2000).
FUZZ_EXAMPLES = int(os.environ.get("RESTORE_SERVE_FUZZ_EXAMPLES", 700))


def _front_replicas() -> dict[int, str]:
    """The ingress and CPU replicas running now: deployment by process id."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for deployment in ("Ingress", "PreprocessDeployment"):
            if cmdline.startswith(f"ray::ServeReplica:restore:{deployment}"):
                found[int(pid)] = deployment
    return found


def _front_memory() -> dict[int, dict]:
    """What each ingress and CPU replica reports of its memory in /v1/stats, by process id. Each
    call is answered by one ingress replica, as the proxy routes it, and reaches one CPU replica:
    asked until every replica has answered."""
    replicas, found = _front_replicas(), {}
    for _ in range(200):
        stats = httpx.get(f"{URL}/v1/stats", timeout=30).json()
        for deployment, part in (("Ingress", stats["ingress"]), ("PreprocessDeployment", stats["preprocess"])):
            found[part["pid"]] = {"deployment": deployment, **part["memory"]}
        if replicas.keys() <= found.keys():
            return {pid: found[pid] for pid in replicas}
    raise AssertionError(f"replicas {sorted(replicas.keys() - found.keys())} never answered /v1/stats")


def test_fuzzed_requests_get_typed_answers_in_time_and_leave_memory_flat(launched):
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    # The document the service serves, made from the schema it validates with; cases that fit it
    # and cases that break it (wrong types, out of bounds, missing fields, odd media types).
    schema = schemathesis.openapi.from_url(f"{URL}/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    counts: dict[int, int] = {}
    session = requests.Session()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def send(case):
        response = case.call(base_url=URL, session=session, timeout=TIMEOUT_S + 15)  # a hang fails here
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
        what = f"{case.method} {case.formatted_path}: {response.status_code} {response.content[:300]!r}"
        assert response.status_code < 500 or response.status_code in (503, 504), what
        if response.content == b"Invalid HTTP request received.":  # uvicorn, in Serve's proxy:
            assert response.status_code == 400, what  # a request HTTP cannot parse never reaches us
            counts["unparsable"] = counts.get("unparsable", 0) + 1
        elif response.status_code >= 400 and case.path not in ("/healthz", "/readyz"):
            assert set(response.json()) == {"error", "detail"}, what  # the typed JSON error, always

    started = time.monotonic()
    send()  # the first round warms every path
    warm = _front_memory()
    send()
    send()
    now = _front_memory()
    both = warm.keys() & now.keys()  # replicas through both rounds (a CPU replica may start or stop)

    def grown(figure: str, pids=both) -> float:
        return sum(now[pid][figure] - warm[pid][figure] for pid in pids)

    by_replica = {f"{now[pid]['deployment']} {pid}": (round(grown("malloc_live_bytes", [pid]) / 2**20, 1),
                                                     grown("python_blocks", [pid])) for pid in sorted(both)}
    statuses = {status: n for status, n in counts.items() if isinstance(status, int)}
    print(f"fuzzed: {sum(statuses.values())} requests in {time.monotonic() - started:.0f} s, by status "
          f"{dict(sorted(statuses.items()))} ({counts.get('unparsable', 0)} refused by the HTTP server as "
          f"unparsable); in the last two rounds the {len(both)} ingress and CPU replicas' C heaps grew by "
          f"{grown('malloc_live_bytes') / 2**20:.1f} MiB in use and {grown('malloc_kept_bytes') / 2**20:.1f} "
          f"MiB kept for reuse, their Python objects by {grown('python_blocks'):.0f} blocks, and their "
          f"resident size by {grown('resident_bytes') / 2**20:.1f} MiB; by replica (MiB in use, blocks): "
          f"{by_replica}")
    assert sum(statuses.values()) >= 3 * FUZZ_EXAMPLES
    assert sum(n for status, n in statuses.items() if 400 <= status < 500) > sum(statuses.values()) / 2  # malformed ones refused
    # Flat where every request goes: the ingress and the CPU replicas. Not their resident size,
    # which grows by steps over many rounds as they keep freed buffers for reuse
    # (serve_app/deployments/heap.py): 27 to 42 MiB in these two rounds. What they hold in use
    # grew 2 to 4 MiB and 13,000 to 49,000 small objects, spread over a few warming caches
    # (tracemalloc in the ingress found no allocation site growing round after round). A leak of
    # 9 KB, or of 70 small objects, a request fails here.
    assert grown("malloc_live_bytes") < 12 * 2**20 and grown("python_blocks") < 100_000, by_replica


def test_sigterm_drains_requests_in_flight_then_leaves_no_ray_process(launched, astronaut_bgr, small_photo):
    process = launched["process"]
    in_flight_picture = _png(np.ascontiguousarray(astronaut_bgr[:140, :140]))  # x4plus: about 10 s on two cores

    slow_job = _png(np.ascontiguousarray(astronaut_bgr[:96, :96]))

    async def main():
        async with httpx.AsyncClient(base_url=URL, timeout=60) as http:
            in_flight = asyncio.ensure_future(
                http.post("/v1/restore", params={"model": "RealESRGAN_x4plus"}, content=in_flight_picture))
            await asyncio.sleep(1.0)
            # Jobs the stop catches, one running and the rest queued (one consumer thread here):
            # the next test restarts the service for them. The drain lasts as long as the picture
            # in flight, whose tiles the jobs' tiles share the batches with, so the jobs are more
            # than the drain can finish.
            launched["jobs"] = [(await http.post("/v1/jobs", params={"model": "RealESRGAN_x4plus"},
                                                 content=slow_job)).json()["id"] for _ in range(8)]
            process.send_signal(signal.SIGTERM)

            async def probe():
                try:
                    r = await http.post("/v1/restore", params={"model": "realesr-animevideov3"},
                                        content=_png(small_photo))
                    return r.status_code, r.json().get("error") if r.status_code != 200 else None
                except httpx.HTTPError as exc:
                    return type(exc).__name__, None

            probes = []
            while not in_flight.done():  # new requests all along the drain
                probes.append(asyncio.ensure_future(probe()))
                await asyncio.sleep(0.3)
            return await in_flight, await asyncio.gather(*probes)

    answer, refused = asyncio.run(main())
    assert answer.status_code == 200, answer.text  # finished, not cut off
    assert (503, "draining") in refused and set(refused) <= {(200, None), (503, "draining")}, refused
    assert process.wait(90) == 0
    log = launched["log"].read_text()
    assert "draining: new requests get 503" in log and "stopped the Ray instance started here" in log
    assert "stopped the job queue's Redis" in log
    _wait_for(lambda: not _ray_processes(), 30, "every Ray process gone")
    assert not _ray_processes(("jobs/broker/redis.conf",))  # the job queue's Redis it started


def test_jobs_caught_by_a_stop_complete_after_a_restart(launched):
    # After the previous test's SIGTERM: the same command on the same configuration, whose
    # Redis and records are on disk under jobs.data_dir.
    from serve_app.jobs.records import JobRecords

    records = JobRecords(f"sqlite:///{launched['config'].parent / 'jobs' / 'jobs.db'}")
    caught = [job_id for job_id in launched["jobs"] if not records.get(job_id).final]
    records.close()
    assert caught, "every job ended before the stop: nothing to carry over"
    launched["process"] = _launch(launched["config"], launched["log"].with_name("restart.log"))

    def ended(job_id: str) -> dict | None:
        job = httpx.get(f"{URL}/v1/jobs/{job_id}", timeout=10).json()
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    for job_id in launched["jobs"]:
        done = _wait_for(lambda: ended(job_id), 240, f"job {job_id} after the restart")
        assert done["status"] == "succeeded", done
        assert httpx.get(f"{URL}/v1/jobs/{job_id}/result", timeout=10).status_code == 200
