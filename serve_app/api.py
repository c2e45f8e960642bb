"""The request schema of POST /v1/restore: every option, its type and bounds, in one place."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve_app.errors import InvalidOption, TooManyPixels
from serve_app.weights.registry import DEFAULT_FACE_MODEL, DEFAULT_UPSCALER, MODELS


class RestoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(default=DEFAULT_UPSCALER, description="A Real-ESRGAN model, or 'none' for faces only.")
    scale: float | None = Field(default=None, gt=0, le=8, description="Output scale; default the model's. "
                                "Give scale, or width and/or height, not both.")
    width: int | None = Field(default=None, gt=0, le=65535, description="Output width in pixels, the aspect "
                              "kept: the result fits inside width x height where both are given.")
    height: int | None = Field(default=None, gt=0, le=65535, description="Output height in pixels (see width).")
    denoise: float | None = Field(default=None, ge=0, le=1, description="realesr-general-x4v3 only: "
                                  "1 is its plain network, lower blends in its denoising twin.")
    face_enhance: bool = False
    face_model: str = DEFAULT_FACE_MODEL
    face_strength: float = Field(default=1.0, ge=0, le=1)
    only_center_face: bool = False
    aligned: bool = False
    alpha_upsampler: Literal["realesrgan", "bicubic"] = "realesrgan"
    format: Literal["png", "jpeg", "webp"] | None = None
    quality: int | None = Field(default=None, ge=1, le=101)
    keep_metadata: bool = Field(default=True, description="Carry the input's ICC profile and EXIF (its "
                                "orientation reset: the pixels are upright) into the output.")

    @property
    def upscaler(self) -> str | None:
        return None if self.model == "none" else self.model

    @model_validator(mode="after")
    def _scale_defaults_to_the_models(self):
        """``scale`` left out is the model's own (1 for faces only): one value from here on."""
        if self.upscaler is not None and self.upscaler not in MODELS:
            raise ValueError(f"unknown model {self.upscaler!r}")
        if self.upscaler is None and not self.face_enhance:
            raise ValueError("model 'none' restores faces only: set face_enhance=true")
        if self.width is not None or self.height is not None:
            if self.scale is not None:
                raise ValueError("give scale, or width and/or height, not both")
        elif self.scale is None:
            self.scale = float(MODELS[self.upscaler].scale) if self.upscaler else 1.0
        # The value that selects a network: only a model with a denoising twin blends, as in the
        # official script; 1 is the plain network, and values are rounded to bound the networks kept.
        if self.upscaler is None or MODELS[self.upscaler].denoise_twin is None or self.denoise == 1:
            self.denoise = None
        elif self.denoise is not None:
            self.denoise = round(self.denoise, 2)
        return self


    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the result of a ``width`` x ``height`` input, once ``scale`` is set."""
        return int(width * self.scale), int(height * self.scale)

    def fitted(self, width: int, height: int, max_output_pixels: int) -> RestoreOptions:
        """These options for a ``width`` x ``height`` input: ``scale`` from the target size where one
        was asked, and the result checked against the output limit before any work."""
        options = self
        if self.scale is None:
            targets = [(t, n) for t, n in ((self.width, width), (self.height, height)) if t is not None]
            target, size = min(targets, key=lambda pair: pair[0] / pair[1])  # the side that limits
            scale = target / size
            if scale > 8:
                raise InvalidOption(f"a {'width' if target == self.width else 'height'} of {target} makes "
                                    f"this {width}x{height} picture x{scale:.3g}; the most is x8")
            while int(size * scale) < target:  # the steps size the output as int(size * scale)
                scale = math.nextafter(scale, math.inf)
            options = self.model_copy(update={"scale": scale})
        out_width, out_height = options.output_size(width, height)
        if min(out_width, out_height) < 1:
            raise InvalidOption(f"scale {options.scale:g} makes this {width}x{height} picture smaller than one pixel")
        if out_width * out_height > max_output_pixels:
            raise TooManyPixels(f"the result would be {out_width}x{out_height} = {out_width * out_height} "
                                f"pixels; the limit is {max_output_pixels}")
        return options


def parse_options(values: dict) -> RestoreOptions:
    try:
        return RestoreOptions.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidOption(problems) from None


@dataclass
class Restored:
    """What the Python API returns: the restored array and what it is."""

    pixels: np.ndarray  # HxW, HxWx3 BGR or HxWx4 BGRA; the input's bit depth
    width: int
    height: int
    mode: str
    faces: int  # faces restored (0 without face_enhance)
    timings_ms: dict[str, float]
