"""PNG writing with ISA-L's deflate: the encode is most of a request's CPU time.

A 1024x1024 upscaled photo took 37 ms through OpenCV (zlib level 1, "average" filter) and
16 ms here (every row "up"-filtered, ISA-L level 1), with files 5-8% larger (skimage's
astronaut, coffee, chelsea, rocket at 2x). ISA-L writes a standard zlib stream, so any PNG
reader reads the result.
"""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
from isal import isal_zlib

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA
_FILTER_UP = 2


def encode_png(pixels: np.ndarray, level: int = 1) -> bytes:
    """A grey, BGR or BGRA array (8 or 16 bit, as decode() returns) to PNG bytes.

    ``level`` is ISA-L's compression level, 0 (fastest) to 3.
    """
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG holds 8- or 16-bit samples, not {pixels.dtype}")
    image = pixels if pixels.ndim == 3 else pixels[:, :, np.newaxis]
    height, width, channels = image.shape
    if channels not in _COLOUR_TYPES:
        raise ValueError(f"PNG holds grey, BGR or BGRA pictures, not {channels} channels")
    if channels >= 3:  # PNG stores RGB(A); OpenCV hands us BGR(A)
        # OpenCV's swap: 0.1 ms for a 1024x1024 picture, where numpy's fancy indexing took 6.6 ms.
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGRA2RGBA)
    rows = np.ascontiguousarray(image, dtype=">u2" if image.dtype == np.uint16 else np.uint8)
    rows = rows.view(np.uint8).reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8 * pixels.itemsize, _COLOUR_TYPES[channels], 0, 0, 0)
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", isal_zlib.compress(_up_filtered(rows), level)), _chunk(b"IEND", b"")))


def _up_filtered(rows: np.ndarray) -> np.ndarray:
    """Each row as its difference from the row above (PNG filter 2), after its filter byte.

    One vectorised subtraction: the cheapest filter that still lets deflate find the
    repetition in smooth pictures."""
    filtered = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    return filtered


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))
