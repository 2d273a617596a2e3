"""Retry budget: retries (and hedges) may add at most ``ratio`` of the request volume, plus a floor.

Finagle's ``RetryBudget`` and gRPC's retry throttling, as a token bucket whose tokens expire: each
call deposits ``ratio`` tokens, each retry or hedge withdraws one, and deposits older than ``ttl``
seconds are forgotten. ``min_per_second × ttl`` tokens are always available on top, so a quiet
service can still retry. When a whole dependency is down, retries stop at ~``ratio`` extra load
instead of multiplying it by the number of attempts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from resilient._clock import Clock
from resilient._errors import RetryBudgetExhausted
from resilient.policies._common import check_positive, resolve_clock
from resilient.policies._windows import TimeWindow

__all__ = ["RetryBudget"]


class _Tally:
    """Calls deposited (a plain counter) and how many of them the window has been credited."""

    __slots__ = ("calls", "folded", "since")

    def __init__(self, now: float) -> None:
        self.calls = 0
        self.folded = 0
        self.since = now


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class RetryBudget:
    """Cap retries at ``ratio`` of calls plus ``min_per_second``, over a sliding ``ttl`` seconds.

    Share one budget between every `Retry` (and `Hedge`) that calls the same dependency.

    Example::

        budget = rs.RetryBudget(ratio=0.2, min_per_second=10.0, ttl=10.0)
        orders = rs.Retry(on=ConnectionError, budget=budget)
        inventory = rs.Retry(on=ConnectionError, budget=budget)

        budget.deposit()            # a call was made (Retry does this for you)
        if budget.try_withdraw():   # may I retry?
            ...
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    ttl: float = 10.0
    clock: Clock | None = None
    name: str = "retry_budget"
    _clock: Clock = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False)
    _window: TimeWindow = field(init=False, repr=False)
    _reserve: float = field(init=False, repr=False)
    _tally: _Tally = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_positive("ratio", self.ratio, allow_zero=True)
        check_positive("min_per_second", self.min_per_second, allow_zero=True)
        check_positive("ttl", self.ttl)
        if self.ratio == 0 and self.min_per_second == 0:
            raise ValueError("ratio and min_per_second are both 0: the budget would allow nothing")
        object.__setattr__(self, "_clock", resolve_clock(self.clock))
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_window", TimeWindow(self.ttl))
        object.__setattr__(self, "_reserve", self.min_per_second * self.ttl)
        object.__setattr__(self, "_tally", _Tally(self._clock.monotonic()))

    def deposit(self) -> None:
        """Record one call: it earns ``ratio`` tokens for ``ttl`` seconds.

        Every call deposits, so this is one integer increment, with no lock and no clock: the
        calls are folded into the window when tokens are next counted (`_fold`). Under threads
        an increment may rarely be lost, which only makes the budget a hair stricter.
        """
        self._tally.calls += 1

    def _fold(self, now: float) -> None:
        """Credit the calls made since the last fold, as if spread evenly over that time: only
        the share that falls within the last ``ttl`` seconds still counts. Under the lock."""
        tally = self._tally
        calls = tally.calls - tally.folded
        if calls:
            tally.folded += calls
            elapsed = now - tally.since
            share = 1.0 if elapsed <= self.ttl else self.ttl / elapsed
            self._window.add_calls(now, calls * self.ratio * share)
        tally.since = now

    def try_withdraw(self) -> bool:
        """Take one token for a retry or hedge; False (and nothing taken) when the budget is spent."""
        with self._lock:
            now = self._clock.monotonic()
            self._fold(now)
            calls, _, _ = self._window.totals(now)
            if calls + self._reserve < 1.0:
                return False
            self._window.add(now, -1.0)
            return True

    def withdraw(self) -> None:
        """Like `try_withdraw`, but raise `RetryBudgetExhausted` when the budget is spent."""
        if not self.try_withdraw():
            raise RetryBudgetExhausted(f"retry budget {self.name!r} is exhausted", name=self.name)

    def balance(self) -> float:
        """Tokens available now (retries that may start)."""
        with self._lock:
            now = self._clock.monotonic()
            self._fold(now)
            calls, _, _ = self._window.totals(now)
            return calls + self._reserve
