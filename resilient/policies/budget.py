"""Retry budget: retries (and hedges) may add at most ``ratio`` of the request volume, plus a floor.

Finagle's ``RetryBudget`` and gRPC's retry throttling, as a token bucket whose tokens expire: each
call deposits ``ratio`` tokens, each retry or hedge withdraws one, and deposits older than ``ttl``
seconds are forgotten. ``min_per_second × ttl`` tokens are always available on top, so a quiet
service can still retry. When a whole dependency is down, retries stop at ~``ratio`` extra load
instead of multiplying it by the number of attempts.

With ``store=`` (a `resilient.stores.RedisStore`) the tokens live in the store, so the whole fleet's
retries stay within the ratio: counted calls are sent in batches with the next withdrawal (or every
``flush_calls`` calls / ``flush_interval`` seconds), so a call costs at most one round trip and
usually none. A local mirror of this process's deposits and withdrawals takes over when the store
is unavailable.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from resilient import _later
from resilient._clock import Clock
from resilient._errors import RetryBudgetExhausted
from resilient.policies._common import check_positive, resolve_clock
from resilient.policies._windows import TimeWindow

if TYPE_CHECKING:
    from resilient.stores._redis import BudgetHandle, RedisStore

__all__ = ["RetryBudget"]


class _Tally:
    """Calls deposited (a plain counter) and how many of them the window has been credited."""

    __slots__ = ("calls", "folded", "since")

    def __init__(self, now: float) -> None:
        self.calls = 0
        self.folded = 0
        self.since = now


class _SharedTally:
    """`_Tally` for a budget with a store: the counter sends a batch when enough has built up.

    ``deposit`` stays ``tally.calls += 1``; the property makes the check, so a budget without a
    store pays nothing for it.
    """

    __slots__ = ("_calls", "budget", "flush_at", "folded", "since")

    def __init__(self, now: float, budget: RetryBudget, flush_calls: int) -> None:
        self._calls = 0
        self.folded = 0
        self.since = now
        self.flush_at = flush_calls
        self.budget = budget

    @property
    def calls(self) -> int:
        return self._calls

    @calls.setter
    def calls(self, value: int) -> None:
        self._calls = value
        budget = self.budget
        if value >= self.flush_at or (
            budget._clock.monotonic() - self.since >= budget._flush_interval
        ):
            budget._flush()


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

    ``store=`` makes the budget fleet-wide: every budget with this ``name`` on that store draws on
    one set of tokens (``min_per_second`` is then a floor for the whole fleet). A withdrawal, and
    every ``flush_calls``-th deposit, is one round trip that blocks the calling thread (also
    under async retries); the rest cost nothing more::

        budget = rs.RetryBudget(name="orders", ratio=0.2, store=rs.RedisStore("redis://redis:6379"))
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    ttl: float = 10.0
    clock: Clock | None = None
    name: str = "retry_budget"
    store: RedisStore | None = None
    _clock: Clock = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False)
    _window: TimeWindow = field(init=False, repr=False)
    _reserve: float = field(init=False, repr=False)
    _tally: _Tally | _SharedTally = field(init=False, repr=False)
    _shared: BudgetHandle | None = field(init=False, repr=False)
    _flush_interval: float = field(init=False, repr=False)

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
        shared = None
        tally: _Tally | _SharedTally = _Tally(self._clock.monotonic())
        if self.store is not None:
            from resilient.stores._redis import RedisStore

            if not isinstance(self.store, RedisStore):
                raise ValueError(f"store must be a RedisStore, got {self.store!r}")
            if not isinstance(self.name, str) or not self.name:
                raise ValueError(f"name must be a non-empty string, got {self.name!r}")
            shared = self.store.bind_budget(self)
            tally = _SharedTally(self._clock.monotonic(), self, shared.flush_calls)
            object.__setattr__(self, "_flush_interval", shared.flush_interval)
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "_tally", tally)

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
        if self._shared is not None:
            return self._shared_withdraw()
        with self._lock:
            now = self._clock.monotonic()
            self._fold(now)
            return self._take_locked(now)

    def _take_locked(self, now: float) -> bool:
        """Take one of this process's own tokens, if there is one. Under the lock."""
        calls, _, _ = self._window.totals(now)
        if calls + self._reserve < 1.0:
            return False
        self._window.add(now, -1.0)
        return True

    async def try_withdraw_async(self) -> bool:
        """`try_withdraw` for async code: with a store, its round trip does not block the event
        loop (asyncio and trio); without one it is `try_withdraw` itself (no I/O).

        The round trip runs to its end even if the caller is cancelled meanwhile (the deposits
        it carries are not lost); the cancellation is raised after it.

        Example::

            if await budget.try_withdraw_async():
                ...  # retry
        """
        shared = self._shared
        if shared is None:
            return self.try_withdraw()
        tokens = self._fold_shared()
        return self._withdrawn(await _later.shielded(lambda: shared.take_async(tokens, True)))

    def withdraw(self) -> None:
        """Like `try_withdraw`, but raise `RetryBudgetExhausted` when the budget is spent."""
        if not self.try_withdraw():
            raise RetryBudgetExhausted(f"retry budget {self.name!r} is exhausted", name=self.name)

    def balance(self) -> float:
        """Tokens available now (retries that may start); fleet-wide with a store."""
        if self._shared is not None:
            tokens = self._fold_shared()
            reply = self._shared.take(tokens, False)
            if reply is not None:
                return reply[1]
        with self._lock:
            now = self._clock.monotonic()
            self._fold(now)
            calls, _, _ = self._window.totals(now)
            return calls + self._reserve

    # -- shared tokens (store=) -----------------------------------------------------------------------

    def _fold_shared(self) -> float:
        """`_fold` into the local mirror, returning the tokens to send to the store."""
        tally = self._tally
        with self._lock:
            now = self._clock.monotonic()
            calls = tally.calls - tally.folded
            tokens = 0.0
            if calls:
                tally.folded += calls
                elapsed = now - tally.since
                share = 1.0 if elapsed <= self.ttl else self.ttl / elapsed
                tokens = calls * self.ratio * share
                self._window.add_calls(now, tokens)
            tally.since = now
            if isinstance(tally, _SharedTally):
                tally.flush_at = tally.folded + (self._shared.flush_calls if self._shared else 1)
            return tokens

    def _flush(self) -> None:
        """Send the calls counted so far (from `deposit`, every ``flush_calls`` calls)."""
        tokens = self._fold_shared()
        shared = self._shared
        # Inside an async request: sent when it ends, not blocking.
        if (
            tokens
            and shared is not None
            and not _later.defer(functools.partial(shared.take_async, tokens, False))
        ):
            shared.take(tokens, False)

    def _shared_withdraw(self) -> bool:
        assert self._shared is not None
        tokens = self._fold_shared()
        return self._withdrawn(self._shared.take(tokens, True))

    def _withdrawn(self, reply: tuple[bool, float] | None) -> bool:
        """The store's answer to a withdrawal, mirrored locally; None: unavailable."""
        with self._lock:
            now = self._clock.monotonic()
            if reply is None:  # the store is unavailable: this process's own tokens decide
                return self._take_locked(now)
            if reply[0]:
                self._window.add(now, -1.0)
            return reply[0]
