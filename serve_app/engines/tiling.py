"""Padding, fixed-shape tiles and seamless stitching: pure numpy, no torch.

Every tile of a picture larger than the tile has the same T x T shape, so tiles of different
images and requests can be stacked into one batch (smaller pictures get one smaller tile). Neighbouring tiles overlap; their outputs are blended
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
    """Where the T x T tiles of an H x W (already padded) image start.

    Along an edge shared with a neighbour, a tile's outer ``pad`` pixels are context only
    (weight 0: the network saw zero padding past them), and the next ``blend`` pixels fade
    into the neighbour. Neighbours therefore overlap by ``2 * pad + blend``.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    pad: int
    blend: int
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
    starts = list(range(0, length - tile, tile - overlap))
    starts.append(length - tile)  # the last tile ends flush with the image
    return tuple(starts)


def tile_side(length: int, tile: int, multiple: int = 16) -> int:
    """The tile side along an axis: ``tile``, or less for an image that is smaller.

    A 74-pixel-high picture gets 80-pixel-high tiles rather than 256: padding it to a whole
    tile would cost 10x the compute. Rounding to ``multiple`` keeps the shapes of similar
    small pictures equal, so they still batch together.
    """
    return min(tile, -(-length // multiple) * multiple)


def plan_tiles(height: int, width: int, tile_h: int, tile_w: int, pad: int, blend: int) -> TilePlan:
    overlap = 2 * pad + blend
    for length, tile in ((height, tile_h), (width, tile_w)):
        if length < tile:
            raise ValueError(f"pad the {height}x{width} image to at least the tile size {tile_h}x{tile_w} first")
        if length > tile and tile <= 2 * overlap:
            raise ValueError(f"tile size {tile} must exceed twice the overlap 2*pad+blend = {overlap}")
    return TilePlan(height, width, tile_h, tile_w, pad, blend,
                    _starts(height, tile_h, overlap), _starts(width, tile_w, overlap))


def cut_tiles(img: np.ndarray, plan: TilePlan) -> np.ndarray:
    """N x C x Th x Tw tiles of a C x H x W image, in ``plan.origins()`` order."""
    th, tw = plan.tile_h, plan.tile_w
    return np.stack([img[:, y : y + th, x : x + tw] for y, x in plan.origins()])


def edge_weights(length: int, pad: int, blend: int, start_shared: bool, end_shared: bool) -> np.ndarray:
    """1-D weights of a tile: 0 over ``pad``, a ramp over ``blend``, then 1, at each shared edge."""
    weights = np.ones(length, np.float32)
    # The ramp never reaches 0, so a pixel some neighbour fades out is always covered.
    ramp = (np.arange(blend, dtype=np.float32) + 0.5) / blend if blend else np.zeros(0, np.float32)
    if start_shared:
        weights[:pad] = 0
        weights[pad : pad + blend] = ramp
    if end_shared:
        weights[length - pad :] = 0
        tail = slice(length - pad - blend, length - pad)
        weights[tail] = np.minimum(weights[tail], ramp[::-1])
    return weights


def stitch(outputs: np.ndarray, plan: TilePlan, scale: int) -> np.ndarray:
    """Blend N x C x (Th*scale) x (Tw*scale) tile outputs into one C x (H*scale) x (W*scale) image."""
    th, tw, pad, blend = plan.tile_h * scale, plan.tile_w * scale, plan.pad * scale, plan.blend * scale
    acc = np.zeros((outputs.shape[1], plan.height * scale, plan.width * scale), np.float32)
    total = np.zeros((plan.height * scale, plan.width * scale), np.float32)
    for out, (y, x) in zip(outputs, plan.origins()):
        wy = edge_weights(th, pad, blend, y > 0, y + plan.tile_h < plan.height)
        wx = edge_weights(tw, pad, blend, x > 0, x + plan.tile_w < plan.width)
        window = wy[:, None] * wx[None, :]
        oy, ox = y * scale, x * scale
        acc[:, oy : oy + th, ox : ox + tw] += out * window
        total[oy : oy + th, ox : ox + tw] += window
    acc /= total
    return acc
