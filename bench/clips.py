"""Short videos from FFmpeg's test sources (through PyAV's lavfi input), for the video benchmark
and the tests: testsrc2 frames in H.264, a 440 Hz sine in AAC, and optionally a SubRip track."""
from __future__ import annotations

from pathlib import Path

import av


def make_clip(path: Path, *, size=(48, 32), rate=12, seconds=1.0, audio=True, subtitles=False,
              container: str | None = None, keyframe_every: int | None = None, open_gop: bool = False) -> Path:
    """``keyframe_every`` frames a keyframe (x264's default: 250); ``open_gop``: keyframes after
    the first are recovery points whose leading B-frames refer to the frames before them."""
    width, height = size
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        params = [f"keyint={keyframe_every}:min-keyint={keyframe_every}:scenecut=0"] if keyframe_every else []
        params += ["open-gop=1:bframes=3:b-adapt=0"] if open_gop else []
        if params:
            video.options = {"x264-params": ":".join(params)}
        tone = out.add_stream("aac", rate=44100) if audio else None
        srt = None
        if subtitles:  # SubRip read from a file, its packets copied as the service copies them
            (path.parent / "lines.srt").write_text("1\n00:00:00,000 --> 00:00:00,800\nFirst line\n\n"
                                                    "2\n00:00:01,000 --> 00:00:01,800\nSecond line\n")
            srt = av.open(str(path.parent / "lines.srt"))
            text = out.add_stream_from_template(srt.streams[0])
        encode_source(out, video, f"testsrc2=size={width}x{height}:rate={rate}:duration={seconds}", "video")
        if tone is not None:
            encode_source(out, tone, f"sine=frequency=440:duration={seconds}", "audio")
        if srt is not None:
            for packet in srt.demux():
                if packet.size:
                    packet.stream = text
                    out.mux(packet)
            srt.close()
    return path


def encode_source(out, stream, source: str, kind: str) -> None:
    """A lavfi test source's frames encoded into ``stream`` of ``out``."""
    with av.open(source, format="lavfi") as src:
        for frame in src.decode(**{kind: 0}):
            frame.pts = None
            if kind == "video":  # lavfi marks its frames I, which libx264 would obey: every frame a keyframe
                frame.pict_type = 0
            out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
