"""Webhooks against a real local receiver: signed, retried with backoff, bounded, never blocking."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve_app.config import UrlConfig
from serve_app.jobs.urls import UrlPolicy
from serve_app.jobs.webhooks import Webhooks, signed_headers, verify

SECRET = "a-webhook-secret"


class _Receiver(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        server = self.server
        server.received.append((self.path, dict(self.headers.items()), body, time.monotonic()))
        if self.path == "/hang":
            time.sleep(3)
        status = 503 if self.path == "/flaky" and len(server.received) <= server.failures else 204
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()


@pytest.fixture
def receiver():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    httpd.received, httpd.failures = [], 2
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


def _hooks(**kwargs) -> Webhooks:
    policy = UrlPolicy(UrlConfig(allow=["127.0.0.0/8"], read_timeout_s=1.0, connect_timeout_s=1.0))
    return Webhooks(policy, SECRET, **{"first_wait_s": 0.1, "max_wait_s": 0.4, **kwargs})


def test_signatures_verify_and_a_tampered_or_stale_message_does_not():
    body = b'{"type":"job.succeeded"}'
    headers = signed_headers(SECRET, "msg_1", body)
    assert verify(SECRET, headers, body)
    assert not verify(SECRET, headers, body + b" ")
    assert not verify("another-secret", headers, body)
    stale = signed_headers(SECRET, "msg_1", body, timestamp=int(time.time()) - 3600)
    assert not verify(SECRET, stale, body) and not verify(SECRET, {}, body)


def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(receiver):
    # waits of 0.3 then 0.6 s: a busy machine's scheduling delay (0.5 s seen on two shared
    # cores) stays below the difference that shows them doubling
    hooks = _hooks(first_wait_s=0.3, max_wait_s=1.0)
    url = f"http://127.0.0.1:{receiver.server_address[1]}/flaky"
    assert hooks.send(url, "job.succeeded", {"id": "job_1", "status": "succeeded"}).result(timeout=10)
    assert len(receiver.received) == 3  # two 503s, then 204
    times = [r[3] for r in receiver.received]
    assert times[2] - times[1] > times[1] - times[0] > 0.05  # waits double
    ids = {r[1]["webhook-id"] for r in receiver.received}
    assert ids == {"msg_job_1_job.succeeded"}  # one id for every retry of one event
    path, headers, body, _ = receiver.received[-1]
    assert verify(SECRET, {k.lower(): v for k, v in headers.items()}, body)
    assert json.loads(body) == {"type": "job.succeeded", "data": {"id": "job_1", "status": "succeeded"}}
    hooks.close()


def test_a_dead_receiver_is_given_up_on_in_bounded_time_and_blocks_no_other(receiver):
    hooks = _hooks(give_up_s=1.5)
    started = time.monotonic()
    dead = hooks.send("http://127.0.0.1:9/hook", "job.failed", {"id": "job_2"})  # nothing listens
    hanging = hooks.send(f"http://127.0.0.1:{receiver.server_address[1]}/hang", "job.failed", {"id": "job_3"})
    fine = hooks.send(f"http://127.0.0.1:{receiver.server_address[1]}/ok", "job.succeeded", {"id": "job_4"})
    assert fine.result(timeout=5) and time.monotonic() - started < 1.5  # not behind the other two
    assert dead.result(timeout=10) is False and hanging.result(timeout=10) is False
    assert time.monotonic() - started < 5
    hooks.close()


def test_a_refused_webhook_url_is_not_retried():
    hooks = Webhooks(UrlPolicy(UrlConfig()), SECRET, first_wait_s=0.1)
    started = time.monotonic()
    assert hooks.send("http://169.254.169.254/hook", "job.succeeded", {"id": "job_5"}).result(timeout=5) is False
    assert time.monotonic() - started < 1
    hooks.close()
