"""Face detection: facexlib's RetinaFace with the anchors and decoding GFPGANer uses."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from serve_app.engines.cuda_graphs import GraphsByShape
from serve_app.engines.no_cudnn import without_cudnn


class RetinaFaceDetector:
    """facexlib's RetinaFace with GFPGANer's thresholds, batched over pictures of one size.

    It follows ``RetinaFace.detect_faces`` step for step (same network, priors, decoding and
    NMS, so the same answer), with three savings: the priors are built once per picture size
    (facexlib rebuilds them in a Python loop per call), only the rows over the threshold are
    decoded and copied off the device, and on CUDA the network is replayed from a CUDA graph for
    batches whose shape recurs (``graphs`` of them kept, each of at most ``graph_pixels``
    pixels), which spares the device lane's thread most of its kernel launches under the GIL. A
    capture may take other cuDNN algorithms than a plain call, so under TF32 (PyTorch's default
    for fp32 convolutions) its offsets differ in the last digits, with the same detections. A
    shape's first pass of at most ``first_sight_pixels`` pixels skips cuDNN
    (``without_cudnn``): photos come in every size, and cuDNN's plans for a new one cost several
    times the pass itself. The figures are in docs/architecture.md.
    """

    def __init__(self, network: nn.Module, threshold: float = 0.97, nms_threshold: float = 0.4, *,
                 graphs: int = 0, graph_pixels: int = 0, first_sight_pixels: int = 0):
        self.network, self.threshold, self.nms_threshold = network, threshold, nms_threshold
        self.first_sight_pixels = first_sight_pixels
        self._priors: dict[tuple[int, int], torch.Tensor] = {}
        self._twin = without_cudnn(network) if first_sight_pixels else None
        self.outputs = GraphsByShape(self._network_outputs, keep=graphs, max_elements=3 * graph_pixels,
                                     first_sight=self._first_pass)

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """8-bit BGR pictures -> for each, N x 15 detections (box, score, 5 landmarks)."""
        answers: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(img.shape, []).append(i)
        for indices in by_size.values():
            for i, found in zip(indices, self._detect_same_size([images[i] for i in indices])):
                answers[i] = found
        return answers

    def _detect_same_size(self, images: list[np.ndarray]) -> list[np.ndarray]:
        from facexlib.detection.retinaface_utils import decode, decode_landm
        from torchvision.ops import nms

        net = self.network
        height, width = images[0].shape[:2]
        batch = torch.from_numpy(np.stack(images)).to(net.device)
        locations, confidences, landmarks = self.outputs(batch)
        priors, variance = self._priors_for(height, width), net.cfg["variance"]
        scale = torch.tensor([width, height] * 5, dtype=torch.float32, device=net.device)
        # Only the rows over the threshold leave the device, every picture's in one copy: two
        # waits for the device a pass (how many rows, then the rows), not several a picture.
        # Row by row the same operations as facexlib's, so the same values, in anchor order.
        picture, anchor = (confidences[:, :, 1] > self.threshold).nonzero(as_tuple=True)
        kept_priors = priors[anchor]
        rows = torch.cat((decode(locations[picture, anchor], kept_priors, variance) * scale[:4],
                          confidences[picture, anchor, 1:],
                          decode_landm(landmarks[picture, anchor], kept_priors, variance) * scale,
                          picture[:, None].float()), 1).cpu().numpy()
        answers = []
        for i in range(len(images)):
            mine = rows[rows[:, -1] == i]
            boxes, scores, marks = mine[:, :4], np.ascontiguousarray(mine[:, 4]), mine[:, 5:15]
            # From here exactly as facexlib, on the CPU: saturated scores tie, and the order
            # of ties decides which of the overlapping boxes survive.
            order = scores.argsort()[::-1]
            found = np.hstack((boxes[order], scores[order, None])).astype(np.float32, copy=False)
            kept = nms(torch.from_numpy(found[:, :4]), torch.from_numpy(found[:, 4]), self.nms_threshold).numpy()
            answers.append(np.concatenate((found[kept], marks[order][kept]), axis=1))
        return answers

    def _first_pass(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_network_outputs`` for a shape not seen before: on the twin that skips cuDNN, unless
        the pass is larger than ``first_sight_pixels``. Without cuDNN a convolution unfolds its
        input (im2col), about 150 bytes a pixel at RetinaFace's first layers, and runs about twice
        as long, so for the largest pictures a plan costs less than its absence."""
        small = batch.numel() <= 3 * self.first_sight_pixels  # 8-bit BGR: three values a pixel
        return self._network_outputs(batch, self._twin if small else None)

    def _network_outputs(self, batch: torch.Tensor, network: nn.Module | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """N x H x W x 3 uint8 BGR pictures on the device -> the network's (or its twin
        ``network``'s) box offsets, class scores and landmark offsets per anchor."""
        net = self.network if network is None else network
        return net(batch.permute(0, 3, 1, 2).float() - net.mean_tensor)

    def _priors_for(self, height: int, width: int) -> torch.Tensor:
        if (height, width) not in self._priors:
            if len(self._priors) >= _PRIOR_SIZES_KEPT:
                self._priors.pop(next(iter(self._priors)))
            boxes = prior_boxes(self.network.cfg, height, width)
            self._priors[height, width] = torch.from_numpy(boxes).to(self.network.device)
        return self._priors[height, width]


_PRIOR_SIZES_KEPT = 16  # picture sizes whose priors stay on the device


def prior_boxes(cfg: dict, height: int, width: int) -> np.ndarray:
    """facexlib's ``PriorBox(cfg, (height, width)).forward()``, vectorised: the same anchors
    (centre x, centre y, width, height; relative to the picture) in the same order, computed in
    float64 as Python does there, then stored as float32."""
    rows = []
    for step, sizes in zip(cfg["steps"], cfg["min_sizes"]):
        rows_n, cols_n = -(-height // step), -(-width // step)
        cy, cx = np.meshgrid((np.arange(rows_n) + 0.5) * step / height, (np.arange(cols_n) + 0.5) * step / width,
                             indexing="ij")
        anchors = np.empty((rows_n, cols_n, len(sizes), 4))
        anchors[..., 0], anchors[..., 1] = cx[..., None], cy[..., None]
        anchors[..., 2], anchors[..., 3] = np.array(sizes) / width, np.array(sizes) / height
        rows.append(anchors.reshape(-1, 4))
    boxes = np.concatenate(rows).astype(np.float32)
    return np.clip(boxes, 0, 1) if cfg["clip"] else boxes
