"""GPU deployment of the GFPGAN engine: faces batched across requests; backgrounds go to
the Real-ESRGAN deployment through its handle."""
from __future__ import annotations

import asyncio
import logging
from collections import Counter

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppArgs, RuntimeConfig
from serve_app.deployments.models import EngineCache
from serve_app.deployments.threads import Workers
from serve_app.engines.device import resolve_device
from serve_app.engines.faces import FaceEngine, load_face_engine
from serve_app.errors import InvalidOption
from serve_app.weights import WeightsStore

log = logging.getLogger("ray.serve")


@serve.deployment
class FaceDeployment:
    def __init__(self, args: AppArgs, upscaler: DeploymentHandle):
        self.args, self.upscaler, self.store = args, upscaler, WeightsStore(args.weights)
        self.runtime = RuntimeConfig()
        self.engines = EngineCache(self._load)
        self.batch_sizes: Counter[int] = Counter()
        self.workers = Workers()
        self.device = str(resolve_device(args.device))
        log.info("GFPGAN deployment on %s", self.device)
        self.engines.preload([(name,) for name in args.face_models])

    def _load(self, name: str) -> FaceEngine:
        return load_face_engine(name, self.store, self.runtime.engine(self.args.device),
                                max_faces=self.runtime.limits.max_faces)

    def reconfigure(self, user_config: dict) -> None:
        runtime = RuntimeConfig.model_validate(user_config)
        reload = (runtime.precision, runtime.limits.max_faces) != (self.runtime.precision,
                                                                   self.runtime.limits.max_faces)
        self.runtime = runtime
        self._restore_batch.set_max_batch_size(runtime.face_batch_size)
        self._restore_batch.set_batch_wait_timeout_s(runtime.face_batch_wait_s)
        if reload:
            self.engines.clear()
            self.engines.preload([(name,) for name in self.args.face_models])

    async def restore(self, pixels: np.ndarray, face_model: str, model: str | None, upscale: float,
                      strength: float = 1.0, only_center_face: bool = False,
                      aligned: bool = False) -> tuple[np.ndarray, int]:
        if face_model not in self.args.face_models:
            raise InvalidOption(f"face_model must be one of {', '.join(self.args.face_models)}")
        engine = self.engines.get(face_model)
        # Detection runs RetinaFace on the device: the device thread.
        job = await self.workers.device(engine.prepare, pixels, only_center_face=only_center_face, aligned=aligned)
        # The background is upscaled on the Real-ESRGAN deployment while the faces are restored here.
        background = None
        if model is not None and not aligned:
            background = self.upscaler.upscale.remote(pixels, model, outscale=upscale)
        restored = await asyncio.gather(*(self._restore_batch((engine, strength, c)) for c in job.crops))
        bg = await background if background is not None else None
        # Pasting parses each face with ParseNet: device work as well.
        result = await self.workers.device(engine.finish, job, list(restored), upscale=upscale, aligned=aligned,
                                           background=(lambda img, up: bg) if bg is not None else None)
        return result.image, result.faces_restored

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _restore_batch(self, items: list[tuple[FaceEngine, float, np.ndarray]]) -> list[np.ndarray]:
        """One GFPGAN pass per model and strength over the faces of every waiting request."""
        self.batch_sizes[len(items)] += 1
        groups: dict[tuple, list[int]] = {}
        for i, (engine, strength, _) in enumerate(items):
            groups.setdefault((id(engine), strength), []).append(i)
        results: list[np.ndarray | None] = [None] * len(items)
        for indices in groups.values():
            engine, strength, _ = items[indices[0]]
            faces = await self.workers.device(engine.restore, [items[i][2] for i in indices], strength=strength)
            for i, face in zip(indices, faces):
                results[i] = face
        return results

    async def stats(self) -> dict:
        return {"device": self.device, "failures": dict(self.engines.failures),
                "batch_sizes": dict(self.batch_sizes)}
