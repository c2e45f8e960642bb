"""What can be checked of the Dockerfile without a container daemon."""
import re
import tomllib
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)  # join continuation lines
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_base_image_matches_our_ray_and_python():
    base = dict(_instructions())["FROM"]
    match = re.fullmatch(r"rayproject/ray:(\S+)-py3(\d+)-cu\d+", base)
    assert match and "ray-ml" not in base
    assert match.group(1) == ray.__version__  # the Ray the tests ran
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert int(match.group(2)) >= int(requires.split(".")[1])


def test_installs_like_the_readme_and_runs_safely():
    instructions = _instructions()
    runs = [arg for op, arg in instructions if op == "RUN"]
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e '.[ncnn]'" in runs and "pip install -e '.[ncnn]'" in readme
    assert any("restore-serve-weights download --all" in r and "BAKE_WEIGHTS" in r for r in runs)
    assert ("ARG", "BAKE_WEIGHTS=0") in instructions  # off by default
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = dict(instructions)["HEALTHCHECK"]
    assert "/healthz" in health and "exit 0" not in health
    assert "OPENCV_IO_MAX_IMAGE_PIXELS=" in dict(instructions)["ENV"]
    # the launcher, which drains on docker stop's SIGTERM (serve run would cut requests off)
    assert dict(instructions)["CMD"] == '["restore-serve", "serve_config.yaml"]'
    assert dict(instructions)["STOPSIGNAL"] == "SIGTERM"
