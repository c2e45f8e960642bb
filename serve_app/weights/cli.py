"""``restore-serve-weights``: list the registry, or fetch weights ahead of serving.

    restore-serve-weights list
    restore-serve-weights download RealESRGAN_x4plus GFPGANv1.4 [--cache-dir DIR]
    restore-serve-weights download --all
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from serve_app.config import WeightsConfig
from serve_app.errors import RestoreError
from serve_app.weights.registry import MODELS
from serve_app.weights.store import WeightsStore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restore-serve-weights", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=WeightsConfig().cache_dir)
    parser.add_argument("--folder", type=Path, default=None, help="a folder of already downloaded weights")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every model, and whether its weights are on disk")
    get = sub.add_parser("download", help="download and verify weights into the cache")
    get.add_argument("models", nargs="*", metavar="MODEL", help=", ".join(MODELS))
    get.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    store = WeightsStore(WeightsConfig(cache_dir=args.cache_dir, folder=args.folder))
    if args.command == "list":
        for spec in MODELS.values():
            state = "present" if store.status(spec)["present"] else "missing"
            print(f"{spec.name:28} {spec.kind:9} x{spec.scale}  {state:8} {spec.description}")
        return 0
    names = list(MODELS) if args.all else args.models
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        parser.error(f"name models to download (known: {', '.join(MODELS)}) or pass --all")
    failed = 0
    for name in names:
        spec = MODELS[name]
        for file in spec.files:
            try:
                print(f"{name}: {store.fetch(spec, file)}")
            except RestoreError as exc:
                failed += 1
                print(f"{name}: {exc.detail}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
