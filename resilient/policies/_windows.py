"""Sliding windows of counts: time-based (a ring of buckets) and count-based (the last N calls).

Both keep running totals so that recording an outcome and reading a rate are O(1) amortized;
neither locks — the breaker and the budget hold their own lock around them.
"""

from __future__ import annotations

__all__ = ["CountWindow", "TimeWindow"]


class TimeWindow:
    """Counts of calls, failures and slow calls over the last ``span`` seconds, in ``buckets`` slices.

    A slice that falls out of the window is subtracted from the totals when the head passes it
    (resilience4j's and Finagle's approach), so the totals lag by at most one slice.
    """

    __slots__ = (
        "_calls",
        "_epoch",
        "_failures",
        "_head",
        "_n",
        "_slow",
        "_width",
        "calls",
        "failures",
        "slow",
    )

    def __init__(self, span: float, buckets: int = 10) -> None:
        self._n = buckets
        self._width = span / buckets
        self._calls = [0.0] * buckets
        self._failures = [0.0] * buckets
        self._slow = [0.0] * buckets
        self._epoch = [0] * buckets
        self._head = 0
        self.calls = 0.0
        self.failures = 0.0
        self.slow = 0.0

    def _advance(self, now: float) -> int:
        epoch = int(now / self._width)
        head = self._head
        if epoch <= head:
            return head % self._n
        if epoch - head >= self._n:
            n = self._n
            self._calls = [0.0] * n
            self._failures = [0.0] * n
            self._slow = [0.0] * n
            self.calls = self.failures = self.slow = 0.0
        else:
            for e in range(head + 1, epoch + 1):
                i = e % self._n
                self.calls -= self._calls[i]
                self.failures -= self._failures[i]
                self.slow -= self._slow[i]
                self._calls[i] = self._failures[i] = self._slow[i] = 0.0
        self._head = epoch
        return epoch % self._n

    @property
    def width(self) -> float:
        """Seconds per slice."""
        return self._width

    def add(self, now: float, calls: float = 1.0, failures: float = 0.0, slow: float = 0.0) -> None:
        """Record at time ``now``; negative amounts take away (a budget withdrawing)."""
        i = self._advance(now)
        self._calls[i] += calls
        self._failures[i] += failures
        self._slow[i] += slow
        self.calls += calls
        self.failures += failures
        self.slow += slow

    def add_calls(self, now: float, calls: float = 1.0) -> None:
        """``add(now, calls)`` kept short: budget deposits and the calls a throttle accepts."""
        epoch = int(now / self._width)
        i = self._advance(now) if epoch > self._head else self._head % self._n
        self._calls[i] += calls
        self.calls += calls

    def add_calls_at(self, at: float, calls: float) -> None:
        """``calls`` successful calls made in the slice of time ``at`` (now or earlier): nothing
        if that slice has left the window."""
        self._advance(at)
        epoch = int(at / self._width)
        if epoch > self._head - self._n:
            self._calls[epoch % self._n] += calls
            self.calls += calls

    def totals(self, now: float) -> tuple[float, float, float]:
        """(calls, failures, slow) over the window ending at ``now``."""
        self._advance(now)
        return self.calls, self.failures, self.slow

    def clear(self) -> None:
        n = self._n
        self._calls = [0.0] * n
        self._failures = [0.0] * n
        self._slow = [0.0] * n
        self.calls = self.failures = self.slow = 0.0


class CountWindow:
    """Counts of failures and slow calls among the last ``size`` calls."""

    __slots__ = ("_failed", "_i", "_n", "_slowed", "calls", "failures", "slow")

    def __init__(self, size: int) -> None:
        self._n = size
        self._failed = bytearray(size)
        self._slowed = bytearray(size)
        self._i = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, failed: bool, slow: bool) -> None:
        i = self._i
        if self.calls < self._n:
            self.calls += 1
        else:
            self.failures -= self._failed[i]
            self.slow -= self._slowed[i]
        self._failed[i] = failed
        self._slowed[i] = slow
        self.failures += failed
        self.slow += slow
        self._i = (i + 1) % self._n

    def add_calls_at(self, at: float, calls: float) -> None:
        """``calls`` successful calls (``at`` is there to match `TimeWindow`)."""
        n = int(calls)
        if n >= self._n:  # they fill the window
            self.clear()
            self.calls = self._n
            return
        for _ in range(n):
            self.add(False, False)

    def clear(self) -> None:
        self._failed = bytearray(self._n)
        self._slowed = bytearray(self._n)
        self._i = 0
        self.calls = self.failures = self.slow = 0
