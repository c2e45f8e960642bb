"""URL fetching against a real local HTTP server: what is refused, what is pinned, what is bounded."""
from __future__ import annotations

import ipaddress
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pydantic
import pytest

from serve_app.config import UrlConfig
from serve_app.errors import TooManyPixels, UrlRefused, UrlTooLarge, UrlUnreachable
from serve_app.imageio.probe import probe
from serve_app.jobs.urls import UrlPolicy, is_public

PNG = cv2.imencode(".png", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()


def _png_bomb() -> bytes:
    """A PNG header claiming 30000x30000 pixels, then 2 MB of image data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\0" * 2_000_000)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("host")))
        routes = {
            "/image.png": lambda: self._send(200, PNG),
            "/redirect": lambda: self._redirect("/image.png"),
            "/to-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data/"),
            "/loop": lambda: self._redirect("/loop"),
            "/declared-big": lambda: self._send(200, b"x" * 5000),
            "/bomb.png": lambda: self._send(200, _png_bomb()),
            "/missing": lambda: self._send(404, b"no"),
        }
        if self.path == "/endless":
            self.send_response(200)
            self.end_headers()
            for _ in range(10_000):  # no Content-Length: only the byte count stops it
                self.wfile.write(b"y" * 1024)
            return
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("content-length", "10")
            self.end_headers()
            time.sleep(3)
            return
        routes.get(self.path, lambda: self._send(404, b""))()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.seen.append((self.path, body))
        self._send(204, b"")

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("location", location)
        self.send_header("content-length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def _base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


LOCAL = UrlConfig(allow=["127.0.0.0/8"], read_timeout_s=1.0)


def test_public_addresses_and_the_rest():
    for address in ("8.8.8.8", "2606:4700::1111", "1.1.1.1"):
        assert is_public(ipaddress.ip_address(address)), address
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                    "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1", "::1", "::",
                    "fe80::1", "fc00::1", "ff02::1", "2001:db8::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
                    "64:ff9b::a9fe:a9fe", "2002:7f00:1::1"):
        assert not is_public(ipaddress.ip_address(address)), address


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://example.com/a.png", "gopher://example.com/", "/relative/a.png", "http:///nohost",
    "http://169.254.169.254/latest/meta-data/", "http://127.0.0.1/a.png", "http://[::1]/a.png",
    "http://[::ffff:127.0.0.1]/a.png", "http://10.0.0.1/a.png", "http://100.64.0.1/a.png",
    "http://user:secret@8.8.8.8/a.png", "http://0x7f000001/a.png",
])
def test_refused_before_any_connection(url):
    with pytest.raises(UrlRefused):
        UrlPolicy(UrlConfig(), resolver=lambda host, port: ["127.0.0.1"]).check(url)


def test_a_name_is_resolved_once_and_the_connection_goes_to_the_checked_address(server):
    answers = [["127.0.0.1"], ["10.9.9.9"]]  # a rebinding name: internal on the second lookup
    calls = []

    def resolver(host, port):
        calls.append(host)
        return answers[min(len(calls), 2) - 1]

    port = server.server_address[1]
    body = UrlPolicy(LOCAL, resolver=resolver).fetch(f"http://images.test:{port}/image.png", max_bytes=10_000)
    assert body == PNG and calls == ["images.test"]
    assert server.seen[-1] == ("/image.png", f"images.test:{port}")  # the name travels in Host


def test_a_name_with_any_internal_address_is_refused():
    policy = UrlPolicy(UrlConfig(), resolver=lambda host, port: ["8.8.8.8", "10.0.0.7"])
    with pytest.raises(UrlRefused, match="10.0.0.7"):
        policy.check("https://mixed.test/a.png")


def test_loopback_is_fetched_only_when_the_allowlist_admits_it(server):
    url = f"{_base(server)}/image.png"
    with pytest.raises(UrlRefused):
        UrlPolicy(UrlConfig()).fetch(url, max_bytes=10_000)
    assert UrlPolicy(LOCAL).fetch(url, max_bytes=10_000) == PNG


def test_every_redirect_is_checked_again(server):
    policy = UrlPolicy(LOCAL)
    assert policy.fetch(f"{_base(server)}/redirect", max_bytes=10_000) == PNG
    with pytest.raises(UrlRefused, match="169.254.169.254"):
        policy.fetch(f"{_base(server)}/to-metadata", max_bytes=10_000)
    with pytest.raises(UrlRefused, match="redirects"):
        policy.fetch(f"{_base(server)}/loop", max_bytes=10_000)


def test_the_byte_limit_holds_before_and_while_the_body_streams(server):
    policy = UrlPolicy(LOCAL)
    with pytest.raises(UrlTooLarge, match="holds 5000 bytes"):
        policy.fetch(f"{_base(server)}/declared-big", max_bytes=4000)
    started = time.monotonic()
    with pytest.raises(UrlTooLarge, match="more than 100000"):
        policy.fetch(f"{_base(server)}/endless", max_bytes=100_000)  # 10 MB offered, no length
    assert time.monotonic() - started < 5


def test_what_the_head_shows_lowers_the_limit_for_the_rest(server):
    # A consumer allows a video's size until the head shows a picture, then a picture's.
    started = time.monotonic()
    with pytest.raises(UrlTooLarge, match="more than 100000 bytes"):
        UrlPolicy(LOCAL).fetch(f"{_base(server)}/endless", max_bytes=1_000_000_000,
                               check_head=lambda head: 100_000)
    assert time.monotonic() - started < 5
    assert UrlPolicy(LOCAL).fetch(f"{_base(server)}/redirect", max_bytes=10_000, check_head=lambda head: None) == PNG


def test_an_image_header_past_the_pixel_limit_ends_the_download(server):
    def check_head(head: bytes) -> None:
        probe(head, max_bytes=50_000_000, max_pixels=16_000_000)

    with pytest.raises(TooManyPixels):
        UrlPolicy(LOCAL).fetch(f"{_base(server)}/bomb.png", max_bytes=50_000_000, check_head=check_head)


def test_unreachable_slow_and_failing_answers_are_unreachable(server):
    policy = UrlPolicy(LOCAL)
    with pytest.raises(UrlUnreachable, match="404"):
        policy.fetch(f"{_base(server)}/missing", max_bytes=10_000)
    started = time.monotonic()
    with pytest.raises(UrlUnreachable, match="timeout"):
        policy.fetch(f"{_base(server)}/slow", max_bytes=10_000)
    assert time.monotonic() - started < 2.5  # the read timeout is 1 s
    with pytest.raises(UrlUnreachable):
        UrlPolicy(LOCAL).fetch("http://name.invalid/a.png", max_bytes=10_000)
    closed = UrlPolicy(UrlConfig(allow=["127.0.0.0/8"], connect_timeout_s=1.0))
    with pytest.raises(UrlUnreachable):
        closed.fetch("http://127.0.0.1:9/a.png", max_bytes=10_000)  # nothing listens there


def test_a_post_goes_where_a_get_may(server):
    answer = UrlPolicy(LOCAL).post(f"{_base(server)}/hook", b'{"id": 1}', {"content-type": "application/json"})
    assert answer.status_code == 204 and server.seen[-1] == ("/hook", b'{"id": 1}')
    with pytest.raises(UrlRefused):
        UrlPolicy(UrlConfig()).post(f"{_base(server)}/hook", b"{}", {})


def test_a_bad_allowlist_entry_fails_the_config():
    with pytest.raises(pydantic.ValidationError, match="not-a-network"):
        UrlConfig(allow=["not-a-network"])
