import os
import threading
import time

from bench.host_cpu import LOAD_GENERATOR, HostCpu, host_busy_ticks, process_kind, process_ticks


def test_host_ticks_count_idle_and_iowait_as_not_busy():
    stat = "cpu  100 5 50 800 40 3 2 0 7 0\ncpu0 50 2 25 400 20 1 1 0 3 0\n"
    assert host_busy_ticks(stat) == (100 + 5 + 50 + 3 + 2, 1000)


def test_process_ticks_read_past_a_name_with_spaces_and_brackets():
    stat = "4242 (ray::Serve (x) y) S 1 2 3 4 5 6 7 8 9 10 111 222 0 0 20 0 1 0 5 6 7"
    assert process_ticks(stat) == 333


def test_processes_are_named_by_deployment_or_daemon():
    assert process_kind("ray::ServeReplica:restore:PreprocessDeployment", 10, 1) == "PreprocessDeployment"
    assert process_kind("ray::ServeReplica:restore:FaceDeployment.restore", 10, 1) == "FaceDeployment"
    assert process_kind("ray::ProxyActor", 10, 1) == "HTTP proxy"
    assert process_kind("/venv/lib/ray/core/src/ray/raylet/raylet --node", 10, 1) == "raylet"
    assert process_kind("python -m bench.run", 7, 7) == LOAD_GENERATOR
    assert process_kind("sshd: root", 10, 1) == "other"


def test_a_spinning_thread_shows_as_this_process_and_as_host_load():
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=spin)
    with HostCpu(interval_s=0.1) as host:
        worker.start()
        time.sleep(1.0)
        stop.set()
        worker.join()
    report = host.report
    assert report["host_cores"] == os.cpu_count()
    own = report["cores_by_process"][LOAD_GENERATOR]
    assert 0.2 < own <= 1.2  # one Python thread: at most about one core
    assert report["busy_cores"] >= own - 0.1  # the host's busy time holds this process's
    assert report["busiest_0.1s_busy_cores"] >= report["busy_cores"] - 0.1
