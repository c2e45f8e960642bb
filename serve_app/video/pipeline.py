"""A video restored frame by frame as a stream: decode, restore, encode, with the other streams copied.

Frames are decoded in order and handed to ``submit`` (in the service, the CPU deployment's
``restore_array``, whose tiles join the GPU's batches beside still pictures) up to ``window`` at
once, and encoded in order as their results come back; audio and subtitle packets are copied
into the output as they are read. Memory holds ``window`` frames and the encoder's lookahead,
whatever the video's length; the disk holds the input and the output file, never frames.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import CorruptVideo
from serve_app.video.probe import VideoHeader

_ENCODERS = {"h264": "libx264", "hevc": "libx265"}


class VideoOutput(BaseModel):
    """How the restored frames are encoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    video_codec: Literal["h264", "hevc"] = Field(default="h264", description="H.264 (libx264) or H.265 (libx265).")
    crf: int = Field(default=18, ge=0, le=51, description="Constant rate factor: 0 lossless, 18 visually "
                     "lossless, 23 x264's default, 51 worst.")
    pix_fmt: Literal["yuv420p", "yuv444p", "yuv420p10le"] = Field(default="yuv420p", description="yuv420p "
                                                                   "plays everywhere; its frames have even sides.")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = "medium"


class Pending(Protocol):
    def result(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Progress:
    frames_done: int
    frames_total: int
    fps: float  # restored frames a second since the start
    eta_s: float | None


@dataclass(frozen=True)
class VideoResult:
    frames: int
    width: int
    height: int
    rate: Fraction
    duration_s: float


def restore_video(source: Path, target: Path, header: VideoHeader, size: tuple[int, int],
                  submit: Callable[[np.ndarray], Pending], *, output: VideoOutput, window: int = 8,
                  on_progress: Callable[[Progress], None] | None = None,
                  progress_every_s: float = 2.0) -> VideoResult:
    """``source`` restored into ``target`` (written as ``header.container``), each frame becoming
    ``size`` (width, height) through ``submit``. ``on_progress`` is
    called at most every ``progress_every_s`` and at the end; raising from it (a cancelled job)
    stops the work at once, leaving ``target`` for the caller to remove."""
    import av

    with av.open(str(source), "r") as inp, av.open(str(target), "w", format=header.container) as out:
        video = inp.streams.video[0]
        video.thread_type = "AUTO"  # FFmpeg's own decoding threads
        copied = [s for s in inp.streams if s.type in ("audio", "subtitle")]
        copies = {s.index: out.add_stream_from_template(s) for s in copied}
        encoder = _Encoder(out, video, output, size)  # before any packet: the header lists every stream
        pending: deque = deque()
        started, reported, done = time.monotonic(), 0.0, 0

        def encode_oldest() -> None:
            nonlocal done, reported
            pts, job = pending.popleft()
            encoder.encode(job.result(), pts)
            done += 1
            now = time.monotonic()
            if on_progress and now - reported >= progress_every_s:
                reported = now
                on_progress(_progress(done, header.frames, now - started))

        try:
            for packet in inp.demux(video, *copied):
                if packet.stream.index in copies:
                    if packet.dts is not None:  # the demuxer's empty flush packet carries nothing
                        packet.stream = copies[packet.stream.index]
                        out.mux(packet)
                    continue
                for frame in packet.decode():
                    pending.append((frame.pts, submit(frame.to_ndarray(format="bgr24"))))
                    while len(pending) >= window:
                        encode_oldest()
            while pending:
                encode_oldest()
        except av.error.FFmpegError as exc:
            raise CorruptVideo(f"the video could not be decoded through: {exc}") from None
        finally:
            for _, job in pending:  # stopped early (a cancel, an error): the frames sent go no further
                getattr(job, "cancel", lambda: None)()
        encoder.flush()
        # a file cut short, its header intact: fewer frames than it promised (or than its
        # duration implies, give or take a few)
        if done < header.frames - (1 if header.frames_counted else max(2, header.frames // 50)):
            raise CorruptVideo(f"the header promises {header.frames} frames but only {done} could be decoded")
        if on_progress:
            on_progress(_progress(done, done, time.monotonic() - started))
        return VideoResult(done, encoder.width, encoder.height, header.rate,
                           float(done / header.rate))


class _Encoder:
    """The restored frames into the output's video stream, their timestamps those of the input."""

    def __init__(self, out, video, output: VideoOutput, size: tuple[int, int]):
        self.video = video
        width, height = size
        # 4:2:0 halves both sides, so they must be even: an odd last row or column is cut
        even = output.pix_fmt.startswith("yuv420")
        self.width, self.height = (width // 2 * 2, height // 2 * 2) if even else (width, height)
        self.out, self.stream = out, out.add_stream(_ENCODERS[output.video_codec], rate=video.average_rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, output.pix_fmt
        self.stream.codec_context.time_base = video.time_base
        self.stream.options = {"crf": str(output.crf), "preset": output.preset}

    def encode(self, pixels: np.ndarray, pts: int | None) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[:self.height, :self.width]), format="bgr24")
        frame.pts, frame.time_base = pts, self.video.time_base
        self.out.mux(self.stream.encode(frame))

    def flush(self) -> None:
        self.out.mux(self.stream.encode(None))


def _progress(done: int, total: int, elapsed: float) -> Progress:
    fps = done / elapsed if elapsed > 0 else 0.0
    return Progress(done, total, round(fps, 2), round((total - done) / fps, 1) if fps > 0 else None)
