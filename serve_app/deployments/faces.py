"""GPU deployment of the face networks: detect, restore (batched across requests), parse.

Pasting the faces back, and the background, are the CPU deployment's work.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter

import numpy as np
from ray import serve

from serve_app.config import AppArgs, RuntimeConfig
from serve_app.deployments.batching import DeviceBatcher
from serve_app.deployments.gpu import cap_gpu_memory, gpu_memory
from serve_app.deployments.models import EngineCache
from serve_app.deployments.threads import Workers
from serve_app.engines.device import resolve_device
from serve_app.engines.faces import FaceEngine, FoundFaces, load_face_engine
from serve_app.errors import InvalidOption
from serve_app.weights import WeightsStore

log = logging.getLogger("ray.serve")


@serve.deployment
class FaceDeployment:
    def __init__(self, args: AppArgs):
        self.args, self.store = args, WeightsStore(args.weights)
        self.runtime = RuntimeConfig()
        self.engines = EngineCache(self._load)
        self.batch_sizes: Counter[int] = Counter()
        self.batcher = DeviceBatcher(self._restore_batch, self.runtime.face_batch_size, self.runtime.face_batch_wait_s)
        self.workers = Workers()
        self.device = resolve_device(args.device)
        self.memory_fraction = cap_gpu_memory(self.device, self.runtime.gpu_memory_fraction)
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
        self.memory_fraction = cap_gpu_memory(self.device, runtime.gpu_memory_fraction)
        self.batcher.max_batch_size, self.batcher.wait_s = runtime.face_batch_size, runtime.face_batch_wait_s
        if reload:
            self.engines.clear()
            self.engines.preload([(name,) for name in self.args.face_models])

    async def restore(self, work: np.ndarray, face_model: str, strength: float = 1.0,
                      only_center_face: bool = False, aligned: bool = False
                      ) -> tuple[FoundFaces, list[np.ndarray], list[np.ndarray]]:
        """An 8-bit BGR picture -> its faces, their restored versions and their parse maps."""
        if face_model not in self.args.face_models:
            raise InvalidOption(f"face_model must be one of {', '.join(self.args.face_models)}")
        engine = self.engines.get(face_model)
        found = await self.workers.device(engine.find, work, only_center_face=only_center_face, aligned=aligned)
        restored = list(await asyncio.gather(*(self.batcher.submit((engine, strength, c)) for c in found.crops)))
        parsings = [] if aligned else await self.workers.device(engine.parse, restored)
        return found, restored, parsings

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
        return {"device": str(self.device), "failures": dict(self.engines.failures),
                "batch_sizes": dict(self.batch_sizes), "gpu_memory": gpu_memory(self.device, self.memory_fraction)}
