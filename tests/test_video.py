"""Videos: the header's limits, and the streaming pipeline on short videos made from FFmpeg's test
sources (through PyAV's lavfi input), restored by the same orchestration as pictures."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import encode_source, make_video, packets_of, restore_with
from serve_app.config import EngineConfig, LimitsConfig, TileConfig
from serve_app.engines.local import LocalNetworks
from serve_app.errors import CorruptVideo, NoVideoStream, TooManyPixels, UnsupportedFormat, VideoTooLong
from serve_app.video.pipeline import VideoOutput, restore_video
from serve_app.video.probe import check_output, probe_video

pytestmark = pytest.mark.engine
MODEL = "realesr-animevideov3"


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def networks(store):
    return LocalNetworks(store, EngineConfig(device="cpu", tile=TileConfig(size=0)))


def _submitter(networks, options, seen: list):
    """Frames through the service's orchestration of a request, a few at once, as the consumer sends them."""
    pool = ThreadPoolExecutor(4)

    def submit(frame):
        seen.append(frame)
        return pool.submit(lambda: restore_with(networks, frame, model=MODEL, **options).pixels)
    return submit


@pytest.mark.parametrize("container, subtitles", [("mp4", False), ("matroska", True)])
def test_a_video_keeps_its_frames_rate_duration_and_other_streams(networks, tmp_path, container, subtitles):
    source = make_video(tmp_path / f"in.{container}", container=container, subtitles=subtitles)
    header = probe_video(source, LimitsConfig())
    assert (header.width, header.height, header.rate, header.frames) == (48, 32, 12, 12)
    assert header.copied == (("audio", "subtitle") if subtitles else ("audio",))
    seen, reports = [], []
    target = tmp_path / "out"
    result = restore_video(source, target, header, (96, 64), _submitter(networks, {"scale": 2}, seen),
                           output=VideoOutput(crf=0, preset="ultrafast"), window=5,
                           on_progress=reports.append, progress_every_s=0)
    assert (result.frames, result.width, result.height, result.rate) == (12, 96, 64, 12)
    out = probe_video(target, LimitsConfig())
    assert (out.frames, out.rate, out.width, out.height, out.codec) == (12, 12, 96, 64, "h264")
    assert abs(out.duration_s - header.duration_s) <= 1 / 12  # within one frame
    assert packets_of(target, "audio") == packets_of(source, "audio")  # copied bit for bit
    if subtitles:
        assert packets_of(target, "subtitle") == [b"First line", b"Second line"]
    # every frame went through the picture path, in order, and came out as it restored it
    restored = [restore_with(networks, frame, model=MODEL, scale=2).pixels for frame in _frames(source)]
    assert len(seen) == 12 and all(np.array_equal(a, b) for a, b in zip(seen, _frames(source)))
    for ours, still in zip(_frames(target), restored):  # H.264 at crf 0 in 4:2:0: colour rounding only
        assert np.abs(ours.astype(int) - still.astype(int)).mean() < 3
    assert [r.frames_done for r in reports] == list(range(1, 13)) + [12]
    assert reports[-1].frames_total == 12 and reports[-1].eta_s == 0 and reports[-1].fps > 0


def test_an_odd_output_size_loses_its_last_row_for_yuv420_and_keeps_it_for_yuv444(networks, tmp_path):
    source = make_video(tmp_path / "in.mp4", size=(50, 38), seconds=0.5, audio=False)
    header = probe_video(source, LimitsConfig())
    for pix_fmt, size in (("yuv420p", (74, 56)), ("yuv444p", (75, 57))):
        target = tmp_path / f"{pix_fmt}.mp4"
        restore_video(source, target, header, (75, 57), _submitter(networks, {"scale": 1.5}, []),
                      output=VideoOutput(pix_fmt=pix_fmt, preset="ultrafast"))
        out = probe_video(target, LimitsConfig())
        assert (out.width, out.height, out.frames) == (*size, 6)


def test_a_cancel_seen_in_a_progress_report_stops_the_work(networks, tmp_path):
    source = make_video(tmp_path / "in.mp4")
    header = probe_video(source, LimitsConfig())
    seen = []

    def cancelled(progress):
        if progress.frames_done >= 3:
            raise KeyboardInterrupt("cancelled")
    with pytest.raises(KeyboardInterrupt):
        restore_video(source, tmp_path / "out.mp4", header, (96, 64), _submitter(networks, {"scale": 2}, seen),
                      output=VideoOutput(preset="ultrafast"), window=2, on_progress=cancelled, progress_every_s=0)
    assert len(seen) <= 3 + 2  # the frames reported, and the window already sent


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
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(mkv.read_bytes()[: mkv.stat().st_size // 2])
    header = probe_video(cut, LimitsConfig())
    with pytest.raises(CorruptVideo, match="only"):
        restore_video(cut, tmp_path / "out.mkv", header, (96, 64), _submitter(networks, {"scale": 2}, []),
                      output=VideoOutput(preset="ultrafast"))
    with av.open(str(tmp_path / "tone.mp4"), "w") as out:  # audio and no video
        encode_source(out, out.add_stream("aac", rate=44100), "sine=frequency=440:duration=0.5", "audio")
    with pytest.raises(NoVideoStream):
        probe_video(tmp_path / "tone.mp4", LimitsConfig())
    make_video(tmp_path / "in.avi", container="avi", seconds=0.5, audio=False)
    with pytest.raises(UnsupportedFormat, match="AVI"):
        probe_video(tmp_path / "in.avi", LimitsConfig())
