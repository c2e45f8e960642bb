"""What a GPU replica admits: work it can finish before the request's deadline.

Each engine's cost is learned in seconds per input pixel of its network (from a calibration
pass at load where there is one, then from every batch it runs). A request whose own work
exceeds the whole request timeout is refused at once with ``too_much_work``, naming a lighter
choice; one that would only finish late behind the work already admitted gets ``overloaded``
with the time that work needs as its ``Retry-After``. So on a CPU, where one x4plus picture can
take minutes, nothing is started that cannot end in time, and the queue ahead of any request
is never longer than the timeout.
"""
from __future__ import annotations

import math
import time
from collections.abc import Hashable

from serve_app.errors import Overloaded, TooMuchWork

_WEIGHT = 0.3  # of the newest batch in the running estimate


class Admission:
    def __init__(self, request_timeout_s: float):
        self.request_timeout_s = request_timeout_s
        self._seconds_per_pixel: dict[Hashable, float] = {}
        self.outstanding_s = 0.0  # the estimated work of everything admitted and not yet done

    def learn(self, engine: Hashable, pixels: int, seconds: float) -> None:
        """Fold one measured pass (``pixels`` network input pixels in ``seconds``) into the estimate."""
        if pixels <= 0 or seconds <= 0:
            return
        rate = seconds / pixels
        old = self._seconds_per_pixel.get(engine)
        self._seconds_per_pixel[engine] = rate if old is None else (1 - _WEIGHT) * old + _WEIGHT * rate

    def estimate(self, engine: Hashable, pixels: int) -> float | None:
        rate = self._seconds_per_pixel.get(engine)
        return None if rate is None else rate * pixels

    def admit(self, engine: Hashable, pixels: int, deadline: float | None, what: str) -> float:
        """The estimated seconds of this work, now counted as outstanding; or TooMuchWork or
        Overloaded when it cannot end by ``deadline`` (a ``time.time()``). ``what`` names the
        work in the refusal. Call ``release`` with the returned cost when the work ends."""
        cost = self.estimate(engine, pixels)
        if cost is None:  # nothing learned yet for this engine: admit, and learn from it
            return 0.0
        if cost > self.request_timeout_s:
            raise TooMuchWork(f"{what} needs about {cost:.0f} s on this replica's device; the request "
                              f"timeout is {self.request_timeout_s:.0f} s")
        if deadline is not None and self.outstanding_s + cost > deadline - time.time():
            raise Overloaded(f"{self.outstanding_s:.0f} s of admitted work is ahead of this request, which "
                             f"needs about {cost:.0f} s more; it would not finish in time",
                             retry_after_s=math.ceil(self.outstanding_s))
        self.outstanding_s += cost
        return cost

    def release(self, cost: float) -> None:
        self.outstanding_s = max(0.0, self.outstanding_s - cost)
