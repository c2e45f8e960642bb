"""The face path's CPU half, run by the CPU replicas: the canvas the faces go onto, pasting
restored faces back, and the 8-bit copy the face replica searches. numpy and OpenCV only.

It follows ``gfpgan.GFPGANer`` (via facexlib's paste-back) byte for byte; the networks' half
is ``serve_app.engines.faces``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from serve_app.engines import face_geometry as geo
from serve_app.engines.lanczos import lanczos_upscale


@dataclass
class FoundFaces:
    """The faces found in a picture: aligned 512x512 crops and the affines that cut them."""

    crops: list[np.ndarray] = field(default_factory=list)
    affines: list[np.ndarray] = field(default_factory=list)
    faces_detected: int = 0


@dataclass
class FaceResult:
    image: np.ndarray
    faces_detected: int
    faces_restored: int
    cropped_faces: list[np.ndarray]
    restored_faces: list[np.ndarray]

    @property
    def faces_skipped(self) -> int:
        return self.faces_detected - self.faces_restored


def face_canvas(image: np.ndarray, *, scale: float = 2, background: np.ndarray | None = None) -> np.ndarray:
    """What the faces of ``image`` are pasted onto: the picture resized by ``scale``, or
    ``background`` (the picture already upscaled by a network) brought to that size, as GFPGANer
    makes it. It needs no face, so a server makes it while the faces are restored."""
    if background is None:
        return lanczos_upscale(image, scale)  # GFPGANer's cv2.resize, byte for byte, in less time
    h, w = image.shape[:2]
    return cv2.resize(background, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_LANCZOS4)


def paste_faces(image: np.ndarray, found: FoundFaces, restored: list[np.ndarray], masks: list[np.ndarray],
                *, scale: float = 2, aligned: bool = False, canvas: np.ndarray | None = None) -> FaceResult:
    """Paste restored faces into ``canvas``, in place, as GFPGANer does (by default the canvas is
    ``face_canvas(image, scale=scale)``; aligned: the one restored face is the result).
    Pure CPU: no network needed."""
    if aligned:
        return FaceResult(restored[0], found.faces_detected, 1, found.crops, restored)
    if canvas is None:
        canvas = face_canvas(image, scale=scale)
    if restored:
        canvas = _paste(canvas, found, restored, masks, scale)
    return FaceResult(canvas, found.faces_detected, len(restored), found.crops, restored)


def _paste(canvas: np.ndarray, found: FoundFaces, restored: list[np.ndarray], masks: list[np.ndarray],
           scale: float) -> np.ndarray:
    dtype, gray = canvas.dtype, canvas.ndim == 2
    # The canvas's colour channels, pasted in place (a grey canvas: a BGR copy, turned back at the end)
    colour = cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR) if gray else canvas[:, :, :3]
    size = (canvas.shape[1], canvas.shape[0])
    # Faces are 8-bit; a 16-bit canvas gets them at its own range.
    face_range = 65535.0 / 255.0 if dtype == np.uint16 else 1.0
    placed = []
    for face, mask, affine in zip(restored, masks, found.affines):
        inverse = geo.inverse_affine(affine, scale)
        patch = geo.face_patch(mask, inverse, size)
        if patch is not None:
            placed.append((face if face_range == 1.0 else face.astype(np.float32) * face_range, patch, inverse))
    if not placed:
        return canvas
    # Faces are blended one after the other in float64, as facexlib blends them over the whole
    # canvas; outside their rectangles that leaves every pixel as it was.
    x0, y0, x1, y1 = geo.covering_rect([patch for _, patch, _ in placed])
    window = colour[y0:y1, x0:x1].astype(np.float64)
    for face, patch, inverse in placed:
        geo.blend_face(window, (x0, y0), face, patch, inverse)
    # As facexlib: truncate, do not round, so the result matches GFPGANer's (byte for byte with
    # masks made on the CPU; the device's sums may round a mask's last bit apart, and a pixel
    # then truncates one level apart).
    colour[y0:y1, x0:x1] = window.astype(dtype)
    return cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY) if gray else canvas


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """An 8-bit BGR copy of any decoded picture (grey, BGR or BGRA; 8 or 16 bit)."""
    if image.dtype == np.uint16:
        image = np.round(image.astype(np.float32) / 257.0).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(image[:, :, :3])
