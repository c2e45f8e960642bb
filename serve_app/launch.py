"""``restore-serve``: start a local Ray instance fit for serve_config.yaml, then ``serve run`` it.

serve_config.yaml gives the model deployments a fraction of a GPU each. A machine without
one would leave them unschedulable, so on such a machine Ray is started with one *logical*
GPU: the fractions place as they would on a GPU node, and the engines, finding no CUDA, run
on the CPU in fp32 (each deployment logs its device). On a GPU machine Ray counts the real
GPUs. When a Ray cluster is already running (``ray up``, ``ray start``), use ``serve run`` or
``serve deploy`` directly instead.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _ray_is_running() -> bool:
    return subprocess.run(["ray", "status"], capture_output=True).returncode == 0


def ray_start_command() -> list[str]:
    import torch

    command = ["ray", "start", "--head", "--disable-usage-stats"]
    if not torch.cuda.is_available():
        command.append("--num-gpus=1")  # logical: lets the fractional GPU deployments place
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restore-serve", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="serve_config.yaml")
    args = parser.parse_args(argv)
    started_here = False
    if "RAY_ADDRESS" not in os.environ and not _ray_is_running():
        subprocess.run(ray_start_command(), check=True)
        started_here = True
    try:
        return subprocess.run(["serve", "run", args.config]).returncode
    except KeyboardInterrupt:
        return 0
    finally:
        if started_here:
            subprocess.run(["ray", "stop"], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
