"""Padding, fixed-shape tiles and seamless stitching: pure numpy, no torch.

Every tile has the same T x T shape, whatever the image, so tiles of different images and
requests can be stacked into one batch. Neighbouring tiles overlap; their outputs are blended
with linear ramps across the overlap, so a pixel near a tile border (where the network saw
zero padding instead of the real neighbourhood) gets little weight and no seam shows. The
official tiling pastes tiles edge to edge instead, which leaves visible seams.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pad_right_bottom(img: np.ndarray, pad_h: int, pad_w: int) -> np.ndarray:
    """Reflect-pad a CxHxW array on the right and bottom, as RealESRGANer.pre_process does.

    numpy's ``reflect`` equals torch's for pads smaller than the image, and keeps reflecting
    for larger ones (a tiny image padded up to a whole tile).
    """
    if pad_h == 0 and pad_w == 0:
        return img
    return np.pad(img, ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect")


def mod_pad(size: int, multiple: int) -> int:
    """How much to add to ``size`` to make it a multiple of ``multiple``."""
    return (-size) % multiple


@dataclass(frozen=True)
class TilePlan:
    """Where the T x T tiles of an H x W (already padded) image start."""

    height: int
    width: int
    tile: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def origins(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]


def _starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    if length <= tile:
        return (0,)
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)  # the last tile ends flush with the image
    return tuple(starts)


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> TilePlan:
    if not 0 <= overlap < tile // 2:
        raise ValueError(f"tile overlap {overlap} must be under half the tile size {tile}")
    if height < tile or width < tile:
        raise ValueError(f"pad the {height}x{width} image to at least the tile size {tile} first")
    return TilePlan(height, width, tile, overlap, _starts(height, tile, overlap), _starts(width, tile, overlap))


def cut_tiles(img: np.ndarray, plan: TilePlan) -> np.ndarray:
    """N x C x T x T tiles of a C x H x W image, in ``plan.origins()`` order."""
    t = plan.tile
    return np.stack([img[:, y : y + t, x : x + t] for y, x in plan.origins()])


def _ramp(length: int, ramp: int, fade_in: bool, fade_out: bool) -> np.ndarray:
    weights = np.ones(length, np.float32)
    if ramp == 0:
        return weights
    rising = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp  # never 0: every pixel stays covered
    if fade_in:
        weights[:ramp] = rising
    if fade_out:
        weights[-ramp:] = np.minimum(weights[-ramp:], rising[::-1])
    return weights


def stitch(outputs: np.ndarray, plan: TilePlan, scale: int) -> np.ndarray:
    """Blend N x C x (T*scale) x (T*scale) tile outputs into one C x (H*scale) x (W*scale) image."""
    t, ramp = plan.tile * scale, plan.overlap * scale
    channels = outputs.shape[1]
    acc = np.zeros((channels, plan.height * scale, plan.width * scale), np.float32)
    total = np.zeros((plan.height * scale, plan.width * scale), np.float32)
    for out, (y, x) in zip(outputs, plan.origins()):
        wy = _ramp(t, ramp, y > 0, y + plan.tile < plan.height)
        wx = _ramp(t, ramp, x > 0, x + plan.tile < plan.width)
        window = wy[:, None] * wx[None, :]
        oy, ox = y * scale, x * scale
        acc[:, oy : oy + t, ox : ox + t] += out * window
        total[oy : oy + t, ox : ox + t] += window
    acc /= total
    return acc
