"""GPU deployment of the Real-ESRGAN engine."""
from __future__ import annotations

import logging

import numpy as np
from ray import serve

from serve_app.config import AppArgs
from serve_app.deployments.models import EngineCache
from serve_app.engines.device import resolve_device
from serve_app.engines.upscaler import load_upscaler
from serve_app.errors import InvalidOption
from serve_app.weights import WeightsStore

log = logging.getLogger("ray.serve")


@serve.deployment
class UpscalerDeployment:
    def __init__(self, args: AppArgs):
        self.args = args
        store = WeightsStore(args.weights)
        self.engines = EngineCache(lambda name, denoise: load_upscaler(name, store, args.engine, denoise=denoise))
        log.info("Real-ESRGAN deployment on %s", resolve_device(args.engine.device))

    # async: Serve runs sync methods in a thread pool, where the same CUDA forward ran 6x slower.
    async def upscale(self, pixels: np.ndarray, model: str, outscale: float | None = None,
                      denoise: float | None = None, alpha_upsampler: str = "realesrgan") -> np.ndarray:
        if model not in self.args.upscalers:
            raise InvalidOption(f"model must be one of {', '.join(self.args.upscalers)}, not {model!r}")
        return self.engines.get(model, denoise).upscale([pixels], outscale=outscale,
                                                        alpha_upsampler=alpha_upsampler)[0]

    async def status(self) -> dict:
        return {"failures": dict(self.engines.failures)}
