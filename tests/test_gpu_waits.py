"""GPU replicas sleep while the GPU works (serve_app.deployments.gpu.sleep_while_gpu_works)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import has_cuda_driver

from serve_app.deployments import gpu

_IN_A_FRESH_PROCESS = """
import json
from serve_app.deployments.gpu import gpu_waits, sleep_while_gpu_works
before = gpu_waits()
print(json.dumps({"before": before, "set": sleep_while_gpu_works(), "after": gpu_waits()}))
"""


def test_the_setting_takes_where_a_cuda_driver_is_and_is_skipped_where_none_is():
    # A fresh process, as a replica starts: the setting is made before any CUDA context.
    out = subprocess.run([sys.executable, "-c", _IN_A_FRESH_PROCESS], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    if has_cuda_driver():
        assert seen == {"before": "auto", "set": True, "after": "sleep"}
    else:  # this CPU machine, and CI: nothing to set, and nothing fails
        assert seen == {"before": None, "set": False, "after": None}


def test_the_setting_still_takes_once_pytorch_holds_its_cuda_context():
    # Where a context already exists (a replica whose device was touched first) the driver
    # overwrites its flags; on a CPU machine both calls answer that there is no driver.
    import torch

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
        assert gpu.sleep_while_gpu_works() and gpu.gpu_waits() == "sleep"
    else:
        assert gpu.sleep_while_gpu_works() is False and gpu.gpu_waits() is None
