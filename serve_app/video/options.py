"""A video job's output settings beside the picture options, under their own names."""
from __future__ import annotations

from pydantic import ValidationError

from serve_app.errors import InvalidOption
from serve_app.video.pipeline import VideoOutput

VIDEO_FORMATS = ("mp4", "mkv")


def split_video_options(values: dict) -> tuple[dict, dict]:
    """(the picture options, the video output settings given, validated) from a submit's fields."""
    video = {k: values[k] for k in VideoOutput.model_fields if k in values}
    try:
        checked = VideoOutput.model_validate(video)
    except ValidationError as exc:
        raise InvalidOption("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    rest = {k: v for k, v in values.items() if k not in video}
    return rest, checked.model_dump(include=set(video))
