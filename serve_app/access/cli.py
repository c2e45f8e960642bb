"""``restore-serve-keys``: make an API key, hash one, or fetch the key list from AWS.

    restore-serve-keys create alice --scopes restore,jobs
    restore-serve-keys hash < key.txt
    restore-serve-keys fetch restore-serve/api-keys [--file ~/.config/restore-serve/api-keys.yaml]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import get_args

import yaml

from serve_app.access.keys import key_hash, new_key, parse_keys
from serve_app.config import ApiKeyConfig, AuthConfig, Scope


def fetch_keys(secret_id: str, path: Path, region: str | None = None) -> int:
    """Write the YAML key list held in a Secrets Manager secret to ``path``, owner-only; checked
    first, and replaced in one rename, so an ingress replica never reads half a file."""
    import boto3

    text = boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=secret_id)["SecretString"]
    count = len(parse_keys(text, f"secret {secret_id}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.touch(mode=0o600)
    partial.write_text(text)
    os.replace(partial, path)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restore-serve-keys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="a new key, printed once, and its entry for auth.keys")
    create.add_argument("name", help="who holds the key (letters, digits, _ . @ -)")
    create.add_argument("--scopes", default="restore,jobs", help=f"comma-separated, of {', '.join(get_args(Scope))}")
    sub.add_parser("hash", help="the hash of a key read from standard input")
    fetch = sub.add_parser("fetch", help="write the key list held in an AWS Secrets Manager secret to the keys file")
    fetch.add_argument("secret_id")
    fetch.add_argument("--file", type=Path, default=AuthConfig().keys_file)
    fetch.add_argument("--region", default=None)
    args = parser.parse_args(argv)
    if args.command == "hash":
        print(key_hash(sys.stdin.read().strip()))
        return 0
    if args.command == "fetch":
        count = fetch_keys(args.secret_id, args.file.expanduser(), args.region)
        print(f"{count} keys written to {args.file}")
        return 0
    key = new_key()
    try:  # the same model the service reads the entry with
        entry = ApiKeyConfig(name=args.name, hash=key_hash(key), scopes=[s.strip() for s in args.scopes.split(",")])
    except ValueError as exc:
        parser.error(str(exc))
    print(f"# The key for {entry.name}, shown this once (the service keeps only its hash):")
    print(key)
    print("# Its entry for auth.keys, the auth.keys_file or $RESTORE_SERVE_API_KEYS (a YAML list):")
    print(yaml.safe_dump([entry.model_dump(exclude_none=True)], default_flow_style=None, sort_keys=False).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
