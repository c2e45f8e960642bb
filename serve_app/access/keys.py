"""API keys: who may call the HTTP API, and for what.

A key is a random secret given to one client; the service keeps only its SHA-256. Keys are 256
random bits, not passwords a person chose, so one fast hash cannot be reversed by guessing and a
slow one (bcrypt, argon2) would only cost every request time. A presented key is hashed and
compared with every configured hash in constant time, with no early exit, so neither the
comparison nor the number of keys tried tells an attacker how close a guess came.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import time

import yaml
from pydantic import TypeAdapter, ValidationError

from serve_app.config import ApiKeyConfig, AuthConfig
from serve_app.errors import Forbidden, Unauthorized

log = logging.getLogger("ray.serve")
PREFIX = "rsk_"  # lets secret scanners and people recognise a leaked key
_KEY_LIST = TypeAdapter(list[ApiKeyConfig])
_RECHECK_S = 5.0  # how often the file and the variable are looked at again


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class KeyRing:
    """The keys of an ``AuthConfig``: its own list, its file and its environment variable. A file
    or variable that changes is read again within a few seconds; one that no longer parses keeps
    the keys read before (and says so in the log), except at start, where it is an error. A file
    that does not exist gives no keys until it appears."""

    def __init__(self, config: AuthConfig, host: str = "127.0.0.1"):
        """``host``: where the service listens. Beyond localhost, with ``auth.required``, there
        must be keys at start, and a key list emptied later refuses everyone rather than opening
        the service."""
        self.config = config
        self._seen: tuple | None = None
        self._hashes: list[tuple[bytes, ApiKeyConfig]] = []
        self._checked = 0.0
        self._reload(first=True)
        self.keyless = not config.required or is_loopback(host)  # callers may come without a key
        if not self._hashes and not self.keyless:
            raise ValueError(f"the service listens on {host} with no API keys: configure auth.keys "
                             "(restore-serve-keys create), or set auth.required: false behind a proxy that "
                             "authenticates")

    def __len__(self) -> int:
        self._refresh()
        return len(self._hashes)

    def caller(self, authorization: str | None, scope: str | None) -> ApiKeyConfig | None:
        """``identify``'s key, or None for a caller without one: allowed while no key is
        configured, where ``keyless``."""
        if self.keyless and not len(self):
            return None
        return self.identify(authorization, scope)

    def identify(self, authorization: str | None, scope: str | None) -> ApiKeyConfig:
        """The key an ``Authorization`` header carries, once it is known and holds ``scope``
        (None: any known key); Unauthorized or Forbidden otherwise."""
        self._refresh()
        if not authorization:
            raise Unauthorized("this service needs an API key: send 'Authorization: Bearer <key>'")
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("the Authorization header must read 'Bearer <key>'")
        digest = hashlib.sha256(presented.strip().encode()).digest()
        found = None
        for known, key in self._hashes:
            if hmac.compare_digest(known, digest):
                found = key
        if found is None:
            raise Unauthorized("this API key is not known here (revoked, or mistyped)")
        if scope is not None and scope not in found.scopes:
            raise Forbidden(f"API key {found.name!r} lacks the scope {scope!r} this route needs "
                            f"(it has {', '.join(found.scopes)})")
        return found

    # ------------------------------------------------------------------ sources
    def _fingerprint(self) -> tuple:
        path = self.config.keys_file
        try:
            stat = path.expanduser().stat() if path else None
            file_state = (stat.st_mtime_ns, stat.st_size) if stat else None
        except OSError:
            file_state = "missing"
        env = os.environ.get(self.config.keys_env) if self.config.keys_env else None
        return file_state, env

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked >= _RECHECK_S:
            self._checked = now
            if self._fingerprint() != self._seen:
                self._reload(first=False)

    def _reload(self, first: bool) -> None:
        fingerprint = self._fingerprint()
        try:
            keys = list(self.config.keys)
            path = self.config.keys_file
            if path is not None and fingerprint[0] == "missing":
                # No keys from it, which is safe: without keys, nothing listens beyond localhost.
                log.warning("auth: keys_file %s does not exist (yet): no keys from it", path)
            elif path is not None:
                keys += parse_keys(path.expanduser().read_text(), f"keys_file {path}")
            if fingerprint[1]:
                keys += parse_keys(fingerprint[1], f"environment variable {self.config.keys_env}")
            names = [key.name for key in keys]
            if len(names) != len(set(names)):
                raise ValueError(f"two keys share a name among {sorted(names)}")
        except (OSError, ValueError) as exc:
            if first:
                raise ValueError(f"auth: {exc}") from None
            log.error("auth: keeping the %d keys read before: %s", len(self._hashes), exc)
            self._seen = fingerprint
            return
        self._hashes = [(bytes.fromhex(key.hash.split(":", 1)[1]), key) for key in keys]
        if self._seen is not None:
            log.info("auth: %d API keys now (%s)", len(keys), ", ".join(names) or "none")
        self._seen = fingerprint


def parse_keys(text: str, where: str) -> list[ApiKeyConfig]:
    try:
        document = yaml.safe_load(text) or []
        return _KEY_LIST.validate_python(document.get("keys", []) if isinstance(document, dict) else document)
    except (yaml.YAMLError, ValidationError, AttributeError) as exc:
        raise ValueError(f"{where} is not a YAML list of keys: {exc}") from None

