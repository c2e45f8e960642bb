"""``restore-serve-batch IN OUT``: a folder (or one file) restored through a running service.

The options are the official scripts' (``inference_realesrgan.py``, ``inference_gfpgan.py``)
where they mean the same here; tile size and precision are the service's own settings. Outputs
are written whole (a temporary file, then a rename), so a run that is stopped and started again
skips exactly the pictures already done. Exit status: 0 when every picture is restored, 1 when
any failed (they are listed at the end), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from serve_app.client import DEFAULT_URL, AsyncClient
from serve_app.errors import RestoreError

INPUT_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
_EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
_FORMATS = {".png": "png", ".jpg": "jpeg", ".webp": "webp"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="restore-serve-batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="a picture, or a folder of them")
    parser.add_argument("output", type=Path, help="the folder the results go to (made if missing)")
    parser.add_argument("--url", default=os.environ.get("RESTORE_SERVE_URL", DEFAULT_URL),
                        help="the service (default $RESTORE_SERVE_URL or %(default)s)")
    parser.add_argument("--api-key", help="default $RESTORE_SERVE_API_KEY")
    parser.add_argument("-n", "--model_name", default=None, help="a Real-ESRGAN model, or none (faces only)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("-s", "--outscale", type=float, help="the output scale (default the model's)")
    size.add_argument("--width", type=int, help="fit the output inside this width (aspect kept)")
    parser.add_argument("--height", type=int, help="fit the output inside this height (aspect kept)")
    parser.add_argument("-dn", "--denoise_strength", type=float, help="realesr-general-x4v3 only, 0 to 1")
    parser.add_argument("--face_enhance", action="store_true", help="restore faces with GFPGAN")
    parser.add_argument("-v", "--face_model", help="GFPGANv1.3, GFPGANv1.4 or RestoreFormer")
    parser.add_argument("-w", "--weight", type=float, help="the restored face's weight, 0 to 1")
    parser.add_argument("--only_center_face", action="store_true")
    parser.add_argument("--aligned", action="store_true", help="inputs are aligned 512x512 faces")
    parser.add_argument("--alpha_upsampler", choices=["realesrgan", "bicubic"])
    parser.add_argument("--suffix", default="out", help="added to each output's name; '' for none")
    parser.add_argument("--ext", default="auto", choices=["auto", "png", "jpg", "webp"],
                        help="auto: JPEG stays JPEG, everything else becomes PNG")
    parser.add_argument("--quality", type=int, help="JPEG and WebP quality, 1-100 (101: lossless WebP)")
    parser.add_argument("--no-metadata", action="store_true", help="drop the inputs' ICC profiles and EXIF")
    parser.add_argument("-r", "--recursive", action="store_true", help="also the folders inside IN")
    parser.add_argument("-j", "--concurrency", type=int, default=4, help="pictures in flight (default 4)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one picture may take")
    args = parser.parse_args(argv)
    if args.height is not None and args.outscale is not None:
        parser.error("give --outscale, or --width and/or --height, not both")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if not args.input.exists():
        parser.error(f"{args.input} does not exist")
    return args


@dataclass(frozen=True)
class Task:
    source: Path
    target: Path
    format: str


def plan(args: argparse.Namespace) -> list[Task]:
    """Each input and where its result goes, as the official scripts name it."""
    if args.input.is_file():
        sources, root = [args.input], args.input.parent
    else:
        found = args.input.rglob("*") if args.recursive else args.input.iterdir()
        sources, root = sorted(p for p in found if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES), args.input
    tasks = []
    for source in sources:
        extension = _EXTENSIONS.get(args.ext) or (".jpg" if source.suffix.lower() in (".jpg", ".jpeg") else ".png")
        name = f"{source.stem}_{args.suffix}" if args.suffix else source.stem
        tasks.append(Task(source, args.output / source.relative_to(root).parent / (name + extension),
                          _FORMATS[extension]))
    return tasks


def options(args: argparse.Namespace) -> dict:
    """The command's options under the API's names."""
    return {"model": args.model_name, "scale": args.outscale, "width": args.width, "height": args.height,
            "denoise": args.denoise_strength, "face_enhance": args.face_enhance or None,
            "face_model": args.face_model, "face_strength": args.weight,
            "only_center_face": args.only_center_face or None, "aligned": args.aligned or None,
            "alpha_upsampler": args.alpha_upsampler, "quality": args.quality,
            "keep_metadata": False if args.no_metadata else None}


async def run(args: argparse.Namespace) -> int:
    tasks = plan(args)
    todo = [task for task in tasks if not task.target.exists()]
    failures: list[tuple[Path, str]] = []
    bar = tqdm(total=len(todo), unit="img", dynamic_ncols=True, file=sys.stderr,
               desc=f"{len(tasks) - len(todo)} already done" if len(todo) < len(tasks) else "restoring")
    room = asyncio.Semaphore(args.concurrency)
    common = options(args)

    async def one(task: Task) -> None:
        async with room:
            try:
                result = await client.restore(task.source, format=task.format, **common)
                await asyncio.to_thread(_write_whole, task.target, result.data)
            except (RestoreError, OSError, TimeoutError) as exc:
                failures.append((task.source, f"{getattr(exc, 'code', type(exc).__name__)}: {exc}"))
            except Exception as exc:  # noqa: BLE001  a connection lost mid-run: one picture's failure
                failures.append((task.source, f"{type(exc).__name__}: {exc}"))
            bar.update()
            bar.set_postfix(failed=len(failures), refresh=False)

    async with AsyncClient(args.url, api_key=args.api_key, timeout=args.timeout) as client:
        await asyncio.gather(*(one(task) for task in todo))
    bar.close()
    done = len(todo) - len(failures)
    print(f"{done} restored, {len(tasks) - len(todo)} already there, {len(failures)} failed", file=sys.stderr)
    for source, why in sorted(failures):
        print(f"  {source}: {why}", file=sys.stderr)
    return 1 if failures else 0


def _write_whole(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(data)
    partial.replace(target)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
