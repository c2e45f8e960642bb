"""Faces as tensors: how they cross to the device and back, and their paste masks made there.

The face engine's device half (``faces.FaceEngine``) works through these; no Ray, no server.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np
import torch

from serve_app.engines import face_geometry as geo
from serve_app.engines.device import page_locked_copy


def faces_to_device(faces: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """BGR uint8 faces as one N x 512 x 512 x 3 tensor on ``device``: they cross as 8-bit, a
    quarter of the bytes of the network's input."""
    return torch.from_numpy(np.stack(faces)).to(device)


def bgr8_to_network_input(faces: torch.Tensor) -> torch.Tensor:
    """N x 512 x 512 x 3 BGR uint8 faces -> N x 3 x 512 x 512 RGB float32 in [-1, 1], contiguous
    NCHW, with the same float32 steps as basicsr's img2tensor and GFPGANer's normalisation.
    GFPGANv1Clean calls ``.view`` on its features, so the batch must be contiguous NCHW.
    """
    x = faces.flip(3).permute(0, 3, 1, 2).float()
    return x.div_(255).sub_(0.5).div_(0.5).contiguous()


class PendingFace:
    """One face's results on their way to host memory: on CUDA a copy to page-locked memory
    queued behind the face's work, with an event to tell when it is there."""

    def __init__(self, face: torch.Tensor, mask: torch.Tensor | list[np.ndarray] | None):
        """``face``: 1 x 512 x 512 x 3 uint8; ``mask``: its paste mask as
        ``FaceEngine._paste_masks`` makes it."""
        self.event = None
        if face.device.type == "cuda":
            face, mask = page_locked_copy(face), None if mask is None else page_locked_copy(mask)
            self.event = torch.cuda.Event()
            self.event.record()
        self.face, self.mask = face, mask

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.event is not None:
            self.event.synchronize()  # sleeps: see deployments.gpu.sleep_while_gpu_works
        return self.face[0].numpy(), None if self.mask is None else np.asarray(self.mask[0])


def paste_masks_on_device(classes: torch.Tensor) -> torch.Tensor:
    """``geo.parse_mask`` for N x 512 x 512 ParseNet classes, in float64 on their device.

    Each of the two Gaussian blurs is a product with a banded matrix on each side (the blur of
    every column, then of every row): a few float64 matrix products on a GPU, where OpenCV's
    blurs took 34 ms of a CPU core per face. Sums are taken in another order than OpenCV's; the
    values agree within 1e-12 (tested).
    """
    lut = torch.as_tensor(geo.PARSE_TO_MASK, dtype=torch.float64, device=classes.device)
    blur = _blur_matrix(classes.shape[-1], classes.device)
    mask = lut[classes.long()]
    for _ in range(2):
        mask = blur @ mask @ blur.T
    return geo.clear_mask_border(mask) / 255.0


@functools.lru_cache(maxsize=4)
def _blur_matrix(size: int, device: torch.device) -> torch.Tensor:
    """B with B @ m = facexlib's Gaussian blur of each column of m (size x size, float64),
    OpenCV's kernel and reflect-101 border (the border pixel itself is not repeated)."""
    kernel = cv2.getGaussianKernel(geo.MASK_BLUR_SIZE, geo.MASK_BLUR_SIGMA, cv2.CV_64F)[:, 0]
    half = len(kernel) // 2
    taps = np.abs(np.arange(size)[:, None] + np.arange(len(kernel)) - half)
    taps = np.where(taps >= size, 2 * (size - 1) - taps, taps)
    matrix = np.zeros((size, size))
    np.add.at(matrix, (np.repeat(np.arange(size), len(kernel)), taps.ravel()), np.tile(kernel, size))
    return torch.from_numpy(matrix).to(device)
