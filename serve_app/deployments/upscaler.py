"""GPU deployment of the Real-ESRGAN engine: fixed-shape tiles batched across requests."""
from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter

import numpy as np
import ray
from ray import serve

from serve_app.config import AppArgs, RuntimeConfig
from serve_app.deployments.models import EngineCache
from serve_app.deployments.threads import Workers
from serve_app.engines.device import resolve_device
from serve_app.engines.upscaler import Upscaler, load_upscaler
from serve_app.errors import InvalidOption
from serve_app.weights import WeightsStore, get_spec

log = logging.getLogger("ray.serve")


@serve.deployment
class UpscalerDeployment:
    def __init__(self, args: AppArgs):
        self.args, self.store = args, WeightsStore(args.weights)
        self.runtime = RuntimeConfig()
        self.engines = EngineCache(self._load)
        self.batch_sizes: Counter[int] = Counter()
        self.workers = Workers()
        self.device = str(resolve_device(args.device))
        log.info("Real-ESRGAN deployment on %s", self.device)
        self.engines.preload([(name, None) for name in args.upscalers])

    def _load(self, name: str, denoise: float | None) -> Upscaler:
        return load_upscaler(name, self.store, self.runtime.engine(self.args.device), denoise=denoise)

    def reconfigure(self, user_config: dict) -> None:
        runtime = RuntimeConfig.model_validate(user_config)
        reload = (runtime.tile, runtime.precision) != (self.runtime.tile, self.runtime.precision)
        self.runtime = runtime
        self._forward_batch.set_max_batch_size(runtime.tile.batch_size)
        self._forward_batch.set_batch_wait_timeout_s(runtime.upscaler_batch_wait_s)
        if reload:  # engines hold their tile shape and number format
            self.engines.clear()
            self.engines.preload([(name, None) for name in self.args.upscalers])

    # async: Serve runs sync methods in a thread pool, where the same CUDA forward ran 6x slower.
    async def upscale(self, pixels: np.ndarray, model: str, outscale: float | None = None,
                      denoise: float | None = None, alpha_upsampler: str = "realesrgan") -> np.ndarray:
        if model not in self.args.upscalers:
            raise InvalidOption(f"model must be one of {', '.join(self.args.upscalers)} or none, not {model!r}")
        if get_spec(model).denoise_twin is None or denoise == 1:
            denoise = None  # as the official script: only realesr-general-x4v3 blends
        elif denoise is not None:
            denoise = round(denoise, 2)  # bounds the networks kept per denoise value
        engine = self.engines.get(model, denoise)
        job = await self.workers.cpu(engine.prepare, pixels, outscale=outscale, alpha_upsampler=alpha_upsampler)
        outputs = await asyncio.gather(*(self._forward_batch((engine, x)) for x in job.inputs()))
        return await self.workers.cpu(engine.finish, job, list(outputs))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _forward_batch(self, items: list[tuple[Upscaler, np.ndarray]]) -> list[np.ndarray]:
        """One forward pass per engine and shape over the tiles of every waiting request."""
        self.batch_sizes[len(items)] += 1
        groups: dict[tuple, list[int]] = {}
        for i, (engine, x) in enumerate(items):
            groups.setdefault((id(engine), x.shape), []).append(i)
        results: list[np.ndarray | None] = [None] * len(items)
        for indices in groups.values():
            engine = items[indices[0]][0]
            batch = np.stack([items[i][1] for i in indices])
            for i, y in zip(indices, await self.workers.device(engine.forward, batch)):
                results[i] = y
        return results

    async def stats(self) -> dict:
        return {"device": self.device, "failures": dict(self.engines.failures), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "batch_sizes": dict(self.batch_sizes), "runtime": self.runtime.model_dump(mode="json")}
