"""Face geometry and compositing: pure numpy/OpenCV functions, no torch.

Each function mirrors one step of facexlib's FaceRestoreHelper (0.3.0), which GFPGANer
uses, but keeps per-image data in arguments and return values instead of on ``self``,
so one engine can serve concurrent requests.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

FACE_SIZE = 512
# The 5-point template (eyes, nose, mouth corners) of a 512x512 aligned face (FFHQ layout).
FACE_TEMPLATE = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]]
)
# facexlib's grey fill for the area outside the photo when a face is near its border.
_BORDER_FILL = (135, 133, 132)
# ParseNet's 19 classes -> paste mask (facexlib's MASK_COLORMAP): the face regions are pasted;
# background, neck, cloth, hair and hat (classes 0, 14, 16, 17, 18) stay as they were.
PARSE_TO_MASK = np.array([0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 0],
                         np.float64)
MIN_EYE_DISTANCE = 5  # GFPGANer skips faces whose eyes are closer than this many pixels


def faces_of(detections: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Boxes and 5x2 landmarks of detection rows (box 0-3, score 4, landmarks 5-14).

    As GFPGANer, faces whose eyes are under MIN_EYE_DISTANCE pixels apart are dropped.
    """
    boxes, landmarks = [], []
    for row in detections:
        if np.linalg.norm([row[5] - row[7], row[6] - row[8]]) < MIN_EYE_DISTANCE:
            continue
        boxes.append(row[:4])
        landmarks.append(np.array([[row[i], row[i + 1]] for i in range(5, 15, 2)]))
    return boxes, landmarks


def center_face_index(boxes: list[np.ndarray], height: int, width: int) -> int:
    """The face whose box centre is nearest the image centre (facexlib's get_center_face)."""
    centre = np.array([width / 2, height / 2])
    dists = [np.linalg.norm(np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]) - centre) for b in boxes]
    return int(np.argmin(dists))


def largest_indices(boxes: list[np.ndarray], keep: int, height: int, width: int) -> list[int]:
    """Indices of the ``keep`` largest boxes (clipped to the image), in their original order."""
    def area(b):
        x1, x2 = np.clip([b[0], b[2]], 0, width)
        y1, y2 = np.clip([b[1], b[3]], 0, height)
        return (x2 - x1) * (y2 - y1)

    ranked = sorted(range(len(boxes)), key=lambda i: -area(boxes[i]))[:keep]
    return sorted(ranked)


def align_face(img: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 512x512 aligned crop of one face and the 2x3 affine that made it."""
    affine = cv2.estimateAffinePartial2D(landmarks, FACE_TEMPLATE, method=cv2.LMEDS)[0]
    crop = cv2.warpAffine(img, affine, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT,
                          borderValue=_BORDER_FILL)
    return crop, affine


def inverse_affine(affine: np.ndarray, scale: float) -> np.ndarray:
    """From the aligned crop back into the upscaled picture (with facexlib's half-pixel offset)."""
    inverse = cv2.invertAffineTransform(affine) * scale
    if scale > 1:
        inverse[:, 2] += 0.5 * scale
    return inverse


# facexlib blurs the paste mask twice with this Gaussian (OpenCV's default reflect-101 border).
MASK_BLUR_SIZE, MASK_BLUR_SIGMA = 101, 11
MASK_BORDER = 10  # pixels along each edge of the mask set to zero after the blurs


def parse_mask(parsing: np.ndarray) -> np.ndarray:
    """A soft 512x512 paste mask in [0, 1] from ParseNet's per-pixel class indices."""
    mask = PARSE_TO_MASK[parsing]
    for _ in range(2):
        mask = cv2.GaussianBlur(mask, (MASK_BLUR_SIZE, MASK_BLUR_SIZE), MASK_BLUR_SIGMA)
    return clear_mask_border(mask) / 255.0


def clear_mask_border(masks):
    """Zero the MASK_BORDER pixels along the edges of the last two axes, in place (a numpy
    array or a torch tensor: one mask or a stack), as facexlib does after its blurs."""
    b = MASK_BORDER
    masks[..., :b, :] = 0
    masks[..., -b:, :] = 0
    masks[..., :, :b] = 0
    masks[..., :, -b:] = 0
    return masks


@dataclass
class FacePatch:
    """Where a restored face goes in the picture: the rectangle (x, y, width, height) where its
    warped soft mask is not zero, the mask cut to it (height x width x 1, float64), and the
    warp's reach (the picture's top-left part that holds the whole face, width x height)."""

    rect: tuple[int, int, int, int]
    weight: np.ndarray
    reach: tuple[int, int]


def face_patch(mask: np.ndarray, inverse: np.ndarray, size: tuple[int, int]) -> FacePatch | None:
    """The patch of a 512x512 soft ``mask`` warped by ``inverse`` into a picture of ``size``
    (width, height), or None where none of it lands in the picture.

    Outside the rectangle facexlib's whole-canvas blend gives the canvas back exactly, and a
    face covers a small part of a photo, so only the rectangle is blended (and only the faces'
    rectangles are held in float64: an 8192x8192 canvas would take 1.6 GB). The warps stop at
    the face's bottom-right corner: OpenCV computes each pixel from its own coordinates, so
    the top-left part of a warp is exactly the whole warp's, while a window elsewhere (a shifted
    affine) rounds its fixed-point coordinates differently and would move pixels from GFPGANer's.
    """
    side = mask.shape[0]
    corners = np.array([[[-1.0, -1.0], [side + 1.0, -1.0], [-1.0, side + 1.0], [side + 1.0, side + 1.0]]])
    far = cv2.transform(corners, inverse)[0].max(axis=0)  # bilinear reach of the mask, plus a pixel
    reach = (min(size[0], int(np.ceil(far[0])) + 2), min(size[1], int(np.ceil(far[1])) + 2))
    if reach[0] <= 0 or reach[1] <= 0:
        return None
    warped = cv2.warpAffine(mask, inverse, reach, flags=cv2.INTER_AREA)
    x, y, width, height = cv2.boundingRect((warped > 0).view(np.uint8))
    if not width:
        return None
    return FacePatch((x, y, width, height), warped[y:y + height, x:x + width, None].copy(), reach)


def covering_rect(patches: list[FacePatch]) -> tuple[int, int, int, int]:
    """The smallest rectangle (x0, y0, x1, y1) holding every patch."""
    return (min(p.rect[0] for p in patches), min(p.rect[1] for p in patches),
            max(p.rect[0] + p.rect[2] for p in patches), max(p.rect[1] + p.rect[3] for p in patches))


def blend_face(window: np.ndarray, origin: tuple[int, int], face: np.ndarray, patch: FacePatch,
               inverse: np.ndarray) -> None:
    """Blend one restored face through its patch into ``window``, in place: the float64 part of
    the picture whose top-left corner is at ``origin`` (x, y), holding the patch's rectangle."""
    x, y, width, height = patch.rect
    warped_face = cv2.warpAffine(face, inverse, patch.reach)[y:y + height, x:x + width]
    region = window[y - origin[1]:y - origin[1] + height, x - origin[0]:x - origin[0] + width]
    # facexlib's weight * face + (1 - weight) * canvas, in place: the same products and sum
    region *= 1 - patch.weight
    region += patch.weight * warped_face
