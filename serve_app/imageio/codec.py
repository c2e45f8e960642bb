"""Decode once, encode once: bytes <-> arrays in OpenCV's channel order (BGR, BGRA or gray).

Arrays keep their bit depth (uint8 or uint16) and alpha, the way the official Real-ESRGAN
script reads its inputs with ``cv2.IMREAD_UNCHANGED``; EXIF orientation is applied here
because IMREAD_UNCHANGED leaves it out.
"""
from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from serve_app.errors import CorruptImage, EmptyImage, InvalidOption, TooManyPixels, UnsupportedFormat
from serve_app.imageio.metadata import Metadata, embed
from serve_app.imageio.png import encode_png
from serve_app.imageio.probe import ImageHeader, probe

Mode = Literal["L", "BGR", "BGRA"]
OUTPUT_FORMATS = ("png", "jpeg", "webp")
# of each output format (a video job's too)
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp",
                 "mp4": "video/mp4", "mkv": "video/x-matroska"}
_MODES = {2: "L", 3: "BGR", 4: "BGRA"}


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # HxW (L), HxWx3 (BGR) or HxWx4 (BGRA); uint8 or uint16
    header: ImageHeader

    @property
    def mode(self) -> Mode:
        return mode_of(self.pixels)

    @property
    def bit_depth(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8


def mode_of(pixels: np.ndarray) -> Mode:
    return "L" if pixels.ndim == 2 else _MODES[pixels.shape[2]]


def decode(data: bytes, *, max_bytes: int, max_pixels: int, header: ImageHeader | None = None) -> DecodedImage:
    """Bytes to an upright array; every limit is checked from the header first (``header``: the
    caller's ``probe`` of the same bytes with the same limits, not read again)."""
    header = header or probe(data, max_bytes=max_bytes, max_pixels=max_pixels)
    if header.format == "jpeg" and not jpeg_is_complete(data):
        raise CorruptImage("the JPEG data ends before its end-of-image marker (truncated file?)")
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise CorruptImage(f"the {header.format} header is valid but its pixels are not (truncated file?)")
    if pixels.shape[:2] != (header.height, header.width):
        # Two parsers disagreeing about the size is a crafted or damaged file: trust neither.
        raise CorruptImage(
            f"the header says {header.width}x{header.height} but the data holds "
            f"{pixels.shape[1]}x{pixels.shape[0]}"
        )
    pixels = _normalise_channels(pixels)
    return DecodedImage(apply_orientation(pixels, header.orientation), header)


def check_array(pixels: np.ndarray, *, max_pixels: int) -> np.ndarray:
    """An array handed in from Python must be what decode() would have produced."""
    if not isinstance(pixels, np.ndarray) or pixels.ndim not in (2, 3):
        raise InvalidOption("the image must be an HxW, HxWx3 (BGR) or HxWx4 (BGRA) numpy array")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise EmptyImage("the image array is empty")
    if height * width > max_pixels:
        raise TooManyPixels(f"the image is {width}x{height} = {height * width} pixels; the limit is {max_pixels}")
    return _normalise_channels(pixels)


def _normalise_channels(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype not in (np.uint8, np.uint16):
        raise UnsupportedFormat(f"{pixels.dtype} samples are not supported; send 8- or 16-bit images")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3 and pixels.shape[2] not in (3, 4):
        raise UnsupportedFormat(f"images with {pixels.shape[2]} channels are not supported")
    return pixels


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an array stored in EXIF orientation 1..8 upright (a view where possible)."""
    if orientation in (5, 6, 7, 8):
        # 5..8 store the picture transposed; undo the transpose, then the flips of 1..4.
        pixels = np.swapaxes(pixels, 0, 1)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation == 2:
        pixels = pixels[:, ::-1]
    elif orientation == 3:
        pixels = pixels[::-1, ::-1]
    elif orientation == 4:
        pixels = pixels[::-1]
    return pixels


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG's scan data is followed by its end-of-image marker.

    OpenCV decodes a truncated JPEG without error (grey fill and a warning on stderr), so the
    check is ours: walk the marker segments to the first start-of-scan, then look for EOI
    after it (scan data cannot contain FF D9, since FF bytes in it are stuffed as FF 00).
    """
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", i) >= 0
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return False


def default_output_format(input_format: str) -> str:
    """JPEG stays JPEG (re-encoding a photo as PNG multiplies its size); all else becomes PNG."""
    return "jpeg" if input_format == "jpeg" else "png"


def encode(pixels: np.ndarray, fmt: str, *, quality: int | None = None, png_compression: int = 1,
           helper: Executor | None = None, metadata: Metadata | None = None) -> bytes:
    """An array to PNG, JPEG or WebP bytes.

    PNG keeps 16 bits and alpha. JPEG has neither: 16-bit drops to 8 and alpha is discarded.
    WebP keeps alpha at 8 bits. ``quality`` (1-100) applies to JPEG (default 95) and WebP
    (default 90; above 100 is lossless). PNG goes through ``encode_png`` (ISA-L's deflate at
    ``png_compression``, 0-3), about twice as fast as OpenCV's writer, and a large one may
    share its deflating with a ``helper`` thread pool. ``metadata`` (an ICC profile, EXIF) is
    written into the file.
    """
    if fmt not in OUTPUT_FORMATS:
        raise InvalidOption(f"format must be one of {', '.join(OUTPUT_FORMATS)}, not {fmt!r}")
    if quality is not None and not 1 <= quality <= 101:
        raise InvalidOption(f"quality must be between 1 and 100 (101: lossless WebP), not {quality}")
    if fmt == "png":
        return embed(encode_png(pixels, png_compression, helper=helper), fmt, metadata)
    if fmt == "jpeg":
        pixels = _drop_alpha(to_8bit(pixels))
        params = [cv2.IMWRITE_JPEG_QUALITY, min(quality or 95, 100)]
    else:
        pixels = to_8bit(pixels)
        params = [cv2.IMWRITE_WEBP_QUALITY, quality or 90]
    ok, buf = cv2.imencode("." + fmt, np.ascontiguousarray(pixels), params)
    if not ok:  # OpenCV reports no reason; this only happens for shapes we never produce
        raise RuntimeError(f"OpenCV could not encode a {pixels.shape} {pixels.dtype} image as {fmt}")
    return embed(buf.tobytes(), fmt, metadata)


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    return np.round(pixels.astype(np.float32) / 257.0).astype(np.uint8)


def _drop_alpha(pixels: np.ndarray) -> np.ndarray:
    return pixels[:, :, :3] if pixels.ndim == 3 and pixels.shape[2] == 4 else pixels
