"""An input's ICC profile and EXIF, carried into the encoded output.

The encoders write pixels only; the profile and EXIF are spliced into their bytes as the
containers define them (PNG iCCP/eXIf chunks, JPEG APP1/APP2 segments, WebP's extended
format), which costs microseconds where a second encode through Pillow would cost the whole
encode again. EXIF's orientation is reset to 1: the pixels were turned upright at decode.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

_ORIENTATION = 0x0112
_JPEG_SEGMENT = 65533  # the most a JPEG segment holds after its length field
_ICC_MARKER = b"ICC_PROFILE\x00"
_ICC_PART = _JPEG_SEGMENT - len(_ICC_MARKER) - 2  # an APP2 segment also numbers its part
_WEBP_ICC, _WEBP_EXIF = 0x20, 0x08  # VP8X flags


@dataclass(frozen=True)
class Metadata:
    icc: bytes | None = None
    exif: bytes | None = None  # a TIFF structure, orientation 1

    @classmethod
    def carried(cls, icc: bytes | None, exif: bytes | None) -> Metadata | None:
        """What of an input's metadata an output keeps: EXIF whose orientation cannot be reset
        is dropped, since a viewer would turn the upright pixels again."""
        exif = upright_exif(exif) if exif else None
        return cls(icc, exif) if icc or exif else None


def upright_exif(exif: bytes) -> bytes | None:
    """``exif`` with IFD0's orientation set to 1; None if the TIFF structure does not parse."""
    if len(exif) < 8 or exif[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "<" if exif[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", exif, 4)
    if ifd + 2 > len(exif):
        return None
    (count,) = struct.unpack_from(order + "H", exif, ifd)
    if ifd + 2 + 12 * count > len(exif):
        return None
    patched = bytearray(exif)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind = struct.unpack_from(order + "HH", exif, entry)
        if tag == _ORIENTATION and kind == 3:  # SHORT, its value held in the entry itself
            struct.pack_into(order + "H", patched, entry + 8, 1)
    return bytes(patched)


def embed(encoded: bytes, fmt: str, metadata: Metadata | None) -> bytes:
    """``encoded`` (PNG, JPEG or WebP bytes from ``encode``) with ``metadata`` in it."""
    if metadata is None:
        return encoded
    return {"png": _png, "jpeg": _jpeg, "webp": _webp}[fmt](encoded, metadata)


def _png(encoded: bytes, metadata: Metadata) -> bytes:
    # After IHDR (8 signature bytes + its 25): iCCP must precede the image data, and readers
    # look for eXIf there too.
    chunks = []
    if metadata.icc:
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(metadata.icc)))
    if metadata.exif:
        chunks.append(_png_chunk(b"eXIf", metadata.exif))
    return encoded[:33] + b"".join(chunks) + encoded[33:]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def _jpeg(encoded: bytes, metadata: Metadata) -> bytes:
    segments = []
    if metadata.exif and len(metadata.exif) + 6 <= _JPEG_SEGMENT:  # EXIF cannot span segments
        segments.append(_jpeg_segment(0xE1, b"Exif\x00\x00" + metadata.exif))
    if metadata.icc:
        parts = [metadata.icc[i:i + _ICC_PART] for i in range(0, len(metadata.icc), _ICC_PART)]
        if len(parts) <= 255:
            segments += [_jpeg_segment(0xE2, _ICC_MARKER + bytes((n, len(parts))) + part)
                         for n, part in enumerate(parts, 1)]
    at = 2  # after SOI, and after the JFIF APP0 segment where the encoder wrote one
    if encoded[2:4] == b"\xff\xe0":
        at = 4 + int.from_bytes(encoded[4:6], "big")
    return encoded[:at] + b"".join(segments) + encoded[at:]


def _jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(body) + 2) + body


def _webp(encoded: bytes, metadata: Metadata) -> bytes:
    chunks = _riff_chunks(encoded[12:])
    if chunks[0][0] == b"VP8X":
        flags, canvas = chunks[0][1][0], chunks[0][1][4:10]
        chunks = chunks[1:]
    else:  # a simple file: its one chunk is the bitstream, which says the size
        flags, canvas = _alpha_flag(chunks[0]), _canvas_of(chunks[0])
    head, tail = [], []
    if metadata.icc:
        flags |= _WEBP_ICC
        head.append((b"ICCP", metadata.icc))
    if metadata.exif:
        flags |= _WEBP_EXIF
        tail.append((b"EXIF", metadata.exif))
    vp8x = (b"VP8X", bytes((flags, 0, 0, 0)) + canvas)
    body = b"WEBP" + b"".join(_riff_chunk(kind, data) for kind, data in [vp8x, *head, *chunks, *tail])
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 0
    while at + 8 <= len(data):
        kind, size = data[at:at + 4], struct.unpack_from("<I", data, at + 4)[0]
        chunks.append((kind, data[at + 8:at + 8 + size]))
        at += 8 + size + (size & 1)
    return chunks


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) & 1)


def _canvas_of(chunk: tuple[bytes, bytes]) -> bytes:
    """VP8X's 24-bit width-1 and height-1, read from a VP8 or VP8L bitstream's header."""
    kind, data = chunk
    if kind == b"VP8L":
        bits = int.from_bytes(data[1:5], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:  # VP8: a 10-byte frame header, then 14-bit width and height
        width, height = (struct.unpack_from("<HH", data, 6)[i] & 0x3FFF for i in (0, 1))
    return (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")


def _alpha_flag(chunk: tuple[bytes, bytes]) -> int:
    kind, data = chunk
    return 0x10 if kind == b"VP8L" and (int.from_bytes(data[1:5], "little") >> 28) & 1 else 0
