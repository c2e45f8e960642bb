"""What a GPU replica admits: work it can finish before the request's deadline.

Each engine's cost is learned in seconds per input pixel of its network (from a calibration
pass at load where there is one, then from every batch it runs). A request whose own work
exceeds the whole request timeout is refused at once with ``too_much_work``, naming a lighter
choice; one that would only finish late behind the work already admitted gets ``overloaded``
with the time that work needs as its ``Retry-After``. The work ahead of a request is counted
as the batches take it, in turns by party (``batching.py``): all of its own party's earlier
work, and of each other party's at most as much as its own. So on a CPU, where one x4plus picture can
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
        self._admitted: dict[int, tuple[Hashable, float]] = {}  # ticket -> (party, estimated seconds)
        self._tickets = 0

    @property
    def outstanding_s(self) -> float:
        """The estimated work of everything admitted and not yet done."""
        return sum(cost for _, cost in self._admitted.values())

    def _ahead(self, party: Hashable, cost: float) -> float:
        by_party: dict[Hashable, float] = {}
        for other, seconds in self._admitted.values():
            by_party[other] = by_party.get(other, 0.0) + seconds
        return sum(work if other == party else min(work, cost) for other, work in by_party.items())

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

    def admit(self, engine: Hashable, pixels: int, deadline: float | None, what: str,
              party: Hashable = None) -> float:
        """The estimated seconds of this work, now counted as outstanding for ``party`` (default:
        a party of its own); or TooMuchWork or Overloaded when it cannot end by ``deadline`` (a
        ``time.time()``). ``what`` names the work in the refusal. Call ``release`` with the
        returned cost when the work ends."""
        cost = self.estimate(engine, pixels)
        if cost is None:  # nothing learned yet for this engine: admit, and learn from it
            return 0.0
        if cost > self.request_timeout_s:
            raise TooMuchWork(f"{what} needs about {cost:.0f} s on this replica's device; the request "
                              f"timeout is {self.request_timeout_s:.0f} s")
        party = object() if party is None else party
        ahead = self._ahead(party, cost)
        if deadline is not None and ahead + cost > deadline - time.time():
            raise Overloaded(f"{ahead:.0f} s of admitted work is ahead of this request, which "
                             f"needs about {cost:.0f} s more; it would not finish in time",
                             retry_after_s=math.ceil(ahead))
        self._tickets += 1
        self._admitted[self._tickets] = (party, cost)
        return _Cost(cost, self._tickets)

    def release(self, cost: float) -> None:
        self._admitted.pop(getattr(cost, "ticket", None), None)


class _Cost(float):
    """An admitted work's estimated seconds, carrying the ticket ``release`` takes it back by."""

    def __new__(cls, seconds: float, ticket: int):
        cost = super().__new__(cls, seconds)
        cost.ticket = ticket
        return cost
