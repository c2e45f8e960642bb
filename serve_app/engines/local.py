"""The networks in this process, for the one orchestration of a request (``serve_app.cpu.restore``):
how tests, the benchmark and notebooks restore a picture the way the service does, without Ray.

    networks = LocalNetworks(WeightsStore(WeightsConfig()), EngineConfig(device="cuda"))
    restored = restore_image(pixels, RestoreOptions(face_enhance=True), networks)
"""
from __future__ import annotations

import asyncio

import numpy as np

from serve_app.api import Restored, RestoreOptions
from serve_app.config import EngineConfig
from serve_app.cpu.restore import FaceSteps, restore
from serve_app.engines.faces import FaceEngine, load_face_engine
from serve_app.engines.upscaler import Upscaler, load_upscaler


class LocalNetworks:
    """Engines loaded on first use from ``store`` with ``engine``'s settings, one request at a time."""

    def __init__(self, store, engine: EngineConfig, *, max_faces: int = 20):
        self.store, self.engine, self.max_faces = store, engine, max_faces
        self.upscalers: dict[tuple[str, float | None], Upscaler] = {}
        self.face_engines: dict[str, FaceEngine] = {}

    def upscaler(self, name: str, denoise: float | None = None) -> Upscaler:
        if (name, denoise) not in self.upscalers:
            self.upscalers[name, denoise] = load_upscaler(name, self.store, self.engine, denoise=denoise)
        return self.upscalers[name, denoise]

    def face_engine(self, name: str) -> FaceEngine:
        if name not in self.face_engines:
            shared = next(iter(self.face_engines.values()), None)
            self.face_engines[name] = load_face_engine(name, self.store, self.engine, max_faces=self.max_faces,
                                                       share_with=shared)
        return self.face_engines[name]

    async def upscale(self, model: str, denoise: float | None, inputs: np.ndarray,
                      deadline: float | None) -> np.ndarray:
        return np.stack(self.upscaler(model, denoise).forward_all(list(inputs)))

    async def faces(self, work: np.ndarray, options: RestoreOptions, deadline: float | None) -> FaceSteps:
        return self.face_engine(options.face_model).restore_found(
            work, only_center_face=options.only_center_face, aligned=options.aligned,
            strength=options.face_strength)


def restore_image(pixels: np.ndarray, options: RestoreOptions, networks: LocalNetworks) -> Restored:
    """``pixels`` (as ``imageio.decode`` gives them) restored as the service would, here."""
    return asyncio.run(restore(pixels, options, networks, tile=networks.engine.tile))
