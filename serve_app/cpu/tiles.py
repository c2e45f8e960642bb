"""The upscaler's CPU half, run by the CPU replicas: an image cut into fixed-shape network
inputs, and the outputs stitched back into an image. numpy and OpenCV only.

Colour handling follows ``realesrgan.RealESRGANer.enhance`` step for step (the differences are
listed in ``serve_app.engines.upscaler``, whose ``Upscaler`` runs the middle step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from serve_app.config import TileConfig
from serve_app.engines.tiling import TilePlan, cut_tiles, mod_pad, pad_right_bottom, plan_tiles, stitch, tile_side

AlphaUpsampler = Literal["realesrgan", "bicubic"]
ALPHA_UPSAMPLERS = ("realesrgan", "bicubic")


@dataclass
class _Plane:
    """One 3-channel picture (the colours, or the alpha as grey) to pass through the network."""

    # C x h x w network inputs (tiles, or the whole padded image): uint8 for 8-bit colour
    # pictures, else float32 in [0, 1]
    inputs: list[np.ndarray]
    plan: TilePlan | None  # None: one whole-image input
    height: int
    width: int


@dataclass
class UpscaleJob:
    mode: str  # "L", "BGR" or "BGRA"
    dtype: np.dtype
    height: int
    width: int
    planes: list[_Plane]
    alpha: np.ndarray | None  # float alpha in [0, 1] when it is resized without the network
    scale: float

    def inputs(self) -> list[np.ndarray]:
        return [x for plane in self.planes for x in plane.inputs]


class TilePlanner:
    """The CPU side of an upscaler: image -> fixed-shape network inputs, outputs -> image.

    It needs the network's scale and the tile settings, not the network, so CPU replicas run it
    and only tiles travel to the GPU.
    """

    def __init__(self, scale: int, tile: TileConfig):
        # Real-ESRGAN's x2 and x1 networks pixel-unshuffle their input, which must divide by 2 or 4.
        self.multiple = {1: 4, 2: 2}.get(scale, 1)
        if tile.size and tile.size % self.multiple:
            raise ValueError(f"tile size {tile.size} must be a multiple of {self.multiple} for x{scale}")
        self.scale, self.tile = scale, tile

    # ------------------------------------------------------------------ step 1 (CPU)
    def prepare(self, img: np.ndarray, *, scale: float | None = None,
                alpha_upsampler: AlphaUpsampler = "realesrgan") -> UpscaleJob:
        if alpha_upsampler not in ALPHA_UPSAMPLERS:
            raise ValueError(f"alpha_upsampler must be one of {ALPHA_UPSAMPLERS}")
        if img.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"expected uint8 or uint16 pixels, got {img.dtype}")
        height, width = img.shape[:2]
        scale = float(scale) if scale is not None else float(self.scale)
        if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
            # 8-bit colour travels as 8-bit: a quarter of the bytes of float32 each way, and the
            # device scales and rounds exactly as upstream does on the CPU (see Upscaler.forward).
            return UpscaleJob("BGR", img.dtype, height, width, [self._plane(img[:, :, ::-1])], None, scale)
        max_range = 65535.0 if img.dtype == np.uint16 else 255.0
        pixels = img.astype(np.float32) / max_range
        alpha = None
        if pixels.ndim == 2:
            mode, colour = "L", cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
        elif pixels.shape[2] == 4:
            mode, colour, alpha = "BGRA", cv2.cvtColor(pixels[:, :, :3], cv2.COLOR_BGR2RGB), pixels[:, :, 3]
        else:
            mode, colour = "BGR", cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        planes = [self._plane(colour)]
        if alpha is not None and alpha_upsampler == "realesrgan":
            planes.append(self._plane(cv2.cvtColor(alpha, cv2.COLOR_GRAY2RGB)))
            alpha = None
        return UpscaleJob(mode, img.dtype, height, width, planes, alpha, scale)

    def _plane(self, rgb: np.ndarray) -> _Plane:
        chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
        height, width = chw.shape[1:]
        pre, tile = self.tile.pre_pad, self.tile.size
        if tile == 0:
            padded = pad_right_bottom(chw, pre, pre)
            _, h, w = padded.shape
            padded = pad_right_bottom(padded, mod_pad(h, self.multiple), mod_pad(w, self.multiple))
            return _Plane([padded], None, height, width)
        padded = pad_right_bottom(chw, _pre_pad(height, pre, tile), _pre_pad(width, pre, tile))
        _, h, w = padded.shape
        th, tw = tile_side(h, tile), tile_side(w, tile)
        padded = pad_right_bottom(padded, max(th - h, mod_pad(h, self.multiple)),
                                  max(tw - w, mod_pad(w, self.multiple)))
        plan = plan_tiles(padded.shape[1], padded.shape[2], th, tw, self.tile.pad, self.tile.blend)
        return _Plane(list(cut_tiles(padded, plan)), plan, height, width)

    # ------------------------------------------------------------------ step 3 (CPU)
    def finish(self, job: UpscaleJob, outputs: list[np.ndarray]) -> np.ndarray:
        if outputs[0].dtype == np.uint8:  # 8-bit colour, rounded on the device
            return self._resize(job, self._assemble(job.planes[0], outputs))
        planes = []
        for plane in job.planes:
            n = len(plane.inputs)
            planes.append(self._assemble(plane, outputs[:n]))
            outputs = outputs[n:]
        image = planes[0]
        if job.mode == "L":
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        elif job.mode == "BGRA":
            if len(planes) > 1:
                alpha = cv2.cvtColor(planes[1], cv2.COLOR_BGR2GRAY)
            else:
                size = (job.width * self.scale, job.height * self.scale)
                alpha = np.clip(cv2.resize(job.alpha, size, interpolation=cv2.INTER_CUBIC), 0, 1)
            image = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
            image[:, :, 3] = alpha
        max_range = 65535.0 if job.dtype == np.uint16 else 255.0
        return self._resize(job, (image * max_range).round().astype(job.dtype))

    def _resize(self, job: UpscaleJob, result: np.ndarray) -> np.ndarray:
        if job.scale == float(self.scale):
            return result
        # As upstream: Lanczos from the network's scale to the asked one.
        size = (int(job.width * job.scale), int(job.height * job.scale))
        return cv2.resize(result, size, interpolation=cv2.INTER_LANCZOS4)

    def _assemble(self, plane: _Plane, outputs: list[np.ndarray]) -> np.ndarray:
        """The plane's H*s x W*s x 3 BGR image from its network outputs: uint8 from 8-bit
        outputs, else float32 in [0, 1]."""
        s = self.scale
        # A lone tile has nothing to blend with, so it skips the stitching. Float outputs may be
        # float16 (from CUDA): the arithmetic is float32.
        if len(outputs) == 1:
            full = outputs[0] if outputs[0].dtype == np.uint8 else outputs[0].astype(np.float32)
        elif outputs[0].dtype == np.uint8:
            full = stitch(np.stack(outputs), plane.plan, s).round().astype(np.uint8)
        else:
            full = stitch(np.stack(outputs), plane.plan, s)
        rgb = full[:, : plane.height * s, : plane.width * s]
        # Planar RGB to interleaved BGR: OpenCV's merge is about 9x faster than a numpy transpose.
        return cv2.merge([rgb[2], rgb[1], rgb[0]])


def _pre_pad(length: int, pre_pad: int, tile: int) -> int:
    """The reflection pad after an edge, trimmed so a picture that fits one tile stays one tile.

    Upstream pads 10 pixels past the right and bottom edges; a 256-pixel picture with 256-pixel
    tiles would then need two tiles a side, four times the work, for a margin it hardly needs.
    """
    if length <= tile:
        return min(pre_pad, tile - length)
    return pre_pad
