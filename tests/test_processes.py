"""Each process imports what its role needs: the CPU replicas' code never loads torch or facexlib."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A replica imports its deployment's module (Serve pickles the class by reference), not the builder;
# the job modules run in the ingress and the job consumers.
CPU_SIDE = ["serve_app.imageio", "serve_app.cpu.tiles", "serve_app.cpu.paste", "serve_app.cpu.restore",
            "serve_app.api", "serve_app.deployments.preprocess", "serve_app.deployments.ingress",
            "serve_app.jobs.records", "serve_app.jobs.objects", "serve_app.jobs.urls", "serve_app.jobs.webhooks"]


def _loaded_after_importing(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout))


def test_the_cpu_replicas_and_the_ingress_import_neither_torch_nor_facexlib():
    loaded = _loaded_after_importing(CPU_SIDE)
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "facexlib", "basicsr", "torchvision")}


def test_the_client_and_the_batch_command_need_neither_ray_nor_torch():
    loaded = _loaded_after_importing(["serve_app.client", "serve_app.client.batch"])
    assert not {m for m in loaded if m.split(".")[0] in ("ray", "torch", "facexlib", "basicsr")}


def test_the_gpu_side_loads_them_only_when_imported():
    loaded = _loaded_after_importing(["serve_app.engines.upscaler"])
    assert "torch" in loaded
