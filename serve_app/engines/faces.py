"""The GFPGAN engine: detect, align, restore every face in one batch, paste back.

It follows ``gfpgan.GFPGANer.enhance`` (so the output matches it on the same weights), with
these deliberate differences:
- ``strength`` in [0, 1] blends each restored face with its original crop. The official
  ``-w/--weight`` reaches ``GFPGANv1Clean.forward`` and RestoreFormer's as an unused keyword
  argument, so upstream it changes nothing; here it does.
- All faces of an image go through the network in one batch (upstream: one at a time).
- Grayscale, 16-bit and alpha pictures keep their mode: faces are found and restored on an
  8-bit colour copy and composited into the picture's own bit depth (upstream crashes on
  grayscale with a background upsampler, and pastes 8-bit faces into 16-bit backgrounds).
- At most ``max_faces`` faces are restored: the largest ones; the rest are left as they are
  and counted in ``faces_skipped``.
The work is split so a server can run each half where it belongs: ``find``, ``restore`` and
``paste_masks`` run networks (the GPU replica); ``face_canvas`` and ``paste_faces`` live in
``serve_app.cpu.paste`` (numpy and OpenCV, a CPU replica), and ``serve_app.cpu.restore``
chains them, making the canvas (the background through the upscaler) while faces are restored.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
from torch import nn

from serve_app.cpu.paste import FoundFaces
from serve_app.engines import face_geometry as geo
from serve_app.engines.face_detection import RetinaFaceDetector
from serve_app.engines.face_tensors import (PendingFace, bgr8_to_network_input, faces_to_device,
                                             paste_masks_on_device)

# BGR uint8 pictures -> for each, N x 15 detections (box, score, 5 landmarks)
Detector = Callable[[list[np.ndarray]], list[np.ndarray]]


class FirstOutput(nn.Module):
    """A network that answers a tuple, reduced to the first element (all the engine reads), so it
    compiles as a function of one tensor and the rest is never computed (ParseNet's image head)."""

    def __init__(self, network: nn.Module, **kwargs):
        super().__init__()
        self.network, self.kwargs = network, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x, **self.kwargs)[0]


# N x 3 x 512 x 512 faces in [-1, 1] -> restored faces in [-1, 1], or ParseNet's class scores
FaceNetwork = Callable[[torch.Tensor], torch.Tensor]


class FaceEngine:
    """The device half (find, restore, paste masks); ``face_canvas`` and ``paste_faces`` are
    the CPU half."""

    def __init__(self, restorer: FaceNetwork, parser: FaceNetwork, detector: Detector, *,
                 device: torch.device, dtype: torch.dtype = torch.float32, max_faces: int = 20,
                 face_by_face: bool = False):
        self.restorer, self.parser, self.detector = restorer, parser, detector
        self.device, self.dtype, self.max_faces = device, dtype, max_faces
        # Whether the restorer and the parser take a batch one face after the other (compiled
        # for one face): then a batch saves nothing, and a server can hand out each face alone.
        self.face_by_face = face_by_face

    def restore_found(self, work: np.ndarray, *, only_center_face: bool = False, aligned: bool = False,
                      strength: float = 1.0) -> tuple[FoundFaces, list[np.ndarray], list[np.ndarray]]:
        """The device half in one call, one picture at a time (the face deployment batches the
        same steps across requests): an 8-bit BGR picture's faces found, restored, and their
        paste masks (none for an aligned face, which is the result itself)."""
        found = self.find(work, only_center_face=only_center_face, aligned=aligned)
        restored = self.restore(found.crops, strength=strength)
        return found, restored, self.paste_masks(restored) if restored and not aligned else []

    # ------------------------------------------------------------------ step 1 (detector)
    def find(self, work: np.ndarray, *, only_center_face: bool = False, aligned: bool = False) -> FoundFaces:
        """Detect and align the faces of an 8-bit BGR picture (``to_bgr8``)."""
        if aligned:
            return self.align(work, None, aligned=True)
        return self.align(work, self.detector([work])[0], only_center_face=only_center_face)

    def align(self, work: np.ndarray, detections: np.ndarray | None, *, only_center_face: bool = False,
              aligned: bool = False, max_faces: int | None = None) -> FoundFaces:
        """The aligned 512x512 crops of the detected faces to restore (CPU work), at most
        ``max_faces`` of them (default: the engine's)."""
        if aligned:  # the input already is an aligned face, as GFPGANer's has_aligned
            return FoundFaces([cv2.resize(work, (geo.FACE_SIZE, geo.FACE_SIZE))], [], 1)
        boxes, landmarks = geo.faces_of(detections)
        found = FoundFaces(faces_detected=len(landmarks))
        h, w = work.shape[:2]
        if landmarks and only_center_face:
            keep = [geo.center_face_index(boxes, h, w)]
        else:
            keep = geo.largest_indices(boxes, max_faces or self.max_faces, h, w)
        for i in keep:
            crop, affine = geo.align_face(work, landmarks[i])
            found.crops.append(crop)
            found.affines.append(affine)
        return found

    # ------------------------------------------------------------------ step 2 (device)
    @torch.inference_mode()
    def restore(self, crops: list[np.ndarray], *, strength: float = 1.0) -> list[np.ndarray]:
        """Restore 512x512 BGR uint8 crops in one batch; blend with the crops by ``strength``."""
        _check_strength(strength)
        if not crops:
            return []
        restored = list(self._restore_bgr8(faces_to_device(crops, self.device)).cpu().numpy())
        if strength < 1.0:
            restored = [cv2.addWeighted(r, strength, c, 1.0 - strength, 0) for r, c in zip(restored, crops)]
        return restored

    @torch.inference_mode()
    def paste_masks(self, faces: list[np.ndarray]) -> list[np.ndarray]:
        """The soft 512x512 paste masks (float64 in [0, 1]) of restored faces: ParseNet's classes
        in one batch, then facexlib's mask of them (``geo.parse_mask``; on a GPU, made there).
        They stay float64 (2 MB a face to the CPU deployment, against 256 KB of classes): in
        float32 they would differ from OpenCV's by about 1e-8, and the truncating blend would put
        many more pixels a level apart from GFPGANer's."""
        if not faces:
            return []
        masks = self._paste_masks(faces_to_device(faces, self.device))
        return masks if isinstance(masks, list) else list(masks.cpu().numpy())

    @torch.inference_mode()
    def restore_each(self, crops: list[np.ndarray], *, strength: float = 1.0,
                     masks: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """``restore`` and (``masks``) ``paste_masks`` of ``crops``, a (face, mask) pair at a time
        in the crops' order, each as soon as it is ready.

        Where the networks run face by face anyway (``face_by_face``), a batch saves nothing, so
        each face is launched alone and handed out when its own work is done: on CUDA every
        face's work is queued at once, the restored face feeds the parser on the device, and the
        results come back through page-locked memory without stopping the queue. Elsewhere
        (eager networks, or a strength below 1, whose blend is OpenCV's on the CPU) the faces go
        as one batch."""
        _check_strength(strength)
        if not self.face_by_face or strength < 1.0:
            faces = self.restore(crops, strength=strength)
            yield from zip(faces, self.paste_masks(faces) if masks else [None] * len(faces))
            return
        launched: deque[PendingFace] = deque()
        for crop in crops:
            face = self._restore_bgr8(faces_to_device([crop], self.device))
            launched.append(PendingFace(face, self._paste_masks(face) if masks else None))
            while launched and launched[0].ready():
                yield launched.popleft().result()
        while launched:
            yield launched.popleft().result()

    def _restore_bgr8(self, crops: torch.Tensor) -> torch.Tensor:
        """N x 512 x 512 x 3 BGR uint8 crops -> restored faces, the same way, on the device."""
        out = self.restorer(bgr8_to_network_input(crops).to(self.dtype))
        # basicsr.tensor2img with min_max=(-1, 1), on the device: 8-bit BGR leaves it.
        out = ((out.float().clamp_(-1, 1) + 1) / 2).mul_(255).round_().to(torch.uint8)
        return out.flip(1).permute(0, 2, 3, 1).contiguous()

    def _paste_masks(self, faces: torch.Tensor) -> torch.Tensor | list[np.ndarray]:
        """Paste masks of N x 512 x 512 x 3 BGR uint8 faces on the device: on CUDA a float64
        tensor there; on the CPU a list of arrays (OpenCV's blur is faster than float64 products)."""
        classes = self.parser(bgr8_to_network_input(faces)).argmax(dim=1)
        if self.device.type != "cuda":
            return [geo.parse_mask(c) for c in classes.to(torch.uint8).numpy()]
        return paste_masks_on_device(classes)


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], not {strength}")


def load_face_engine(name: str, store, engine, *, max_faces: int = 20, detect_graphs: int = 0,
                     detect_graph_pixels: int = 0, detect_first_sight_pixels: int = 0,
                     share_with: FaceEngine | None = None) -> FaceEngine:
    """The registry face model ``name`` with RetinaFace and ParseNet, on ``engine``'s device.

    ``share_with``: an engine of the same settings whose detector and parser this one uses too
    (they are the same two networks for every face model). Where ``engine`` compiles, so are
    the parser and a GFPGAN restorer, and the detector keeps up to ``detect_graphs`` CUDA
    graphs of passes of at most ``detect_graph_pixels`` pixels; a shape's first pass of at most
    ``detect_first_sight_pixels`` skips cuDNN (see ``RetinaFaceDetector``).
    """
    from serve_app.engines.device import resolve_compile, resolve_device, resolve_dtype
    from serve_app.engines.networks import load_network
    from serve_app.weights.registry import get_spec

    spec = get_spec(name)
    if spec.kind != "face":
        raise ValueError(f"{name} is a {spec.kind} model, not a face restorer")
    device = resolve_device(engine.device)
    dtype = resolve_dtype(engine.precision, device)
    compiled = resolve_compile(engine.compile, device)
    # GFPGANer's call; RestoreFormer takes (and ignores) the keyword too.
    restorer = FirstOutput(load_network(spec, store, device, dtype), return_rgb=False)
    face_by_face = compiled and spec.arch in _COMPILED_RESTORERS
    if face_by_face:
        restorer = _compiled(restorer, name, store, device, dtype)
    if share_with is not None:
        detector, parser = share_with.detector, share_with.parser
    else:
        # Detection and parsing stay in fp32, as GFPGANer runs them.
        detector = RetinaFaceDetector(load_network(get_spec("retinaface_resnet50"), store, device),
                                      graphs=detect_graphs if compiled and device.type == "cuda" else 0,
                                      graph_pixels=detect_graph_pixels,
                                      first_sight_pixels=detect_first_sight_pixels)
        parser = FirstOutput(load_network(get_spec("parsenet"), store, device))
        if compiled:
            parser = _compiled(parser, "parsenet", store, device, torch.float32)
    return FaceEngine(restorer, parser, detector, device=device, dtype=dtype, max_faces=max_faces,
                      face_by_face=face_by_face)


# Restorer architectures that compile. RestoreFormer in fp16 fails to compile ("expected mat1
# and mat2 to have the same dtype") while it runs eager; it stays eager.
_COMPILED_RESTORERS = {"GFPGANv1Clean"}


def _compiled(network: nn.Module, name: str, store, device: torch.device, dtype: torch.dtype) -> FaceNetwork:
    """``network`` compiled for one aligned face (a CUDA graph on the GPU); a batch goes face by
    face. Compiled, GFPGAN gains little from batching, and its modulated convolutions group by
    the batch, so each batch size would be a compile of its own; ParseNet compiled face by face
    is faster than compiled for batches (docs/architecture.md)."""
    from serve_app.engines.compiled import CompiledNetwork, artifacts_path

    artifacts = artifacts_path(store.config.resolved_cache_dir(), name, device, dtype, geo.FACE_SIZE)
    # GFPGANv1Clean calls .view on its features: contiguous NCHW, as bgr8_to_network_input makes.
    return CompiledNetwork(network, size=geo.FACE_SIZE, max_batch=1, device=device, dtype=dtype,
                           memory_format=torch.contiguous_format, artifacts=artifacts)
