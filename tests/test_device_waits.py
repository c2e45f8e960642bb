"""How a device lane waits for its GPU work (``engines.device.wait_for``): asleep until shortly
before the work's expected end, then polling, and CUDA's blocking sync where nothing is
expected or the work runs late.

The event here is a stand-in with a ``torch.cuda.Event``'s two methods, done at a chosen moment,
so the policy runs on a machine without a GPU.
"""
from __future__ import annotations

import time

from serve_app.engines import device
from serve_app.engines.device import wait_for


class _Event:
    """Done at ``done_at`` (a ``time.perf_counter`` reading); remembers how it was asked."""

    def __init__(self, done_at: float):
        self.done_at = done_at
        self.queries: list[float] = []
        self.synchronized = False

    def query(self) -> bool:
        now = time.perf_counter()
        self.queries.append(now)
        return now >= self.done_at

    def synchronize(self) -> None:
        self.synchronized = True
        time.sleep(max(0.0, self.done_at - time.perf_counter()))


def test_nothing_expected_waits_with_the_blocking_sync():
    event = _Event(time.perf_counter() + 0.02)
    wait_for(event, None)
    assert event.synchronized and not event.queries
    assert time.perf_counter() >= event.done_at


def test_sleeps_until_shortly_before_the_expected_end_then_polls(monkeypatch):
    monkeypatch.setattr(device, "_POLL_AFTER_S", 1.0)  # a busy test machine's late wake-up still polls
    expected = time.perf_counter() + 0.03
    event = _Event(expected + 0.001)
    wait_for(event, expected)
    assert not event.synchronized
    assert time.perf_counter() >= event.done_at
    # the first poll comes after the sleep, which never ends early; the last finds it done
    assert event.queries[0] >= expected - device._POLL_S
    assert event.queries[-1] >= event.done_at


def test_work_done_before_its_expected_end_is_seen_at_the_first_poll():
    expected = time.perf_counter() + 0.01
    event = _Event(time.perf_counter())  # already done
    wait_for(event, expected)
    assert len(event.queries) == 1 and not event.synchronized


def test_late_work_falls_back_to_the_blocking_sync():
    expected = time.perf_counter() + 0.005
    event = _Event(expected + 0.2)  # far past the polling window
    wait_for(event, expected)
    assert event.synchronized
    assert time.perf_counter() >= event.done_at
    assert event.queries[-1] < event.done_at  # given up before it was done

