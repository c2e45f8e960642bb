"""Videos through the job path against the official video script's loop, frames a second.

Per case (realesr-animevideov3 on a 480p clip at x4; RealESRGAN_x4plus on a 720p clip at x2;
testsrc2 clips: the networks' time does not depend on what the frames show, x264's a little):
- reference: what ``inference_realesrgan_video.py`` does with one process: each frame in turn
  through ``RealESRGANer.enhance`` (untiled, fp16 on CUDA), then H.264, with PyAV in place of
  its ffmpeg pipes (the GPU machine has no ffmpeg binary; in-process I/O costs it less, not
  more); with and without the encode;
- ours: the clip as one job through the served graph and its consumer, cut into segments of a
  second that the CPU replicas restore and encode four at a time, frames a second from the job's
  run time; and the same frames sent through the CPU deployment 16 at a time with the outputs
  dropped (no encode): the two differ by what the encoder costs;
- the encoder alone: libx264 at the output size and the same settings, on moving frames made
  beforehand: frames a second on the whole node, and CPU seconds a frame;
- the GPU's busy share while the job runs (NVML's utilisation, sampled), and a still picture's
  latency (the served benchmark's 256x256 at x4) while the job runs, against unloaded.
Both sides encode as the official script does by default: libx264, crf 23, preset medium.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from ray import serve

from bench import jobs, served
from bench.clips import make_clip
from bench.common import percentiles
from serve_app.api import parse_options
from serve_app.engines.networks import build_network
from serve_app.jobs.broker import LocalBroker
from serve_app.video.pipeline import VideoOutput
from serve_app.weights import get_spec

OUTPUT = VideoOutput(crf=23, preset="medium")  # ffmpeg's libx264 defaults, as the official script gets
SEGMENT_S = 1.0  # the clips are a few seconds long, with a keyframe a second: a segment each


def cases(cuda: bool) -> list[dict]:
    if cuda:
        return [{"model": "realesr-animevideov3", "size": (854, 480), "scale": 4, "rate": 30, "seconds": 4},
                {"model": "RealESRGAN_x4plus", "size": (1280, 720), "scale": 2, "rate": 30, "seconds": 2}]
    return [{"model": "realesr-animevideov3", "size": (64, 48), "scale": 4, "rate": 12, "seconds": 1}]


def reference(store, case: dict, clip: Path, target: Path, device: str, encode: bool) -> dict:
    """The official script's loop: decode, ``enhance`` one frame, encode, in one process."""
    import av
    from realesrgan import RealESRGANer

    spec = get_spec(case["model"])
    upsampler = RealESRGANer(scale=spec.scale, model_path=str(store.fetch(spec, spec.file)),
                             model=build_network(spec), tile=0, pre_pad=0, half=device == "cuda",
                             device=torch.device(device))
    frames, started = 0, None
    with av.open(str(clip)) as inp, av.open(str(target), "w") as out:
        stream = None
        for frame in inp.decode(video=0):
            started = started or time.perf_counter()  # the model's first call included, not its load
            restored, _ = upsampler.enhance(frame.to_ndarray(format="bgr24"), outscale=case["scale"])
            if encode:
                if stream is None:
                    stream = out.add_stream("libx264", rate=case["rate"])
                    stream.width, stream.height, stream.pix_fmt = restored.shape[1], restored.shape[0], "yuv420p"
                    stream.options = {"crf": str(OUTPUT.crf), "preset": OUTPUT.preset}
                out.mux(stream.encode(av.VideoFrame.from_ndarray(restored, format="bgr24")))
            frames += 1
        if stream is not None:
            out.mux(stream.encode(None))
    return {"frames": frames, "fps": frames / (time.perf_counter() - started)}


def encoder_alone(size: tuple[int, int], frames: int, target: Path) -> dict:
    """libx264 at ``size`` with the output settings, on testsrc2's moving frames made beforehand:
    frames a second, and the CPU seconds (all of x264's threads) each frame costs."""
    import av

    with av.open(f"testsrc2=size={size[0]}x{size[1]}:rate=30", format="lavfi") as src:
        made = [f.reformat(format="yuv420p") for f, _ in zip(src.decode(video=0), range(frames))]
    with av.open(str(target), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": str(OUTPUT.crf), "preset": OUTPUT.preset}
        started, cpu = time.perf_counter(), time.process_time()
        for n, frame in enumerate(made):
            frame.pts, frame.pict_type = n, 0
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"frames": frames, "fps": frames / wall, "cpu_s_per_frame": cpu / frames, "cores": os.cpu_count()}


def frames_without_encode(clip: Path, options: dict, window: int) -> dict:
    """The consumer's frame loop through the CPU deployment, the outputs dropped."""
    import av

    handle = serve.get_deployment_handle("PreprocessDeployment", "restore")
    restore = parse_options(options)
    pending, frames, started = deque(), 0, time.perf_counter()
    with av.open(str(clip)) as inp:
        for frame in inp.decode(video=0):
            fitted = restore.fitted(frame.width, frame.height, 1 << 40)
            pending.append(handle.restore_array.remote(frame.to_ndarray(format="bgr24"), fitted, None))
            while len(pending) >= window:
                pending.popleft().result()
                frames += 1
    while pending:
        pending.popleft().result()
        frames += 1
    return {"frames": frames, "fps": frames / (time.perf_counter() - started)}


class _GpuBusy:
    """NVML's utilisation of the GPU, sampled while a job runs (None on a CPU)."""

    def __init__(self):
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self.stop.wait(0.1):
            self.samples.append(torch.cuda.utilization())

    def __enter__(self):
        if torch.cuda.is_available():
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()

    @property
    def share(self) -> float | None:
        return round(float(np.mean(self.samples)) / 100, 3) if self.samples else None


async def _job_with_stills(clip: Path, params: dict, still: tuple[bytes, dict]) -> tuple[dict, list[float]]:
    """The video job, and one still request after another while it runs: their latencies."""
    latencies: list[float] = []
    async with served._client() as http:
        async with http.post("/v1/jobs", data=clip.read_bytes(), params=params) as r:
            r.raise_for_status()
            job_id = (await r.json())["id"]
        while True:
            async with http.get(f"/v1/jobs/{job_id}") as r:
                job = await r.json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            if job["status"] == "processing":
                await served._post(http, *still, latencies)
            else:
                await asyncio.sleep(0.1)
    if job["status"] != "succeeded":
        raise RuntimeError(f"the video job did not succeed: {job}")
    return job, latencies


def run(report: dict, store, folder: Path, cache: Path, *, tile: int, batch: int, compile_mode: str,
        save=lambda: None) -> dict:
    """Deploy with the job queue and measure every case into ``report`` (inside
    ``served.start_ray()``'s instance); the reference runs first, alone on the device."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    work = folder / "video"
    work.mkdir(exist_ok=True)
    clips = {case["model"]: make_clip(work / f"{case['model']}.mp4", size=case["size"], rate=case["rate"],
                                      seconds=case["seconds"], keyframe_every=case["rate"])
             for case in cases(cuda)}
    for case in cases(cuda):
        name, clip = case["model"], clips[case["model"]]
        out_size = (case["size"][0] * case["scale"], case["size"][1] * case["scale"])
        report[name] = {"input": list(case["size"]), "scale": case["scale"], "rate": case["rate"],
                        "reference": {"with_encode": reference(store, case, clip, work / "ref.mp4", device, True),
                                      "without_encode": reference(store, case, clip, work / "ref.mp4", device, False)},
                        "encoder_alone": encoder_alone(out_size, min(60, case["rate"] * case["seconds"]),
                                                       work / "enc.mp4")}
        torch.cuda.empty_cache() if cuda else None
        save()
    data = work / "jobs"
    broker = LocalBroker(data / "broker")
    try:
        config, _ = jobs.jobs_config(folder, cache, broker.start(), data, tile=tile, batch=batch,
                                     compile_mode=compile_mode, replicas=1, jobs_each=1)
        args = config["applications"][0]["args"]
        args["upscalers"] = sorted({*args["upscalers"], *(case["model"] for case in cases(cuda))})
        args["jobs"].update(video_segment_s=SEGMENT_S)
        served.deploy(config, folder)
        still = served.path_request("upscale", 256 if cuda else 64)
        unloaded: list[float] = []
        for _ in range(10 if cuda else 2):
            asyncio.run(_one_still(still, unloaded))
        for case in cases(cuda):
            name, clip = case["model"], clips[case["model"]]
            params = {"model": name, "scale": case["scale"], "crf": OUTPUT.crf, "preset": OUTPUT.preset}
            frames_without_encode(clip, {"model": name, "scale": case["scale"]}, 16)  # warm-up: batches, kernels
            with _GpuBusy() as busy:
                job, during = asyncio.run(_job_with_stills(clip, params, still))
            ours = {"frames": job["output"]["frames"], "segments": job["output"]["segments"],
                    "fps": job["output"]["frames"] / job["metrics"]["run_s"], "run_s": job["metrics"]["run_s"],
                    "gpu_busy_share": busy.share}
            without = frames_without_encode(clip, {"model": name, "scale": case["scale"]}, 16)
            entry = report[name]
            entry["ours"] = {"with_encode": ours, "without_encode": without}
            entry["ratio"] = {"with_encode": ours["fps"] / entry["reference"]["with_encode"]["fps"],
                              "without_encode": without["fps"] / entry["reference"]["without_encode"]["fps"]}
            entry["still_during_job"] = {"requests": len(during), **percentiles(during),
                                         "unloaded_p50_ms": percentiles(unloaded)["p50_ms"]}
            save()
        serve.delete("restore")
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    return report


async def _one_still(still: tuple[bytes, dict], latencies: list) -> None:
    async with served._client() as http:
        await served._post(http, *still, latencies)


def rows(video: dict) -> list[str]:
    """The video rows of the benchmark's table."""
    out = []
    for name, case in video.items():
        if not isinstance(case, dict) or "ours" not in case:
            continue
        label = f"{name}, {case['input'][1]}p at x{case['scale']}, frames/s"
        out.append(f"| {label} (vs the official video loop) | {case['ours']['with_encode']['fps']:.1f} "
                   f"| {case['reference']['with_encode']['fps']:.1f} | {case['ratio']['with_encode']:.2f}x |")
        out.append(f"| {label}, without the H.264 encode | {case['ours']['without_encode']['fps']:.1f} "
                   f"| {case['reference']['without_encode']['fps']:.1f} | {case['ratio']['without_encode']:.2f}x |")
    return out
