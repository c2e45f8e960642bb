import io
import struct
import threading
import tracemalloc
import zlib
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from conftest import photo_with_profile_and_gps
from serve_app.errors import (
    CorruptImage, EmptyImage, InvalidOption, NotAnImage, TooManyBytes, TooManyPixels, UnsupportedFormat,
)
from serve_app.imageio import decode, default_output_format, encode, probe
from serve_app.imageio import png
from serve_app.imageio.png import encode_png

LIMITS = dict(max_bytes=10_000_000, max_pixels=4_000_000)


def _png(pixels) -> bytes:
    return cv2.imencode(".png", pixels)[1].tobytes()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(side: int) -> bytes:
    """A valid PNG header claiming side x side grey pixels, with a small IDAT of zeros."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    squeeze = zlib.compressobj(9)
    idat = b"".join(squeeze.compress(b"\0" * (side + 1)) for _ in range(2000)) + squeeze.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_decode_keeps_bgr_alpha_gray_and_16_bit(small_photo):
    bgra = np.dstack([small_photo, small_photo[:, :, 0]])
    wide = small_photo.astype(np.uint16) * 257 + 3
    for pixels, mode, depth in [(small_photo, "BGR", 8), (bgra, "BGRA", 8),
                                (small_photo[:, :, 1], "L", 8), (wide, "BGR", 16)]:
        img = decode(_png(pixels), **LIMITS)
        assert (img.mode, img.bit_depth, img.header.format) == (mode, depth, "png")
        np.testing.assert_array_equal(img.pixels, pixels)


def test_exif_orientation_is_applied(small_photo):
    rgb = Image.fromarray(cv2.cvtColor(small_photo, cv2.COLOR_BGR2RGB))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95, exif=exif)
    img = decode(buf.getvalue(), **LIMITS)
    h, w = small_photo.shape[:2]
    assert img.header.orientation == 6 and img.pixels.shape[:2] == (w, h)
    plain = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(img.pixels, np.rot90(plain, k=-1))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_round_trips(small_photo, fmt):
    data = encode(small_photo, fmt, quality=100 if fmt != "png" else None)
    back = decode(data, **LIMITS)
    assert back.header.format == fmt and back.pixels.shape == small_photo.shape
    error = np.abs(back.pixels.astype(int) - small_photo)
    if fmt == "png":
        assert error.max() == 0
    else:  # lossy at quality 100: chroma subsampling still moves a few values
        assert error.mean() < 2


class _RunsAtOnce(Executor):
    """A helper that is always free: it deflates its half as soon as it is handed it."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _every_mode(small_photo, channels, dtype):
    rng = np.random.default_rng(channels or 0)
    noise = rng.integers(0, 4, small_photo.shape[:2] + (4,))  # values the up-filter must wrap around
    pixels = np.dstack([small_photo, small_photo[:, :, :1]]).astype(np.int64) * (257 if dtype == np.uint16 else 1)
    pixels = ((pixels + noise) % (np.iinfo(dtype).max + 1)).astype(dtype)
    return pixels[:, :, 0] if channels is None else np.ascontiguousarray(pixels[:, :, :channels])


def _read_by_two_readers(data: bytes, pixels: np.ndarray) -> None:
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == pixels.dtype and np.array_equal(back, pixels.squeeze())
    with Image.open(io.BytesIO(data)) as pil:  # a second, independent reader
        pil.load()
        assert pil.size == (pixels.shape[1], pixels.shape[0])


@pytest.mark.parametrize("channels", [None, 1, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_writer_round_trips_every_mode_exactly_and_any_reader_reads_it(small_photo, channels, dtype):
    pixels = _every_mode(small_photo, channels, dtype)
    _read_by_two_readers(encode_png(pixels), pixels)
    with pytest.raises(ValueError):
        encode_png(pixels.astype(np.float32))


@pytest.mark.parametrize("channels", [None, 1, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_halves_deflated_apart_join_into_one_stream_that_any_reader_reads(small_photo, channels, dtype,
                                                                              monkeypatch):
    monkeypatch.setattr(png, "_SPLIT_BYTES", 1)  # small pictures split too
    pixels = _every_mode(small_photo, channels, dtype)
    data = encode_png(pixels, helper=_RunsAtOnce())
    _read_by_two_readers(data, pixels)
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    assert zlib.decompress(idat)  # one stream, its checksum over both halves (zlib checks it)


def test_png_half_handed_to_a_busy_helper_is_taken_back(small_photo, monkeypatch):
    monkeypatch.setattr(png, "_SPLIT_BYTES", 1)
    busy, release = ThreadPoolExecutor(max_workers=1), threading.Event()
    busy.submit(release.wait)  # its only thread is taken
    try:
        with ThreadPoolExecutor(max_workers=1) as caller:  # so a hang fails the test instead
            data = caller.submit(encode_png, small_photo, helper=busy).result(timeout=30)
        _read_by_two_readers(data, small_photo)
    finally:
        release.set()
        busy.shutdown()


def test_encode_bit_depth_and_alpha_rules(small_photo):
    wide = small_photo.astype(np.uint16) * 257
    assert decode(encode(wide, "png"), **LIMITS).bit_depth == 16
    assert decode(encode(wide, "jpeg"), **LIMITS).bit_depth == 8
    bgra = np.dstack([small_photo, np.full(small_photo.shape[:2], 128, np.uint8)])
    assert decode(encode(bgra, "jpeg"), **LIMITS).mode == "BGR"
    assert decode(encode(bgra, "webp", quality=101), **LIMITS).mode == "BGRA"
    with pytest.raises(InvalidOption):
        encode(small_photo, "gif")
    with pytest.raises(InvalidOption):
        encode(small_photo, "jpeg", quality=0)


def test_default_output_format():
    assert default_output_format("jpeg") == "jpeg"
    assert default_output_format("webp") == "png"


@pytest.mark.parametrize(
    "data, error",
    [
        (b"", EmptyImage),
        (b"hello, this is plainly not a picture" * 10, NotAnImage),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
         UnsupportedFormat),
        (b"<svg width='4' height='4'></svg>", UnsupportedFormat),
    ],
)
def test_bad_bytes_get_typed_errors(data, error):
    with pytest.raises(error):
        decode(data, **LIMITS)


def test_gif_is_unsupported_and_the_error_points_an_animation_to_jobs():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    with pytest.raises(UnsupportedFormat, match="animated GIF is restored as a video job"):
        decode(buf.getvalue(), **LIMITS)


@pytest.mark.parametrize("fmt", [".png", ".jpg", ".webp"])
def test_truncated_files_are_corrupt(small_photo, fmt):
    whole = cv2.imencode(fmt, small_photo)[1].tobytes()
    with pytest.raises(CorruptImage):
        decode(whole[: len(whole) * 2 // 3], **LIMITS)


def test_byte_limit_is_checked_first(small_photo):
    data = _png(small_photo)
    with pytest.raises(TooManyBytes):
        decode(data, max_bytes=len(data) - 1, max_pixels=10**9)


def test_pixel_bomb_is_refused_from_the_header_without_allocating():
    bomb = _png_bomb(30000)  # 900 Mpx claimed, about 1 kB of IDAT
    assert len(bomb) < 900_000
    tracemalloc.start()
    try:
        with pytest.raises(TooManyPixels):
            decode(bomb, **LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # decoding it would take 900 MB


def test_probing_a_png_decodes_no_pixel_even_under_pillows_own_bomb_limit(monkeypatch):
    # Pillow's PNG getexif() loads the whole image when no eXIf chunk precedes the pixels: a
    # 140-kB PNG of 12000x12000 zeros (144 Mpx; Pillow itself refuses from 179 Mpx) took 0.76 s
    # to refuse, and every photo was decoded twice.
    loads = []
    real_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda img: loads.append(img.size) or real_load(img))
    with pytest.raises(TooManyPixels):
        decode(_png_bomb(12000), **LIMITS)
    pixels = np.zeros((64, 48, 3), np.uint8)
    assert (probe(_png(pixels), **LIMITS).width, decode(_png(pixels), **LIMITS).pixels.shape) == (48, (64, 48, 3))
    assert loads == []


def test_png_exif_orientation_is_applied(small_photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(small_photo[:, :, ::-1]).save(buf, "PNG", exif=exif)  # eXIf before the pixels
    img = decode(buf.getvalue(), **LIMITS)
    assert img.header.orientation == 6
    np.testing.assert_array_equal(img.pixels, np.rot90(small_photo, k=-1))


def test_pixel_limit_below_pillows_own(small_photo):
    h, w = small_photo.shape[:2]
    assert probe(_png(small_photo), max_bytes=10**6, max_pixels=h * w).pixels == h * w
    with pytest.raises(TooManyPixels):
        probe(_png(small_photo), max_bytes=10**6, max_pixels=h * w - 1)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("alpha", [False, True])
def test_icc_profile_and_exif_are_carried_with_the_orientation_reset(small_photo, fmt, alpha):
    from serve_app.imageio import Metadata

    data, icc = photo_with_profile_and_gps(small_photo, orientation=6)
    decoded = decode(data, **LIMITS)
    pixels = np.dstack([decoded.pixels, decoded.pixels[:, :, 0]]) if alpha else decoded.pixels
    kept = Metadata.carried(decoded.header.icc, decoded.header.exif)
    for quality in (None, 101):  # WebP: lossy (VP8 in an extended file when there is alpha) and lossless
        encoded = encode(pixels, fmt, quality=quality, metadata=kept)
        with Image.open(io.BytesIO(encoded)) as out:
            out.load()  # every chunk and segment where a reader expects it
            assert out.format.lower() == fmt and out.size == (40, 56)
            assert out.info["icc_profile"] == icc
            exif = out.getexif()
            assert exif[0x0112] == 1 and exif[0x010F] == "Camera maker"
            gps = exif.get_ifd(0x8825)
            assert (gps[1], gps[3], float(gps[2][2]), float(gps[4][2])) == ("N", "W", 12.5, 39.9)
            assert out.mode == ("RGBA" if alpha and fmt != "jpeg" else "RGB")
        np.testing.assert_array_equal(decode(encoded, **LIMITS).pixels, decode(encode(pixels, fmt, quality=quality),
                                                                            **LIMITS).pixels)
        plain = encode(pixels, fmt, quality=quality)
        with Image.open(io.BytesIO(plain)) as out:
            assert "icc_profile" not in out.info and not out.getexif()


def test_exif_that_does_not_parse_is_dropped_and_a_large_profile_spans_jpeg_segments(small_photo):
    from serve_app.imageio import Metadata

    assert Metadata.carried(None, b"not a TIFF structure") is None
    icc = bytes(range(256)) * 700  # 179 kB: three APP2 segments
    encoded = encode(small_photo, "jpeg", metadata=Metadata(icc=icc))
    assert encoded.count(b"ICC_PROFILE\x00") == 3
    with Image.open(io.BytesIO(encoded)) as out:
        assert out.info["icc_profile"] == icc
