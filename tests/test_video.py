"""Videos: the header's limits, and the streaming pipeline on short videos made from FFmpeg's test
sources (through PyAV's lavfi input), restored by the same orchestration as pictures."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from conftest import encode_source, make_video, packets_of, restore_with
from serve_app.config import EngineConfig, LimitsConfig, TileConfig
from serve_app.engines.local import LocalNetworks
from serve_app.errors import CorruptVideo, NoVideoStream, TooManyPixels, UnsupportedFormat, VideoTooLong
from serve_app.video.pipeline import VideoOutput, cut, encode_segment, restore_video
from serve_app.video.probe import HEAD_BYTES, check_output, looks_like_video, probe_video

pytestmark = pytest.mark.engine
MODEL = "realesr-animevideov3"


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def networks(store):
    return LocalNetworks(store, EngineConfig(device="cpu", tile=TileConfig(size=0)))


def _submitter(networks, options, seen: list):
    """Frames through the service's orchestration of a request, a few at once, as a CPU replica runs them."""
    pool = ThreadPoolExecutor(4)

    def submit(frame):
        seen.append(frame)
        return pool.submit(lambda: restore_with(networks, frame, model=MODEL, **options).pixels)
    return submit


def _segments(networks, options: dict, size, seen: list, output: VideoOutput, window: int = 5):
    """Each segment encoded in this process, as a CPU replica does it."""
    submit = _submitter(networks, options, seen)

    def run_segment(segment, out, on_frames):
        return encode_segment(segment, out, size, submit, output=output, window=window, on_frames=on_frames)
    return run_segment


def _restore(source, target, header, run_segment, *, segment_s=60.0, parallel=2, **kwargs):
    work = target.parent / f"{target.name}-work"
    work.mkdir()
    return restore_video(source, target, header, run_segment, workdir=work, segment_s=segment_s, parallel=parallel,
                         **kwargs)


def _pts(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        return [f.pts for f in container.decode(video=0)]


def _pts_s(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        return [float(f.pts * f.time_base) for f in container.decode(video=0)]


@pytest.mark.parametrize("container, subtitles", [("mp4", False), ("matroska", True)])
def test_a_video_keeps_its_frames_rate_duration_and_other_streams(networks, tmp_path, container, subtitles):
    source = make_video(tmp_path / f"in.{container}", container=container, subtitles=subtitles, keyframe_every=4)
    header = probe_video(source, LimitsConfig())
    assert (header.width, header.height, header.rate, header.frames) == (48, 32, 12, 12)
    assert header.copied == (("audio", "subtitle") if subtitles else ("audio",))
    seen, reports = [], []
    target = tmp_path / "out"
    run_segment = _segments(networks, {"scale": 2}, (96, 64), seen, VideoOutput(crf=0, preset="ultrafast"))
    # a keyframe every third of a second: three segments of four frames, two at a time
    result = _restore(source, target, header, run_segment, segment_s=0.3, on_progress=reports.append,
                      progress_every_s=0.01)
    assert (result.frames, result.segments, result.width, result.height, result.rate) == (12, 3, 96, 64, 12)
    out = probe_video(target, LimitsConfig())
    assert (out.frames, out.rate, out.width, out.height, out.codec) == (12, 12, 96, 64, "h264")
    assert abs(out.duration_s - header.duration_s) <= 1 / 12  # within one frame
    assert _pts_s(target) == pytest.approx(_pts_s(source), abs=1e-3)  # each frame shown when it was
    assert packets_of(target, "audio") == packets_of(source, "audio")  # copied bit for bit
    if subtitles:
        assert packets_of(target, "subtitle") == [b"First line", b"Second line"]
    # the segments joined as they were encoded: no packet re-encoded at the seams
    encoded = sorted((target.parent / "out-work").glob("restored-*"))
    assert len(encoded) == 3
    assert packets_of(target, "video") == [p for segment in encoded for p in packets_of(segment, "video")]
    # every frame went through the picture path and came out as it restored it
    restored = [restore_with(networks, frame, model=MODEL, scale=2).pixels for frame in _frames(source)]
    assert sorted(a.tobytes() for a in seen) == sorted(b.tobytes() for b in _frames(source))
    for ours, still in zip(_frames(target), restored):  # H.264 at crf 0 in 4:2:0: colour rounding only
        assert np.abs(ours.astype(int) - still.astype(int)).mean() < 3
    done = [r.frames_done for r in reports]
    assert done == sorted(done) and done[-1] == 12 and len(done) >= 2
    assert reports[-1].frames_total == 12 and reports[-1].eta_s == 0 and reports[-1].fps > 0


def test_segments_start_only_at_keyframes_no_later_frame_refers_back_past(tmp_path):
    closed = make_video(tmp_path / "closed.mp4", seconds=2.0, audio=False, keyframe_every=6)
    opened = make_video(tmp_path / "open.mp4", seconds=2.0, audio=False, keyframe_every=6, open_gop=True)
    for source, count in ((closed, 4), (opened, 1)):  # an open GOP's keyframes have leading B-frames
        work = tmp_path / source.stem
        work.mkdir()
        segments = cut(source, work, segment_s=0.4, rate=probe_video(source, LimitsConfig()).rate)
        assert len(segments) == count
        assert sum(len(_frames(segment.path)) for segment in segments) == 24  # every frame decodes in its segment
        assert [p for segment in segments for p in packets_of(segment.path, "video")] == packets_of(source, "video")
        assert [t for segment in segments for t in segment.pts] == sorted(_pts(source))


def test_an_odd_output_size_loses_its_last_row_for_yuv420_and_keeps_it_for_yuv444(networks, tmp_path):
    source = make_video(tmp_path / "in.mp4", size=(50, 38), seconds=0.5, audio=False)
    header = probe_video(source, LimitsConfig())
    for pix_fmt, size in (("yuv420p", (74, 56)), ("yuv444p", (75, 57))):
        target = tmp_path / f"{pix_fmt}.mp4"
        _restore(source, target, header, _segments(networks, {"scale": 1.5}, (75, 57), [],
                                                 VideoOutput(pix_fmt=pix_fmt, preset="ultrafast")))
        out = probe_video(target, LimitsConfig())
        assert (out.width, out.height, out.frames) == (*size, 6)


def test_a_cancel_seen_in_a_progress_report_stops_every_segment(networks, tmp_path):
    source = make_video(tmp_path / "in.mp4", seconds=4.0, keyframe_every=12)
    header = probe_video(source, LimitsConfig())
    seen = []

    def cancelled(progress):
        if progress.frames_done >= 3:
            raise KeyboardInterrupt("cancelled")
    run_segment = _segments(networks, {"scale": 2}, (96, 64), seen, VideoOutput(preset="ultrafast"), window=2)
    with pytest.raises(KeyboardInterrupt):
        _restore(source, tmp_path / "out.mp4", header, run_segment, segment_s=1.0, on_progress=cancelled,
                 progress_every_s=0.01)
    # two segments at a time: what was reported, and each segment's window and the frame it was encoding
    assert len(seen) <= 3 + 2 * (2 + 1 + 1) < 48


def _animation(path: Path, kind: str, frames: int = 7) -> Path:
    """An animated GIF (palette) or PNG (RGB) of a bar moving across, 10 frames a second."""
    codec, pix_fmt = {"gif": ("gif", "rgb8"), "apng": ("apng", "rgb24")}[kind]
    with av.open(str(path), "w", format=kind) as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, pix_fmt
        for i in range(frames):
            img = np.full((32, 48, 3), 40, np.uint8)
            img[:, i * 6:(i + 1) * 6] = (255, 128, 0)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt)
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("kind", ["gif", "apng"])
def test_an_animated_gif_or_png_becomes_an_mp4_of_its_frames(networks, tmp_path, kind):
    source = _animation(tmp_path / f"in.{kind}", kind)
    assert looks_like_video(source.read_bytes()[:HEAD_BYTES])
    header = probe_video(source, LimitsConfig())
    assert (header.container, header.frames, header.rate, header.duration_s) == ("mp4", 7, 10, pytest.approx(0.7))
    target = tmp_path / "out.mp4"
    run_segment = _segments(networks, {"scale": 2}, (96, 64), [], VideoOutput(crf=0, preset="ultrafast"))
    assert _restore(source, target, header, run_segment, segment_s=0.2).frames == 7
    out = probe_video(target, LimitsConfig())
    assert (out.frames, out.rate, out.width, out.height, out.codec) == (7, 10, 96, 64, "h264")
    assert _pts_s(target) == pytest.approx(_pts_s(source), abs=1e-3)
    for ours, frame in zip(_frames(target), _frames(source)):
        still = restore_with(networks, frame, model=MODEL, scale=2).pixels
        assert np.abs(ours.astype(int) - still.astype(int)).mean() < 3


def test_a_gif_or_png_of_one_frame_is_a_still_picture(tmp_path, small_photo):
    png = cv2.imencode(".png", small_photo)[1].tobytes()
    assert not looks_like_video(png)  # a PNG without an animation chunk goes the picture way
    with pytest.raises(UnsupportedFormat, match="one frame"):
        probe_video(_animation(tmp_path / "one.gif", "gif", frames=1), LimitsConfig())


def test_limits_are_checked_from_the_header(tmp_path):
    source = make_video(tmp_path / "in.mp4", size=(64, 48), rate=12, seconds=2.0)
    header = probe_video(source, LimitsConfig())
    with pytest.raises(VideoTooLong, match="lasts 2.0 s"):
        probe_video(source, LimitsConfig(max_video_s=1.5))
    with pytest.raises(VideoTooLong, match="24 frames"):
        probe_video(source, LimitsConfig(max_video_frames=20))
    with pytest.raises(TooManyPixels, match="64x48"):
        probe_video(source, LimitsConfig(max_pixels=64 * 47))
    with pytest.raises(VideoTooLong, match="pixels a second"):
        check_output(header, (256, 192), LimitsConfig(max_output_pixels_per_s=256 * 192 * 12 - 1))
    check_output(header, (256, 192), LimitsConfig(max_output_pixels_per_s=256 * 192 * 12))
    # the same from bytes, as a submit sees an upload
    assert probe_video(source.read_bytes(), LimitsConfig()) == header


def test_broken_and_foreign_files_get_typed_errors(tmp_path, networks):
    source = make_video(tmp_path / "in.mp4")
    data = source.read_bytes()
    with pytest.raises(CorruptVideo):
        probe_video(data[: len(data) // 2], LimitsConfig())  # MP4 writes its index last: cut, no header
    with pytest.raises(CorruptVideo):
        probe_video(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100, LimitsConfig())
    # Matroska's header comes first: cut short, it probes, and the frames run out
    mkv = make_video(tmp_path / "in.mkv", container="matroska")
    truncated = tmp_path / "truncated.mkv"
    truncated.write_bytes(mkv.read_bytes()[: mkv.stat().st_size // 2])
    header = probe_video(truncated, LimitsConfig())
    with pytest.raises(CorruptVideo, match="only"):
        _restore(truncated, tmp_path / "out.mkv", header, _segments(networks, {"scale": 2}, (96, 64), [],
                                                             VideoOutput(preset="ultrafast")))
    with av.open(str(tmp_path / "tone.mp4"), "w") as out:  # audio and no video
        encode_source(out, out.add_stream("aac", rate=44100), "sine=frequency=440:duration=0.5", "audio")
    with pytest.raises(NoVideoStream):
        probe_video(tmp_path / "tone.mp4", LimitsConfig())
    make_video(tmp_path / "in.avi", container="avi", seconds=0.5, audio=False)
    with pytest.raises(UnsupportedFormat, match="AVI"):
        probe_video(tmp_path / "in.avi", LimitsConfig())
