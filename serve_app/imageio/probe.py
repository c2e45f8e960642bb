"""Read what an image claims to be from its header alone, and refuse it early.

Pillow's ``Image.open`` is lazy: it parses the header (size, format, EXIF) and decodes no pixel,
so a 900-kB PNG that claims 30000x30000 pixels is refused here in well under a millisecond and
without allocating its 2.7 GB of pixels.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from serve_app.errors import CorruptImage, EmptyImage, NotAnImage, TooManyBytes, TooManyPixels, UnsupportedFormat

# Pillow format name -> ours. These are the formats OpenCV decodes at 8 and 16 bits.
SUPPORTED = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
_EXIF_ORIENTATION = 0x0112
_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")
_TEXT_MARKERS = (b"<svg", b"<?xml", b"<!doctype", b"<html")


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int
    orientation: int = 1  # EXIF orientation, 1 (upright) to 8
    icc: bytes | None = None  # the ICC colour profile, as stored
    exif: bytes | None = None  # the EXIF block (a TIFF structure), as stored

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) once the EXIF orientation is applied."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def probe(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageHeader:
    """The header of ``data``, once it passes the byte and pixel limits; raises a typed error."""
    if not data:
        raise EmptyImage("the request carried no image bytes")
    if len(data) > max_bytes:
        raise TooManyBytes(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    with warnings.catch_warnings():
        # Pillow warns on, then refuses, very large images; our own limit below is stricter.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size
                _check_size(fmt, width, height, max_pixels)  # before EXIF: reading it may decode
                orientation = _orientation(img)
                icc, exif = img.info.get("icc_profile") or None, _exif_block(img)
        except Image.DecompressionBombError:
            raise TooManyPixels(
                f"the image header claims over {2 * Image.MAX_IMAGE_PIXELS} pixels; the limit is {max_pixels}"
            ) from None
        except UnidentifiedImageError:
            raise _unrecognised(data) from None
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow's "broken header" errors
            if data.startswith(_SIGNATURES) or data[8:12] == b"WEBP":
                raise CorruptImage(f"the image header is damaged or cut short: {exc}") from None
            raise NotAnImage(f"the image header could not be read: {exc}") from None
    return ImageHeader(SUPPORTED[fmt], width, height, orientation, icc, exif)


def _check_size(fmt: str, width: int, height: int, max_pixels: int) -> None:
    if fmt not in SUPPORTED:
        animated = " (an animated GIF is restored as a video job: POST /v1/jobs)" if fmt == "GIF" else ""
        raise UnsupportedFormat(f"{fmt} images are not supported; send PNG, JPEG, WebP, BMP or TIFF{animated}")
    if width <= 0 or height <= 0:
        raise NotAnImage(f"the header claims an empty {width}x{height} image")
    if width * height > max_pixels:
        raise TooManyPixels(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def _orientation(img: Image.Image) -> int:
    # Pillow's PNG getexif() decodes every pixel when no eXIf chunk came before the image data,
    # looking for one after it: 4 ms for a 512x512 photo, and 0.76 s for a 140-kB PNG of
    # 12000x12000 zeros. Such a late chunk is rare (Pillow and most writers put it first); a
    # PNG without an early one is taken as upright.
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block must not cost the picture; treat it as upright
        return 1
    return value if 1 <= value <= 8 else 1


def _exif_block(img: Image.Image) -> bytes | None:
    """The EXIF TIFF structure without the ``Exif\\0\\0`` some containers put before it."""
    exif = img.info.get("exif")
    if not isinstance(exif, bytes):
        return None
    return exif[6:] if exif.startswith(b"Exif\x00\x00") else exif or None


def _unrecognised(data: bytes) -> Exception:
    head = data[:512].lstrip().lower()
    if any(marker in head for marker in _TEXT_MARKERS):
        return UnsupportedFormat("vector and markup images (SVG, XML, HTML) are not supported")
    return NotAnImage("the bytes are not an image in any known format")
