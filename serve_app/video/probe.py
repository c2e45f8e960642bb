"""What a video claims to be, from its container's header, and whether it is within the limits.

PyAV (FFmpeg's libraries in-process) reads the header: the container, the first video stream's
codec, size, frame rate, frame count and duration, and the other streams that are copied. No
frame is decoded here, so a ten-hour file is refused as fast as a ten-second one.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

from serve_app.config import LimitsConfig
from serve_app.errors import CorruptVideo, NoVideoStream, TooManyPixels, UnsupportedFormat, VideoTooLong

# FFmpeg's demuxer names for the containers taken, and the container each is written back as:
# MP4 and MOV stay MP4 (H.264 and AAC as QuickTime holds them); Matroska and WebM become Matroska,
# which holds H.264 and any audio or subtitle codec WebM may carry; animated GIF and PNG become
# MP4, as the web's GIF hosts serve them.
CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4", "matroska,webm": "matroska", "gif": "mp4", "apng": "mp4"}
ANIMATIONS = ("gif", "apng")  # their frames are counted from their packets: the header has no count
_SIGNATURES = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"),  # ISO base media (MP4, MOV), EBML (MKV, WebM)
               (0, b"GIF87a"), (0, b"GIF89a"))
_PNG = b"\x89PNG\r\n\x1a\n"
HEAD_BYTES = 4096  # enough to find an APNG's animation chunk behind the usual ones before it


def looks_like_video(data: bytes) -> bool:
    """Whether ``data`` starts as an MP4, MOV, MKV, WebM, GIF or animated PNG file does (a first,
    cheap look at up to ``HEAD_BYTES``)."""
    return any(data[at:at + len(magic)] == magic for at, magic in _SIGNATURES) or _animated_png(data)


def _animated_png(data: bytes) -> bool:
    """A PNG with an animation control chunk (acTL), which must come before its first image data."""
    if not data.startswith(_PNG):
        return False
    at = len(_PNG)
    while at + 8 <= len(data):
        length, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
        if kind == b"acTL":
            return True
        if kind == b"IDAT":
            return False
        at += length + 12  # length, type, data, CRC
    return False


@dataclass(frozen=True)
class VideoHeader:
    container: str  # what the result is written as: "mp4" or "matroska"
    codec: str
    width: int
    height: int
    rate: Fraction  # frames a second
    frames: int  # from the header, or duration x rate where the container does not count them
    frames_counted: bool  # whether the container counted them (MP4) or they are duration x rate
    duration_s: float
    copied: tuple[str, ...]  # the kinds of the other streams kept: "audio", "subtitle"

    @property
    def pixels(self) -> int:
        return self.width * self.height


def probe_video(source: Path | bytes | BinaryIO, limits: LimitsConfig) -> VideoHeader:
    """The header of the video at ``source`` once it is within ``limits``; a typed error if not."""
    import av  # the CPU side's only FFmpeg import, here and in the pipeline

    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with av.open(source, "r") as container:
            return _header(container, limits)
    except av.error.InvalidDataError as exc:
        raise CorruptVideo(f"the video container could not be read: {exc}") from None
    except av.error.FFmpegError as exc:
        raise CorruptVideo(f"the video could not be opened: {exc}") from None


def _header(container, limits: LimitsConfig) -> VideoHeader:
    kind = CONTAINERS.get(container.format.name)
    if kind is None:
        raise UnsupportedFormat(f"{container.format.long_name} files are not supported; send MP4, MOV, MKV, WebM, "
                                "or an animated GIF or PNG")
    if not container.streams.video:
        raise NoVideoStream("the file holds no video stream")
    stream = container.streams.video[0]
    context = stream.codec_context
    if context is None or context.codec is None:
        raise UnsupportedFormat(f"the video codec {stream.codec_context.name!r} cannot be decoded here")
    width, height = context.width, context.height
    rate = stream.average_rate or stream.guessed_rate
    if not width or not height or not rate:
        raise CorruptVideo("the video stream's header gives no frame size or frame rate")
    if container.format.name in ANIMATIONS:
        frames, duration = _count(container, stream)
        if frames < 2:
            raise UnsupportedFormat("a GIF or PNG of one frame is a still picture: send it as PNG, JPEG or WebP "
                                    "to /v1/restore")
    else:
        duration = _duration(stream, container)
        frames = stream.frames or round(duration * rate)
    header = VideoHeader(kind, context.name, width, height, Fraction(rate), frames,
                         bool(stream.frames) or container.format.name in ANIMATIONS, duration,
                         tuple(s.type for s in container.streams if s.type in ("audio", "subtitle")))
    check_limits(header, limits)
    return header


def _count(container, stream) -> tuple[int, float]:
    """An animation's frames and duration, from its packets (read, not decoded)."""
    frames, first, end = 0, None, 0
    for packet in container.demux(stream):
        if packet.size and packet.pts is not None:
            frames += 1
            first = packet.pts if first is None else first
            end = max(end, packet.pts + (packet.duration or 0))
    return frames, float((end - (first or 0)) * stream.time_base)


def _duration(stream, container) -> float:
    """The video stream's own duration: MP4 gives it; Matroska's muxer writes it as a DURATION
    tag; else the container's, which may run on with audio or subtitles."""
    if stream.duration is not None:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            pass
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    raise CorruptVideo("the container's header gives no duration")


def check_limits(header: VideoHeader, limits: LimitsConfig) -> None:
    if header.pixels > limits.max_pixels:
        raise TooManyPixels(f"the video's frames are {header.width}x{header.height} = {header.pixels} pixels; "
                            f"the limit is {limits.max_pixels}")
    if header.duration_s > limits.max_video_s:
        raise VideoTooLong(f"the video lasts {header.duration_s:.1f} s; the limit is {limits.max_video_s:g} s")
    if header.frames > limits.max_video_frames:
        raise VideoTooLong(f"the video has {header.frames} frames; the limit is {limits.max_video_frames}")


def check_output(header: VideoHeader, size: tuple[int, int], limits: LimitsConfig) -> None:
    """The restored video's cost, from its frame size: pixels a frame and a second."""
    width, height = size
    if width * height > limits.max_output_pixels:
        raise TooManyPixels(f"the result's frames would be {width}x{height}; the limit is "
                            f"{limits.max_output_pixels} pixels")
    per_s = width * height * header.rate
    if per_s > limits.max_output_pixels_per_s:
        raise VideoTooLong(f"the result would be {width}x{height} at {float(header.rate):g} fps = "
                           f"{int(per_s)} pixels a second; the limit is {limits.max_output_pixels_per_s}")
