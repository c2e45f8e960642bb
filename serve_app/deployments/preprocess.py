"""CPU deployment: header limits, the one decode, and the one encode."""
from __future__ import annotations

import numpy as np
from ray import serve

from serve_app.config import RuntimeConfig
from serve_app.imageio import DecodedImage, decode, encode


@serve.deployment
class PreprocessDeployment:
    def __init__(self):
        self.limits = RuntimeConfig().limits

    def reconfigure(self, user_config: dict) -> None:
        self.limits = RuntimeConfig.model_validate(user_config).limits

    def decode(self, data: bytes) -> DecodedImage:
        return decode(data, max_bytes=self.limits.max_bytes, max_pixels=self.limits.max_pixels)

    def encode(self, pixels: np.ndarray, fmt: str, quality: int | None = None) -> bytes:
        return encode(pixels, fmt, quality=quality)

    def ping(self) -> bool:
        return True
