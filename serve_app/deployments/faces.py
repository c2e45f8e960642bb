"""GPU deployment of the GFPGAN engine; backgrounds go to the Real-ESRGAN deployment."""
from __future__ import annotations

import logging

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppArgs
from serve_app.deployments.models import EngineCache
from serve_app.engines.device import resolve_device
from serve_app.engines.faces import load_face_engine
from serve_app.errors import InvalidOption
from serve_app.weights import WeightsStore

log = logging.getLogger("ray.serve")


@serve.deployment
class FaceDeployment:
    def __init__(self, args: AppArgs, upscaler: DeploymentHandle):
        self.args, self.upscaler = args, upscaler
        store = WeightsStore(args.weights)
        self.engines = EngineCache(
            lambda name: load_face_engine(name, store, args.engine, max_faces=args.limits.max_faces))
        log.info("GFPGAN deployment on %s", resolve_device(args.engine.device))

    async def restore(self, pixels: np.ndarray, face_model: str, model: str | None, upscale: float,
                      strength: float = 1.0, only_center_face: bool = False,
                      aligned: bool = False) -> tuple[np.ndarray, int]:
        if face_model not in self.args.face_models:
            raise InvalidOption(f"face_model must be one of {', '.join(self.args.face_models)}")
        engine = self.engines.get(face_model)
        job = engine.prepare(pixels, only_center_face=only_center_face, aligned=aligned)
        # Start the background on the upscaler while the faces are restored here.
        background = None
        if model is not None and not aligned:
            background = self.upscaler.upscale.remote(pixels, model, outscale=upscale)
        restored = engine.restore(job.crops, strength=strength)
        bg = await background if background is not None else None
        result = engine.finish(job, restored, upscale=upscale, aligned=aligned,
                               background=(lambda img, up: bg) if bg is not None else None)
        return result.image, result.faces_restored

    async def status(self) -> dict:
        return {"failures": dict(self.engines.failures)}
