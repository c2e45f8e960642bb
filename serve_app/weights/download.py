"""Fetch one file over HTTP(S): streamed, SHA-256 checked, renamed into place only when whole.

The official scripts download with no checksum and straight to the final name, so a cut
connection leaves a truncated ``.pth`` that later fails to load (or loads garbage). Here the
bytes go to a hidden temporary file beside the target; only a complete file with the right
digest is renamed (atomically, same folder) to its real name, and anything else is deleted.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tqdm import tqdm

from serve_app.errors import WeightsCorrupt, WeightsUnavailable

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


def download(url: str, dest: Path, sha256: str, *, timeout: float, what: str, setting_hint: str) -> Path:
    """Download ``url`` to ``dest`` if its SHA-256 is ``sha256``; raise a typed error otherwise.

    ``what`` names the model and file for messages; ``setting_hint`` says how to point the
    service at a local copy instead, for the offline case.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.part"
    log.info("downloading %s", what, extra={"url": url, "dest": str(dest)})
    try:
        received, digest, expected_size = _stream_to(url, tmp, timeout, what)
        if expected_size is not None and received != expected_size:
            raise WeightsCorrupt(
                f"download of {what} from {url} stopped after {received} of {expected_size} bytes; "
                "nothing was kept, try again"
            )
        if digest != sha256:
            raise WeightsCorrupt(
                f"download of {what} from {url} has SHA-256 {digest}, expected {sha256}; "
                "the file was discarded"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise WeightsUnavailable(
            f"could not download {what} from {url} ({exc}). Offline? Put the file on disk and set "
            f"{setting_hint}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("downloaded %s (%d bytes, SHA-256 verified)", what, received, extra={"dest": str(dest)})
    return dest


def _stream_to(url: str, tmp: Path, timeout: float, what: str) -> tuple[int, str, int | None]:
    hasher = hashlib.sha256()
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": "restore-serve"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        with tqdm(total=expected, unit="B", unit_scale=True, desc=what, leave=False) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    return received, hasher.hexdigest(), expected


def sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
