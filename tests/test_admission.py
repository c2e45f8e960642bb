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
    first = admission.admit("x4", 80_000, time.time() + 120, "x4")  # 80 s: admitted
    assert first == pytest.approx(80) and admission.outstanding_s == pytest.approx(80)
    with pytest.raises(Overloaded) as refused:
        admission.admit("x4", 50_000, time.time() + 120, "x4")  # 80 + 50 > 120
    assert refused.value.headers() == {"retry-after": "80"} and refused.value.code == "overloaded"
    admission.release(first)
    assert admission.admit("x4", 50_000, time.time() + 120, "x4") == pytest.approx(50)
