"""Admission: a GPU replica refuses at once the work it cannot finish before the deadline."""
import time

import pytest

from serve_app.deployments.admission import Admission
from serve_app.errors import Overloaded, TooMuchWork


def test_unknown_engines_are_admitted_and_learned_from():
    admission = Admission(request_timeout_s=120)
    assert admission.admit("x4", 10_000, time.time() + 120, "x4") == 0.0  # nothing known yet
    admission.learn("x4", 1000, 2.0)
    assert admission.estimate("x4", 10_000) == pytest.approx(20.0)
    admission.learn("x4", 1000, 4.0)  # the running estimate moves toward the newest pass
    assert 20.0 < admission.estimate("x4", 10_000) < 40.0


def test_work_longer_than_the_timeout_is_too_much_and_names_its_cost():
    admission = Admission(request_timeout_s=120)
    admission.learn("x4", 1000, 1.0)
    with pytest.raises(TooMuchWork, match="about 300 s.*timeout is 120 s"):
        admission.admit("x4", 300_000, time.time() + 120, "x4 on 5 tiles")
    assert admission.outstanding_s == 0


def test_work_behind_a_backlog_that_would_end_late_is_overloaded_with_retry_after():
    admission = Admission(request_timeout_s=120)
    admission.learn("x4", 1000, 1.0)
    first = admission.admit("x4", 80_000, time.time() + 120, "x4", "job_1")  # 80 s: admitted
    assert first == pytest.approx(80) and admission.outstanding_s == pytest.approx(80)
    with pytest.raises(Overloaded) as refused:  # the same party's work goes first: 80 + 50 > 120
        admission.admit("x4", 50_000, time.time() + 120, "x4", "job_1")
    assert refused.value.headers() == {"retry-after": "80"} and refused.value.code == "overloaded"
    admission.release(first)
    assert admission.admit("x4", 50_000, time.time() + 120, "x4") == pytest.approx(50)


def test_another_partys_backlog_counts_only_as_much_as_the_turns_it_takes():
    admission = Admission(request_timeout_s=120)
    admission.learn("x4", 1000, 1.0)
    admission.admit("x4", 100_000, time.time() + 120, "x4", "job_1")  # a video's 100 s
    # a 10 s picture takes turns with it: about 10 s of the video's work, then its own 10 s
    small = admission.admit("x4", 10_000, time.time() + 30, "x4")
    assert small == pytest.approx(10) and admission.outstanding_s == pytest.approx(110)
    with pytest.raises(Overloaded, match="40 s of admitted work"):  # 100 s video + 10 s picture, turn by turn
        admission.admit("x4", 30_000, time.time() + 60, "x4")
    admission.release(small)
    assert admission.outstanding_s == pytest.approx(100)
