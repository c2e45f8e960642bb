"""What the ingress and the consumers share: the retention sweep, on a SQLite file and a folder."""
from __future__ import annotations

from datetime import timedelta

import pytest

from serve_app.config import JobsConfig
from serve_app.jobs.records import now
from serve_app.jobs.system import JobSystem


def test_the_sweep_removes_expired_jobs_with_their_inputs_and_results(tmp_path):
    brief = JobSystem(JobsConfig(data_dir=tmp_path, retention_s=10))  # the retention a job was made under
    kept = JobSystem(JobsConfig(data_dir=tmp_path, retention_s=3600))  # same records and folder
    old, _ = brief.records.create(options={}, input_key="inputs/old")
    brief.objects.put("inputs/old", b"in", "application/octet-stream")
    brief.objects.put("results/old.png", b"out", "image/png")
    brief.records.succeed(old.id, brief.records.start(old.id), {"key": "results/old.png", "format": "png"})
    young, _ = kept.records.create(options={}, input_key="inputs/young")
    kept.objects.put("inputs/young", b"in", "application/octet-stream")
    assert kept.sweep() == 0 and kept.records.get(old.id) is not None  # within its 10 s
    assert kept.sweep(now() + timedelta(seconds=60)) == 1
    assert kept.records.get(old.id) is None and kept.records.get(young.id) is not None
    for key in ("inputs/old", "results/old.png"):
        with pytest.raises(KeyError):
            kept.objects.get(key)
    assert kept.objects.get("inputs/young") == b"in"
    brief.records.close()
    kept.records.close()
