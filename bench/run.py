"""The benchmark, in one command, on any CUDA machine (or a small smoke run on the CPU):

    python -m bench.run [--out bench/results/NAME.json] [--seconds 8] [--open-seconds 60] [--sections served jobs video replicas]
    python -m bench.run --merge A.json B.json --out NAME.json   # sections run one after the other

In one run, on one device: the reference paths (RealESRGANer, GFPGANer) one image at a time;
our engines' device stage at a fixed tile shape (eager and compiled, TFLOP/s against a matmul
peak measured here, PSNR against fp32 eager); how the calling style of a Serve replica changes
the same forward's GPU time; the whole served graph over HTTP; jobs through the same graph
against it (``bench.jobs``); videos as jobs against the official video script's loop
(``bench.video``); two GPU replicas of each model on one GPU against one (``bench.replicas``).
Prints the JSON report (also written to --out) and, on stderr, the table the README shows.

Weights are real wherever the store has them (the cache, or ncnn conversions), random elsewhere;
the report says which. Speed does not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

import serve_app
from bench import call_styles, engines, jobs, replicas, served, video
from bench.common import weights_in_use
from serve_app.config import WeightsConfig
from serve_app.weights import WeightsStore

UPSCALER, FACE_MODEL = "RealESRGAN_x4plus", "GFPGANv1.4"
SECTIONS = ("engines", "call_styles", "served", "jobs", "video", "replicas")


def settings(cuda: bool, seconds: float | None, open_seconds: float | None = None) -> dict:
    """The run's shapes and lengths. The open loop runs longest: its p99 is set by its slowest
    1% of requests, about 40 of them in 60 s at 70 requests/s (11 in the 16 s used before)."""
    if cuda:
        return {"tile": 256, "batch": 8, "repeats": 10, "levels": [1, 4, 8, 16, 32, 64],
                "sizes": {"upscale": 256, "largest": 2048}, "seconds": seconds or 8.0,
                "open_seconds": open_seconds or 60.0, "compile": "on", "jobs": 1500, "light_rate": 5.0}
    return {"tile": 96, "batch": 2, "repeats": 2, "levels": [1, 2], "sizes": {"upscale": 96, "largest": 128},
            "seconds": seconds or 3.0, "open_seconds": open_seconds or 6.0, "compile": "off", "jobs": 8,
            "light_rate": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write the JSON report too")
    parser.add_argument("--seconds", type=float, help="seconds per load level (default 8 on CUDA)")
    parser.add_argument("--open-seconds", type=float, help="seconds of open loop per path (default 60 on CUDA)")
    parser.add_argument("--levels", type=int, nargs="+", help="concurrency levels (default 1 4 8 16 32 64 on CUDA)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="which parts to run (default: all); 'served' alone takes about half the time")
    parser.add_argument("--cache-dir", type=Path, default=WeightsConfig().resolved_cache_dir(),
                        help="weights and compiled kernels (default: the service's cache)")
    parser.add_argument("--merge", type=Path, nargs="+", help="instead of measuring: join the reports of "
                        "sections run one after the other on one machine, and print their table")
    args = parser.parse_args()
    if args.merge:
        report = merge([json.loads(path.read_text()) for path in args.merge])
        _save(report, args.out)
        print(table(report), file=sys.stderr)
        return
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    s = settings(cuda, args.seconds, args.open_seconds)
    s["levels"] = args.levels or s["levels"]
    folder = Path(tempfile.mkdtemp())
    used = weights_in_use(folder, args.cache_dir, [UPSCALER, FACE_MODEL, "retinaface_resnet50", "parsenet",
                                                   "realesr-animevideov3"])
    store = WeightsStore(WeightsConfig(folder=folder, cache_dir=args.cache_dir, download=False))
    started = time.perf_counter()
    report = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "cpus": os.cpu_count(),
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "serve_app": serve_app.__version__,
                     "python": platform.python_version()},
        "settings": {**s, "weights": used, "sections": args.sections},
    }
    if "engines" in args.sections:
        report["engines"] = engines.run(store, upscaler=UPSCALER, face_model=FACE_MODEL, device=device,
                                        tile=s["tile"], batch=s["batch"], repeats=s["repeats"],
                                        compile_too=s["compile"] == "on")
        _save(report, args.out)  # each section as it ends: a run cut short keeps what it measured
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if {"call_styles", "served", "jobs", "video", "replicas"} & set(args.sections):
        served.start_ray()
        if "call_styles" in args.sections:
            report["call_styles"] = call_styles.run(s["tile"], 4 if cuda else 1, s["repeats"])
            _save(report, args.out)
        if "served" in args.sections:
            served.run(report.setdefault("served", {}), folder, args.cache_dir, tile=s["tile"], batch=s["batch"],
                       sizes=s["sizes"], levels=s["levels"], seconds=s["seconds"],
                       open_seconds=s["open_seconds"], compile_mode=s["compile"], save=lambda: _save(report, args.out))
        if "jobs" in args.sections:
            jobs.run(report.setdefault("jobs", {}), folder, args.cache_dir, tile=s["tile"], batch=s["batch"],
                     upscale_size=s["sizes"]["upscale"], compile_mode=s["compile"], count=s["jobs"],
                     seconds=s["seconds"], rate=s["light_rate"], open_seconds=s["open_seconds"] / 3,
                     save=lambda: _save(report, args.out))
        if "video" in args.sections:
            video.run(report.setdefault("video", {}), store, folder, args.cache_dir, tile=s["tile"],
                      batch=s["batch"], compile_mode=s["compile"], save=lambda: _save(report, args.out))
        if "replicas" in args.sections:
            replicas.run(report.setdefault("replicas", {}), folder, args.cache_dir, tile=s["tile"], batch=s["batch"],
                         compile_mode=s["compile"], upscale_size=s["sizes"]["upscale"],
                         levels=args.levels or ([8, 32] if cuda else [2]), seconds=s["seconds"],
                         save=lambda: _save(report, args.out))
        ray.shutdown()
    report["wall_s"] = time.perf_counter() - started
    _save(report, args.out)
    print(json.dumps(report, indent=2))
    print(table(report), file=sys.stderr)


def merge(reports: list[dict]) -> dict:
    """One report from runs of different sections on the same device and versions (a machine
    whose commands are cut at ten minutes cannot run them all at once); their walls add up."""
    first = reports[0]
    for other in reports[1:]:
        for key in ("device", "cpus", "versions"):
            if other[key] != first[key]:
                raise ValueError(f"the reports differ in {key}: {first[key]} against {other[key]}")
    merged = {key: first[key] for key in ("device", "cpus", "versions")}
    merged["settings"] = {**first["settings"], "sections": [s for r in reports for s in r["settings"]["sections"]],
                          "merged_runs": len(reports)}
    for report in reports:
        merged.update({s: report[s] for s in SECTIONS if s in report})
    merged["wall_s"] = sum(r.get("wall_s", 0.0) for r in reports)
    return merged


def _save(report: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


def table(report: dict) -> str:
    """The short summary the README shows (the rows of the sections that ran)."""
    eng, srv, styles = report.get("engines"), report.get("served"), report.get("call_styles")
    peak = f"; matmul peak {eng['matmul_peak_tflops']['value']:.3g} TFLOP/s ({eng['matmul_peak_tflops']['dtype']})" \
        if eng else ""
    rows = [f"{report['device']}, {report['cpus']} CPUs; torch {report['versions']['torch']}, "
            f"Ray {report['versions']['ray']}{peak}", "",
            "| measure | restore-serve | reference | ratio |", "| --- | --- | --- | --- |"]
    if eng and srv:
        rows += _against_reference_rows(eng, srv)
    if eng:
        rows += _stage_rows(eng, report["settings"])
    if srv:
        rows += _served_rows(srv)
    if report.get("jobs"):
        rows += jobs.rows(report["jobs"])
    if report.get("video"):
        rows += video.rows(report["video"])
    if report.get("replicas"):
        rows += replicas.rows(report["replicas"])
    if styles:
        rows.append(f"| same forward, Serve sync vs async method (GPU ms) | {styles['serve_sync_ms']:.1f} | "
                    f"{styles['serve_async_ms']:.1f} | {styles['sync_over_async']:.2f}x |")
    return "\n".join(rows)


def _against_reference_rows(eng: dict, srv: dict) -> list[str]:
    ref_up, ref_face = eng["reference"]["RealESRGANer"], eng["reference"]["GFPGANer"]
    up, faces = srv["upscale"]["best_images_per_s"], srv["faces"]["best_images_per_s"]
    return [f"| {ref_up['input'][0]}x{ref_up['input'][1]} x4, PNG out, images/s (served over HTTP vs "
            f"RealESRGANer) | {up:.1f} | {ref_up['images_per_s']:.1f} | {up / ref_up['images_per_s']:.2f}x |",
            f"| one-face 512x512 photo, x2, PNG out, images/s (served vs GFPGANer) | {faces:.1f} "
            f"| {ref_face['images_per_s']:.1f} | {faces / ref_face['images_per_s']:.2f}x |"]


def _stage_rows(eng: dict, settings: dict) -> list[str]:
    stage, rows = eng["upscaler"][UPSCALER], []
    shape = f"{settings['tile']}px tiles, batch {settings['batch']}"
    for key, r in stage.items():
        if isinstance(r, dict) and "tiles_per_s" in r:
            rows.append(f"| GPU stage {key}, {shape}: network (CUDA events) | {r['bare_tiles_per_s']:.1f} tiles/s, "
                        f"{r['bare_tflops']:.3g} TFLOP/s, {r['bare_percent_of_matmul_peak']:.1f}% of peak | | |")
            rows.append(f"| GPU stage {key}, {shape}: with 8-bit copies both ways | {r['tiles_per_s']:.1f} tiles/s, "
                        f"{r['tflops']:.3g} TFLOP/s, {r['percent_of_matmul_peak']:.1f}% of peak | | |")
    rows += [f"| {key} vs fp32 eager, PSNR | {db:.1f} dB | | |" for key, db in stage["psnr_vs_fp32_eager_db"].items()]
    faces = eng["faces"][FACE_MODEL]
    for key, r in faces.items():
        if isinstance(r, dict) and "face_ms" in r:
            rows.append(f"| face stage {key}: restore one face; a face in a batch of {settings['batch']}; "
                        f"parse one and make its paste mask | {r['one_face_ms']:.1f} ms; {r['face_ms']:.1f} ms; "
                        f"{r['paste_mask_one_face_ms']:.1f} ms | | |")
            if "detect_one_photo_ms" in r:  # reports before the detector was timed lack it
                graph = r.get("detector_graph_max_abs_diff")
                rows.append(f"| face stage {key}: detect faces in one 512x512 photo; a photo in a batch of "
                            f"{settings['batch']} | {r['detect_one_photo_ms']:.1f} ms; "
                            f"{r['detect_photo_in_batch_ms']:.1f} ms | | "
                            f"{'' if graph is None else f'graph vs plain: max diff {graph:.1g}'} |")
    rows += [f"| faces {key} vs fp32 eager, PSNR | {db:.1f} dB | | |" for key, db in faces["psnr_vs_fp32_eager_db"].items()]
    return rows


def _served_rows(srv: dict) -> list[str]:
    rows, paths = [], (("upscale", srv["upscale"]), ("faces", srv["faces"]))
    for name, path in paths:
        loaded, unloaded = path["open_loop_at_70_percent"], path["closed_loop"][0]
        rows.append(f"| {name}: p99 at 70% of peak ({loaded['offered_per_s']:.1f}/s) vs unloaded p50 "
                    f"| {loaded['p99_ms']:.0f} ms | {unloaded['p50_ms']:.0f} ms | {loaded['p99_over_unloaded_p50']:.2f}x |")
    for name, path in paths:  # the same rate evenly spaced: the tail that is the service's own
        even, unloaded = path.get("open_loop_at_70_percent_even"), path["closed_loop"][0]
        if even:  # reports before 2026-11-29 run o lack it
            rows.append(f"| {name}: p99 at 70% of peak, evenly spaced arrivals, vs unloaded p50 "
                        f"| {even['p99_ms']:.0f} ms | {unloaded['p50_ms']:.0f} ms | {even['p99_over_unloaded_p50']:.2f}x |")
    for name, path in paths:  # what one GPU serves when the bound must hold with random arrivals
        bounded = path.get("latency_bounded")
        if bounded:  # reports before 2026-11-29 run ab lack it
            rate = "not even 10% of peak" if bounded["load"] is None else \
                f"{bounded['images_per_s']:.1f}/s ({bounded['load']:.0%} of peak)"
            rows.append(f"| {name}: highest Poisson rate with p99 within {bounded['bound']:g}x the unloaded p50 "
                        f"| {rate} | | |")
    for name, path in paths:  # the tail a request has alone, and what the load adds to it
        loaded, unloaded = path["open_loop_at_70_percent"], path["closed_loop"][0]
        rows.append(f"| {name}: p99 at 70% of peak vs unloaded p99 | {loaded['p99_ms']:.0f} ms "
                    f"| {unloaded['p99_ms']:.0f} ms | {loaded['p99_ms'] / unloaded['p99_ms']:.2f}x |")
    for name, path in paths:  # the GPU replica's part of it
        key = "upscaler_replica" if name == "upscale" else "face_replica"
        loaded, unloaded = (path["open_loop_at_70_percent"].get(key, {}).get("times", {}),
                            path["closed_loop"][0].get(key, {}).get("times", {}))
        if loaded.get("requests") and unloaded.get("requests"):
            rows.append(f"| {name}: time inside its GPU replica, p99 at 70% of peak vs unloaded p50 "
                        f"| {loaded['inside_ms_p99']:.0f} ms | {unloaded['inside_ms_p50']:.0f} ms "
                        f"| {loaded['inside_ms_p99'] / unloaded['inside_ms_p50']:.2f}x |")
    for name, path in paths:
        steps = ", ".join(f"{k} {v:.0f}" for k, v in path["closed_loop"][0]["steps_ms_p50"].items()
                          if k in served.CPU_STEPS)
        rows.append(f"| {name}: CPU ms per request ({steps}); busy cores at the best rate "
                    f"| {path['cpu_ms_per_request']:.0f} ms | {path['cpu_cores_at_best_rate']:.1f} cores | |")
    for name, path in paths:  # what the node gives the service: proxy, ingress, GPU replicas and Ray too
        if "node_cores_at_best_rate" in path:
            best = max(path["closed_loop"], key=lambda level: level["images_per_s"])
            host = best["host_cpu"]
            rows.append(f"| {name}: the node's busy cores at the best rate, all processes but the load generator "
                        f"(busiest 0.5 s) | {path['node_cores_at_best_rate']:.1f} cores "
                        f"({host['busiest_0.5s_busy_cores']:.1f}) | {host['host_cores']} cores | |")
    for level in srv["upscale"]["closed_loop"]:
        times = level["upscaler_replica"]["times"]
        if times.get("requests"):
            rows.append(f"| upscaler replica: a request's batch time vs bare forward (concurrency "
                        f"{level['concurrency']}) | {times['served_ms_p50']:.1f} ms | {times['bare_ms_p50']:.1f} ms | "
                        f"{times['served_over_bare']:.2f}x |")
    for loop, label in (("open_loop_at_70_percent", "Poisson"), ("open_loop_at_70_percent_even", "evenly spaced")):
        times = srv["upscale"].get(loop, {}).get("upscaler_replica", {}).get("times", {})
        if "copies_ms_p50" in times:  # reports before 2026-11-29 run t lack the split
            rows.append(f"| upscaler replica: a request's batch time vs bare forward (70% of peak, {label}; "
                        f"p50 copies {times['copies_ms_p50']:.1f} ms, hand-offs {times['hops_ms_p50']:.1f} ms) "
                        f"| {times['served_ms_p50']:.1f} ms | {times['bare_ms_p50']:.1f} ms | "
                        f"{times['served_over_bare']:.2f}x |")
    for name, r in srv["gpu_replicas"].items():
        if r["gpu_memory"]:
            m = r["gpu_memory"]
            rows.append(f"| {name} peak GPU memory (cap) | {m['peak_reserved_gib']:.1f} GiB reserved "
                        f"| {m['cap_gib']:.1f} GiB cap | |")
    big = srv["largest"]
    rows.append(f"| largest default input {big['input'][0]}x{big['input'][1]} x4, one request | {big['ms']:.0f} ms | | |")
    return rows


if __name__ == "__main__":
    main()
