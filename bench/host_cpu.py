"""Where the node's cores go while a load runs: the whole host, and each kind of process.

The CPU deployment's step times count only its own work. A node also runs the HTTP proxy, the
ingress replicas, the GPU replicas' Python, Ray's own daemons and, in the benchmark, the load
generator; ``HostCpu`` reads Linux's /proc around a load so the cores one GPU needs are counted
whole, and the busiest moment is seen beside the average (a node that is busy on average only
half the time can still be saturated for the second a request's tail is made in).
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from pathlib import Path

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
LOAD_GENERATOR = "load generator (this process)"


def host_busy_ticks(stat: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all cores together, from the text of /proc/stat."""
    fields = [int(v) for v in stat.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user time
    return total - idle, total


def process_ticks(stat: str) -> int:
    """User + system clock ticks of one process, from the text of /proc/PID/stat."""
    after_name = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and brackets
    return int(after_name[11]) + int(after_name[12])  # fields 14 and 15: utime, stime


def process_kind(cmdline: str, pid: int, own_pid: int) -> str:
    """A short name for the kind of process: a Serve deployment, a Ray daemon, or the client."""
    if pid == own_pid:
        return LOAD_GENERATOR
    replica = re.search(r"ServeReplica:[^:\s]+:([A-Za-z_]+)", cmdline)
    if replica:
        return replica.group(1)
    for marker, kind in (("ProxyActor", "HTTP proxy"), ("ServeController", "Serve controller"),
                         ("raylet", "raylet"), ("gcs_server", "GCS"), ("dashboard", "dashboard"),
                         ("ray::", "other Ray workers"), ("ray", "other Ray processes")):
        if marker in cmdline:
            return kind
    return "other"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # a process that ended between the listing and the read
        return None


def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (cmdline, cpu ticks) of every process visible now."""
    found = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat, cmdline = _read(entry / "stat"), _read(entry / "cmdline")
        if stat is not None and cmdline is not None:
            found[int(entry.name)] = (cmdline.replace("\0", " ").strip(), process_ticks(stat))
    return found


class HostCpu:
    """Busy cores of the host and per kind of process over a ``with`` block, and the busiest
    ``interval_s`` window of the host inside it."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.report: dict = {}
        self._stop = threading.Event()
        self._windows: list[float] = []

    def __enter__(self) -> HostCpu:
        self._start_wall, self._start_host = time.perf_counter(), host_busy_ticks(_read(PROC / "stat"))
        self._start_procs = _processes()
        self._sampler = threading.Thread(target=self._sample, daemon=True, name="host-cpu")
        self._sampler.start()
        return self

    def _sample(self) -> None:
        last = host_busy_ticks(_read(PROC / "stat"))
        while not self._stop.wait(self.interval_s):
            now = host_busy_ticks(_read(PROC / "stat"))
            if now[1] > last[1]:
                self._windows.append((now[0] - last[0]) / (now[1] - last[1]))
            last = now

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sampler.join()
        wall = time.perf_counter() - self._start_wall
        busy, total = host_busy_ticks(_read(PROC / "stat"))
        cores = os.cpu_count() or 1
        share = (busy - self._start_host[0]) / max(1, total - self._start_host[1])
        by_kind: Counter[str] = Counter()
        own = os.getpid()
        for pid, (cmdline, ticks) in _processes().items():
            before = self._start_procs.get(pid, (cmdline, 0))[1]
            by_kind[process_kind(cmdline, pid, own)] += (ticks - before) / _TICKS / wall
        self.report = {
            "host_cores": cores,
            "busy_cores": round(share * cores, 2),
            f"busiest_{self.interval_s:g}s_busy_cores": round(max(self._windows, default=share) * cores, 2),
            "cores_by_process": {kind: round(v, 2) for kind, v in by_kind.most_common() if v >= 0.01},
        }
