"""A video restored as a stream of frames, cut into segments that run in parallel and are joined
without re-encoding.

- ``cut``: the input's video packets copied, not decoded, into segments that each start at a clean
  keyframe (one no later frame refers back past), about ``segment_s`` long;
- ``encode_segment``: one segment decoded on one thread, its frames handed to ``submit`` (in the
  service, a CPU replica's restoration, whose tiles join the GPU's batches beside still
  pictures) up to ``window`` at once, and encoded in order on another thread as their results
  come back;
- ``join``: the encoded segments' packets one after another (every segment starts with a keyframe,
  and the encoder's settings are the same, so its parameter sets are too), the input's audio and
  subtitle packets copied beside them, interleaved by time.

``restore_video`` runs the three with up to ``parallel`` segments at once; ``run_segment`` may run a
segment anywhere (the job consumer sends each to a CPU replica). Memory holds ``window`` frames and
the encoder's lookahead per segment in flight; the disk holds the input, its segments and the output,
never frames.
"""
from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import CorruptVideo
from serve_app.video.probe import VideoHeader

_ENCODERS = {"h264": "libx264", "hevc": "libx265"}
_ENCODED_FORMAT = "mp4"  # keeps every timestamp as the encoder gave it, in the input's time base
_SEGMENT_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": ("mp4", "mp4"), "gif": ("gif", "gif"), "apng": ("png", "apng")}
_REORDER_DEPTH = 32  # packets after a keyframe searched for a frame shown before it (an open GOP)


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


OnFrames = Callable[[int], None]  # frames just encoded (0: still working); raising stops the segment


@dataclass(frozen=True)
class Segment:
    """Packets of the input's video, copied into a file of their own. Their timestamps travel
    beside them: a container's edit list may round them when the segment starts past zero."""

    path: Path
    pts: tuple[int, ...]  # its frames' timestamps in the order they are shown, in ``time_base``
    time_base: Fraction
    rate: Fraction


RunSegment = Callable[[Segment, Path, OnFrames], int]  # (segment, where its encoding goes, on_frames) -> frames


@dataclass(frozen=True)
class Progress:
    frames_done: int
    frames_total: int
    fps: float  # restored frames a second since the start
    eta_s: float | None


@dataclass(frozen=True)
class VideoResult:
    frames: int
    segments: int
    width: int
    height: int
    rate: Fraction
    duration_s: float


class Stopped(Exception):
    """A segment's work was told to stop (its job was cancelled or another segment failed)."""


def restore_video(source: Path, target: Path, header: VideoHeader, run_segment: RunSegment, *, workdir: Path,
                  segment_s: float, parallel: int, on_progress: Callable[[Progress], None] | None = None,
                  progress_every_s: float = 2.0) -> VideoResult:
    """``source`` restored into ``target`` (written as ``header.container``), each segment through
    ``run_segment``. ``on_progress`` is called at most every ``progress_every_s`` and at the end;
    raising from it (a cancelled job) stops every segment, leaving ``workdir`` and ``target`` for
    the caller to remove."""
    segments = cut(source, workdir, segment_s, header.rate)
    outputs = [workdir / f"restored-{i}.{_ENCODED_FORMAT}" for i in range(len(segments))]
    lock, stop, done = threading.Lock(), threading.Event(), [0]
    started = time.monotonic()

    def on_frames(n: int) -> None:
        if stop.is_set():
            raise Stopped()
        with lock:
            done[0] += n

    with ThreadPoolExecutor(max(1, min(parallel, len(segments))), thread_name_prefix="video-segment") as pool:
        futures = [pool.submit(run_segment, segment, out, on_frames) for segment, out in zip(segments, outputs)]
        try:
            while True:
                finished, running = wait(futures, timeout=progress_every_s, return_when=FIRST_EXCEPTION)
                for future in finished:
                    future.result()  # a segment's error ends the video
                if not running:
                    break
                if on_progress:
                    on_progress(_progress(done[0], header.frames, time.monotonic() - started))
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise
    frames = sum(future.result() for future in futures)
    # a file cut short, its header intact: fewer frames than it promised (or than its
    # duration implies, give or take a few)
    if frames < header.frames - (1 if header.frames_counted else max(2, header.frames // 50)):
        raise CorruptVideo(f"the header promises {header.frames} frames but only {frames} could be decoded")
    width, height = join(outputs, segments, source, target, header.container)
    if on_progress:
        on_progress(_progress(frames, frames, time.monotonic() - started))
    return VideoResult(frames, len(segments), width, height, header.rate, float(frames / header.rate))


def cut(source: Path, workdir: Path, segment_s: float, rate: Fraction) -> list[Segment]:
    """``source``'s video packets, copied into segments of about ``segment_s`` seconds each;
    ``rate`` is its frame rate as the header gave it."""
    import av

    try:
        with av.open(str(source), "r") as inp:
            video = inp.streams.video[0]
            # the input's own kind of container: Matroska leaves some packets without a decode
            # time, and GIF and APNG are only held by their own
            suffix, kind = _SEGMENT_CONTAINERS.get(inp.format.name, ("mkv", "matroska"))
            packets = [(p.pts, p.is_keyframe) for p in inp.demux(video) if p.size]
            if not packets:
                raise CorruptVideo("the video stream holds no frames")
            starts = sorted(_cut_points(packets, float(video.time_base), segment_s)) + [len(packets)]
            inp.seek(0)
            demuxed = (p for p in inp.demux(video) if p.size)
            segments = []
            for n, (start, end) in enumerate(zip(starts, starts[1:])):
                path = workdir / f"segment-{n}.{suffix}"
                with av.open(str(path), "w", format=kind) as out:
                    stream = out.add_stream_from_template(video)
                    for packet in itertools.islice(demuxed, end - start):
                        packet.stream = stream
                        out.mux(packet)
                pts = sorted(p for p, _ in packets[start:end] if p is not None)
                segments.append(Segment(path, tuple(pts), Fraction(video.time_base), rate))
            return segments
    except av.error.FFmpegError as exc:
        raise CorruptVideo(f"the video could not be read through: {exc}") from None


def _cut_points(packets: list[tuple[int | None, bool]], time_base: float, segment_s: float) -> set[int]:
    """Indices (in decode order) of the packets each segment starts with: the first, then the first
    clean keyframe ``segment_s`` or more after the last start."""
    starts, last = {0}, packets[0][0] if packets else 0
    for i, (pts, key) in enumerate(packets):
        if not key or pts is None or i == 0 or (pts - (last or 0)) * time_base < segment_s:
            continue
        # leading frames (shown before this keyframe, decoded after it) refer to the segment before
        if all(later is not None and later >= pts for later, _ in packets[i + 1:i + 1 + _REORDER_DEPTH]):
            starts.add(i)
            last = pts
    return starts


def encode_segment(segment: Segment, target: Path, size: tuple[int, int], submit: Callable[[np.ndarray], Pending], *,
                output: VideoOutput, window: int = 8, on_frames: OnFrames = lambda n: None) -> int:
    """Every frame of ``segment`` through ``submit``, each result becoming ``size`` (width, height),
    encoded into ``target`` with the input's timestamps; the frames encoded. Decoding and
    sending run on a thread of their own, so they overlap the encode."""
    import av

    with av.open(str(segment.path), "r") as inp, av.open(str(target), "w", format=_ENCODED_FORMAT) as out:
        video = inp.streams.video[0]
        video.thread_type = "AUTO"  # FFmpeg's own decoding threads
        encoder = _Encoder(out, segment, output, size)
        sent: queue.Queue = queue.Queue()
        slots, stop = threading.Semaphore(window), threading.Event()

        def decode_and_send() -> None:
            try:
                for frame in inp.decode(video):
                    while not slots.acquire(timeout=0.2):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    sent.put(submit(frame.to_ndarray(format="bgr24")))
                sent.put(None)
            except BaseException as exc:  # noqa: BLE001  the encoding thread raises it
                sent.put(exc)

        sender = threading.Thread(target=decode_and_send, name="video-decode", daemon=True)
        sender.start()
        done = 0
        try:
            while (item := sent.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if done >= len(segment.pts):
                    raise CorruptVideo("the video decodes to more frames than it has packets")
                encoder.encode(item.result(), segment.pts[done])
                slots.release()
                done += 1
                on_frames(1)
            encoder.flush()
        except av.error.FFmpegError as exc:
            raise CorruptVideo(f"the video could not be decoded through: {exc}") from None
        finally:
            stop.set()
            sender.join()
            while not sent.empty():  # stopped early: the frames sent go no further
                item = sent.get()
                if item is not None and not isinstance(item, BaseException):
                    getattr(item, "cancel", lambda: None)()
    return done


def join(encodings: list[Path], segments: list[Segment], source: Path, target: Path, container: str) -> tuple[int, int]:
    """The ``encodings`` of ``segments`` one after another as ``target``'s video, with ``source``'s
    audio and subtitle streams copied; the video's (width, height)."""
    import av

    with ExitStack() as files:
        inp = files.enter_context(av.open(str(source), "r"))
        encoded = [files.enter_context(av.open(str(path), "r")) for path in encodings]
        out = files.enter_context(av.open(str(target), "w", format=container))
        first = encoded[0].streams.video[0]
        for other in encoded[1:]:
            if other.streams.video[0].codec_context.extradata != first.codec_context.extradata:
                raise RuntimeError("the segments' encoders wrote different parameter sets; they cannot be joined")
        video = out.add_stream_from_template(first)
        video.codec_context.framerate = segments[0].rate  # the input's: Matroska writes it as each frame's duration
        copied = [s for s in inp.streams if s.type in ("audio", "subtitle")]
        copies = {s.index: out.add_stream_from_template(s) for s in copied}

        def restored() -> Iterator:
            for container, segment in zip(encoded, segments):
                # MP4 keeps a segment's start in an edit list counted in milliseconds: every timestamp
                # of the segment may come back shifted by the same fraction of one; shifted back here
                stream = container.streams.video[0]
                packets = [packet for packet in container.demux(stream) if packet.size]
                shift = round(segment.pts[0] * segment.time_base / stream.time_base) - min(p.pts for p in packets)
                for packet in packets:
                    packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
                    packet.stream = video
                    yield packet

        def kept() -> Iterator:
            for packet in inp.demux(*copied) if copied else ():
                if packet.dts is not None and packet.size:  # the demuxer's flush packets carry nothing
                    packet.stream = copies[packet.stream.index]
                    yield packet

        for *_, packet in heapq.merge(_timed(restored(), 0), _timed(kept(), 1)):
            out.mux(packet)
        return first.codec_context.width, first.codec_context.height


def _timed(packets: Iterator, order: int) -> Iterator[tuple[float, int, int, object]]:
    """Each packet after its time in seconds, its source's order and its place there (so that
    equal times keep each source's order)."""
    for n, packet in enumerate(packets):
        at = packet.dts if packet.dts is not None else packet.pts
        yield float(at * packet.time_base) if at is not None else 0.0, order, n, packet


class _Encoder:
    """The restored frames into the output's video stream, their timestamps those of the input."""

    def __init__(self, out, segment: Segment, output: VideoOutput, size: tuple[int, int]):
        self.time_base = segment.time_base
        width, height = size
        # 4:2:0 halves both sides, so they must be even: an odd last row or column is cut
        even = output.pix_fmt.startswith("yuv420")
        self.width, self.height = (width // 2 * 2, height // 2 * 2) if even else (width, height)
        self.out, self.stream = out, out.add_stream(_ENCODERS[output.video_codec], rate=segment.rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, output.pix_fmt
        self.stream.codec_context.time_base = segment.time_base
        self.stream.options = {"crf": str(output.crf), "preset": output.preset}

    def encode(self, pixels: np.ndarray, pts: int) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[:self.height, :self.width]), format="bgr24")
        frame.pts, frame.time_base = pts, self.time_base
        self.out.mux(self.stream.encode(frame))

    def flush(self) -> None:
        self.out.mux(self.stream.encode(None))


def _progress(done: int, total: int, elapsed: float) -> Progress:
    fps = done / elapsed if elapsed > 0 else 0.0
    return Progress(done, total, round(fps, 2), round(max(0, total - done) / fps, 1) if fps > 0 else None)
