"""restore-serve's stop, apart from Ray: it ends the session of processes it started, and no other."""
import subprocess
import sys
import time

from serve_app.launch import stop_session

# A parent that starts a child in its session and waits, as `ray start` leaves daemons and workers.
FAMILY = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"


def _alive(pid: int) -> bool:
    """Running, not ended (a zombie whose parent is gone waits to be reaped by init)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_stopping_a_session_ends_all_of_it_and_nothing_beside_it():
    ours = subprocess.Popen([sys.executable, "-c", FAMILY], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", FAMILY], start_new_session=True)  # another instance
    try:
        time.sleep(1.0)
        our_child, other_child = _children_of(ours.pid), _children_of(other.pid)
        assert our_child and other_child
        stop_session(ours.pid, grace_s=5)
        assert ours.wait(5) is not None  # ended (SIGTERM)
        assert not _alive(our_child[0])
        assert other.poll() is None and _alive(other_child[0])
    finally:
        stop_session(other.pid, grace_s=5)
        other.wait(5)
