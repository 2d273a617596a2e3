"""Bulkhead: cap how many calls run at once, with a bounded FIFO queue and a bounded wait.

::

    a permit is free ──────────────────────────────────────────────► run the call, then release()
    all are taken ──(queue has room, time left)──► wait, FIFO ──(handed a permit)──► run the call
       │                                               └──(max_wait or deadline passes)──► reject
       └──(queue full, or max_queue=0, or max_wait=0, or no time left)──► reject at once

Rejection is `BulkheadFullError`, and the function is not called.

A released permit goes straight to the longest-waiting caller (no barging: ``try_acquire`` and new
callers find no free permit while anyone waits). One ``threading.Lock`` guards the counts and the
queue, and is never held across the call or an await; threads (sync calls) and tasks (asyncio or
trio) share one count. A waiter is woken by its own primitive: a pre-locked ``threading.Lock`` for a
thread, an `anyio.Event` for a task, set from another thread or event loop through that loop's
non-blocking thread-safe hook (``call_soon_threadsafe`` / ``TrioToken.run_sync_soon``), so a release
never blocks on another loop.

Permits never leak: the call's exception or cancellation releases it, and a queued caller that is
cancelled or times out just as it is handed a permit passes the permit on.

Waits are measured by the event loop (async; so trio's ``MockClock`` drives them) or the OS (sync)
when ``clock`` is left out; with a ``clock=`` (e.g. `FakeClock`) they are measured on that clock.

The limit is fixed (``max_concurrent=10``) or adaptive (``max_concurrent=AIMDLimit(...)``). An
adaptive bulkhead samples its limit as each permitted call finishes (`on_success` / `on_failure`;
the decorator reports for you). A raised limit hands permits to waiters at once; a lowered one takes
free permits away first and, when more calls are in flight than the new limit, retires returned
permits (``debt``) until in-flight falls below it. The fixed path never looks at any of this: the
drivers branch once, on ``_limit``.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from resilient._clock import Clock, SystemClock
from resilient._deadline import _DEADLINE
from resilient._errors import BulkheadFullError
from resilient._policy import Policy
from resilient.events import CallRejected, Hook, emit
from resilient.policies._common import check_count, check_positive, resolve_clock
from resilient.policies.limits import AIMDLimit

__all__ = ["Bulkhead", "BulkheadStatistics"]

T = TypeVar("T")

_get_ident = threading.get_ident

# A waiter's state, changed under the lock: WAITING -> GRANTED (handed a permit) or GONE (left the
# queue); GRANTED -> GONE when it could not take the permit and passed it on.
_WAITING = 0
_GRANTED = 1
_GONE = 2

# What `_admit` decided, besides a rejection reason.
_TOOK = "took"
_QUEUED = "queued"

_WHY = {
    "full": "every permit is taken and queueing is off",
    "queue_full": "every permit is taken and the queue is full",
    "max_wait": "no permit came free within max_wait",
    "deadline": "no permit came free before the deadline",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadStatistics:
    """A snapshot of a `Bulkhead`: permits in use and free, callers queued, and running totals.

    ``max_concurrent`` is the current limit (for an `AIMDLimit`, the value it has moved to).
    ``in_use + available == max_concurrent`` always, except just after an adaptive limit fell below
    the calls in flight (then ``available == 0`` and ``in_use > max_concurrent`` until enough of
    them finish); a permit handed to a queued caller that has not resumed yet counts as in use.
    ``acquired_total`` counts permits given out (at once or from the queue), ``completed_total``
    permits given back, ``rejected_total`` refusals (including ``try_acquire()`` returning False).

    Example::

        stats = bulkhead.statistics()
        gauge.set(stats.in_use / stats.max_concurrent)
    """

    max_concurrent: int
    max_queue: int
    in_use: int
    available: int
    queued: int
    acquired_total: int
    rejected_total: int
    completed_total: int


class _Waiter:
    """One queued caller: ``signal`` wakes it; ``remote`` runs ``signal`` on its loop's thread."""

    __slots__ = ("remote", "signal", "state", "thread")

    def __init__(
        self,
        signal: Callable[[], object],
        remote: Callable[[Callable[[], object]], object] | None,
    ) -> None:
        self.state = _WAITING
        self.signal = signal
        self.remote = remote
        self.thread = _get_ident()


class _Runtime:
    """The bulkhead's mutable state; every read and write happens under ``lock``."""

    __slots__ = ("acquired", "completed", "debt", "free", "limit", "lock", "rejected", "waiters")

    def __init__(self, limit: int) -> None:
        self.lock = threading.Lock()
        self.limit = limit
        self.free = limit  # > 0 only while nobody waits: releases go to waiters first
        # Adaptive only: permits in use beyond a lowered limit, retired as they come back.
        # In use = limit - free + debt; free > 0 and debt > 0 never hold together.
        self.debt = 0
        self.waiters: deque[_Waiter] = deque()
        self.acquired = 0
        self.completed = 0
        self.rejected = 0


def _loop_waker() -> Callable[[Callable[[], object]], object]:
    """The running event loop's non-blocking "run this callback on your thread"."""
    trio = sys.modules.get("trio")
    if trio is not None:  # first: a trio guest run also sees its host's asyncio loop
        try:
            return trio.lowlevel.current_trio_token().run_sync_soon  # type: ignore[no-any-return]
        except RuntimeError:
            pass
    return asyncio.get_running_loop().call_soon_threadsafe


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Bulkhead(Policy):
    """Let at most ``max_concurrent`` calls run at once; queue up to ``max_queue`` more, FIFO.

    A caller that finds every permit taken joins the queue if fewer than ``max_queue`` are waiting,
    and waits at most ``max_wait`` seconds (``None``: no limit), never past the ambient deadline
    (``rs.time_left()``); otherwise, or when its wait runs out, it gets `BulkheadFullError` and the
    function is not called. ``max_wait=0`` means "never wait". Works for sync functions (threads)
    and ``async def`` ones (asyncio and trio), sharing one count and one queue; a sync caller that
    queues blocks its thread, so call sync functions from worker threads, not from an event loop.

    Example::

        db = rs.Bulkhead(name="db", max_concurrent=10, max_queue=50, max_wait=0.5)

        @db
        def query(sql: str) -> list[Row]: ...

        @db
        async def query_async(sql: str) -> list[Row]: ...

    The permission protocol serves code that is not one call (the HTTP transport, hedging)::

        if db.try_acquire():          # no waiting; False when no permit is free
            try:
                ...
            finally:
                db.release()

        db.acquire()                  # or wait in the queue (async: await db.acquire_async())

    With an adaptive limit, ``max_concurrent=rs.AIMDLimit(...)``, the number of permits follows
    the calls' outcomes (see `AIMDLimit`). The decorator reports each outcome; code using the
    permission protocol reports it by how it gives the permit back::

        api = rs.Bulkhead(name="api", max_concurrent=rs.AIMDLimit(initial=20, timeout=2.0))

        api.acquire()
        started = time.monotonic()
        try:
            response = send()
        except BaseException:
            api.release()             # cancelled, or never sent: no sample
            raise
        if response.status_code in (429, 503):
            api.on_failure(time.monotonic() - started)    # exc=None: a drop, the limit backs off
        else:
            api.on_success(time.monotonic() - started)    # may grow the limit (a drop if > timeout)

    With a fixed limit all three just give the permit back.
    """

    max_concurrent: int | AIMDLimit = 10
    max_queue: int = 0
    max_wait: float | None = None
    name: str = "bulkhead"
    clock: Clock | None = None
    hooks: Sequence[Hook] = ()
    _clock: Clock = field(init=False, repr=False)
    _native: bool = field(init=False, repr=False)
    _queueing: bool = field(init=False, repr=False)
    _limit: AIMDLimit | None = field(init=False, repr=False)
    _rt: _Runtime = field(init=False, repr=False)

    def __post_init__(self) -> None:
        limit = self.max_concurrent
        if isinstance(limit, AIMDLimit):
            start = limit.initial
        elif isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
            start = limit
        else:
            raise ValueError(
                f"max_concurrent must be an integer >= 1 or an AIMDLimit, got {limit!r}"
            )
        check_count("max_queue", self.max_queue, minimum=0)
        if self.max_wait is not None:
            check_positive("max_wait", self.max_wait, allow_zero=True)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        clock = resolve_clock(self.clock)
        object.__setattr__(self, "_clock", clock)
        object.__setattr__(self, "_native", isinstance(clock, SystemClock))
        object.__setattr__(self, "_queueing", self.max_queue > 0 and self.max_wait != 0)
        object.__setattr__(self, "_limit", limit if isinstance(limit, AIMDLimit) else None)
        object.__setattr__(self, "_rt", _Runtime(start))
        object.__setattr__(self, "hooks", tuple(self.hooks))

    def describe(self) -> str:
        return (
            f"Bulkhead(name={self.name!r}, max_concurrent={self.max_concurrent}, "
            f"max_queue={self.max_queue}, max_wait={self.max_wait})"
        )

    # -- reading ---------------------------------------------------------------------------------

    def statistics(self) -> BulkheadStatistics:
        """A consistent snapshot of permits, queue and totals.

        Example::

            assert bulkhead.statistics().in_use == 0
        """
        rt = self._rt
        with rt.lock:
            return BulkheadStatistics(
                max_concurrent=rt.limit,
                max_queue=self.max_queue,
                in_use=rt.limit - rt.free + rt.debt,
                available=rt.free,
                queued=len(rt.waiters),
                acquired_total=rt.acquired,
                rejected_total=rt.rejected,
                completed_total=rt.completed,
            )

    # -- the permission protocol -------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take a permit if one is free now (never waits, never jumps the queue); else False.

        Example::

            if bulkhead.try_acquire():
                try:
                    work()
                finally:
                    bulkhead.release()
        """
        rt = self._rt
        with rt.lock:
            if rt.free:
                rt.free -= 1
                rt.acquired += 1
                return True
            rt.rejected += 1
            return False

    def acquire(self) -> None:
        """Take a permit, waiting in the queue if allowed; raise `BulkheadFullError` if none comes.

        Blocks the calling thread. Pair every successful ``acquire`` with one `release`.

        Example::

            bulkhead.acquire()
            try:
                work()
            finally:
                bulkhead.release()
        """
        rt = self._rt
        with rt.lock:
            if rt.free:
                rt.free -= 1
                rt.acquired += 1
                return
        self._acquire_slow()

    async def acquire_async(self) -> None:
        """Like `acquire`, for async code: waits as a task (asyncio or trio), cancellable.

        Example::

            await bulkhead.acquire_async()
            try:
                await work()
            finally:
                bulkhead.release()
        """
        rt = self._rt
        with rt.lock:
            if rt.free:
                rt.free -= 1
                rt.acquired += 1
                return
        await self._acquire_slow_async()

    def release(self) -> None:
        """Give a permit back; the longest-waiting caller, if any, gets it.

        Use it for a permit whose call did not run or was cancelled: with an adaptive limit it is
        not a sample (report finished calls with `on_success` / `on_failure`). Raises RuntimeError
        when no permit is out (a release without an acquire).

        Example::

            bulkhead.release()
        """
        if self._limit is not None:
            self._give_back(None, None)
            return
        rt = self._rt
        with rt.lock:
            if rt.free >= rt.limit:
                raise RuntimeError(f"bulkhead {self.name!r}: release() without a permit")
            rt.completed += 1
            if not rt.waiters:
                rt.free += 1
                return
            waiter = rt.waiters.popleft()
            waiter.state = _GRANTED
            rt.acquired += 1
        self._wake(waiter)

    def on_success(self, duration: float) -> None:
        """The permitted call succeeded after ``duration`` seconds: release its permit.

        With an adaptive limit this is a sample: a drop if ``duration`` exceeds the limit's
        ``timeout``, otherwise it may grow the limit. (The breaker's protocol, shared.)

        Example::

            bulkhead.on_success(0.012)
        """
        if self._limit is not None:
            self._give_back(False, duration)
            return
        self.release()

    def on_failure(self, duration: float, exc: BaseException | None = None) -> None:
        """The permitted call failed after ``duration`` seconds: release its permit.

        With an adaptive limit this is a sample: a drop when ``exc`` is None (the caller's own
        verdict, e.g. an HTTP 503 or 429 answer) or is matched by the limit's ``on``, or when the
        call took longer than its ``timeout``; any other exception means the dependency answered
        and counts like a success. A cancellation exception is no sample (as `release`).

        Example::

            bulkhead.on_failure(0.5, TimeoutError())   # a drop: an adaptive limit backs off
        """
        limit = self._limit
        if limit is None:
            self.release()
        elif exc is None:
            self._give_back(True, duration)
        elif isinstance(exc, Exception):
            self._give_back_after(exc, duration)
        else:
            self._give_back(None, None)

    # -- the adaptive limit ------------------------------------------------------------------------

    def _give_back_after(self, exc: Exception, duration: float | None) -> None:
        """Adaptive release after a call raised ``exc``: a drop if the limit's ``on`` says so. If
        that predicate itself raises, the permit still comes back (no sample) before its error
        propagates."""
        limit = self._limit
        assert limit is not None
        try:
            dropped = limit.is_drop(exc)
        except BaseException:
            self._give_back(None, None)
            raise
        self._give_back(dropped, duration)

    def _give_back(self, dropped: bool | None, duration: float | None) -> None:
        """Adaptive release: sample the limit (unless ``dropped`` is None), then return the permit."""
        limit = self._limit
        assert limit is not None
        rt = self._rt
        with rt.lock:
            in_use = rt.limit - rt.free + rt.debt
            if in_use <= 0:
                raise RuntimeError(f"bulkhead {self.name!r}: release() without a permit")
            rt.completed += 1
            permits = 1
            if dropped is not None:
                new = limit.next_limit(rt.limit, in_use, dropped=dropped, duration=duration)
                permits += new - rt.limit
                rt.limit = new
            woken = self._move_permits_locked(permits)
        for waiter in woken:
            self._wake(waiter)

    def _move_permits_locked(self, permits: int) -> list[_Waiter]:
        """Adaptive: add ``permits`` (or take them away, if negative); the waiters to wake.

        Added permits pay off debt first, then go to waiters in FIFO order, then to ``free``;
        taken permits come out of ``free`` first and become debt when it runs out.
        """
        rt = self._rt
        woken: list[_Waiter] = []
        if permits > 0:
            paid = min(rt.debt, permits)
            rt.debt -= paid
            permits -= paid
            waiters = rt.waiters
            while permits and waiters:
                waiter = waiters.popleft()
                waiter.state = _GRANTED
                rt.acquired += 1
                woken.append(waiter)
                permits -= 1
            rt.free += permits
        elif permits < 0:
            taken = min(rt.free, -permits)
            rt.free -= taken
            rt.debt += -permits - taken
        return woken

    # -- the slow paths ----------------------------------------------------------------------------

    def _allowed_wait(self) -> tuple[float | None, str]:
        """How long a queued caller may wait (None: for ever), and what limits it."""
        wait = self.max_wait
        ambient = _DEADLINE.get()
        if ambient is not None:
            clock, at = ambient
            left = at - clock.monotonic()
            if wait is None or left < wait:
                return max(0.0, left), "deadline"
        return wait, "max_wait"

    def _take_now(self) -> bool:
        """For a caller that may not queue: take a free permit, or count the refusal."""
        rt = self._rt
        with rt.lock:
            if rt.free:
                rt.free -= 1
                rt.acquired += 1
                return True
            rt.rejected += 1
            return False

    def _admit(self, waiter: _Waiter) -> str:
        """Take a free permit, queue ``waiter``, or say why not: `_TOOK`, `_QUEUED` or a reason."""
        rt = self._rt
        with rt.lock:
            if rt.free:
                rt.free -= 1
                rt.acquired += 1
                return _TOOK
            if len(rt.waiters) < self.max_queue:
                rt.waiters.append(waiter)
                return _QUEUED
            rt.rejected += 1
        return "queue_full"

    def _withdraw(self, waiter: _Waiter, *, rejected: bool) -> bool:
        """Leave the queue; False when a permit was handed over first (the waiter now holds it)."""
        rt = self._rt
        with rt.lock:
            if waiter.state == _GRANTED:
                return False
            if waiter.state == _WAITING:
                rt.waiters.remove(waiter)
                waiter.state = _GONE
            if rejected:
                rt.rejected += 1
            return True

    def _forfeit(self, waiter: _Waiter) -> None:
        """``waiter`` was handed a permit it will not use (cancelled, unreachable): pass it on."""
        rt = self._rt
        if self._limit is not None:
            with rt.lock:
                waiter.state = _GONE
                rt.acquired -= 1
                woken = self._move_permits_locked(1)
            for other in woken:
                self._wake(other)
            return
        with rt.lock:
            waiter.state = _GONE
            rt.acquired -= 1
            if not rt.waiters:
                rt.free += 1
                return
            waiter = rt.waiters.popleft()
            waiter.state = _GRANTED
            rt.acquired += 1
        self._wake(waiter)

    def _wake(self, waiter: _Waiter) -> None:
        """Wake a waiter just handed a permit; outside the lock, never blocking."""
        try:
            if waiter.remote is None or waiter.thread == _get_ident():
                waiter.signal()
            else:
                waiter.remote(waiter.signal)
        except RuntimeError:
            # Its event loop is closed or finished: nobody will take this permit; pass it on.
            self._forfeit(waiter)

    def _reject(self, reason: str) -> BulkheadFullError:
        emit(self.hooks, CallRejected(self.name, "bulkhead", reason))
        return BulkheadFullError(
            f"bulkhead {self.name!r} rejected the call: {_WHY[reason]} "
            f"(max_concurrent={self._rt.limit}, max_queue={self.max_queue}, "
            f"max_wait={self.max_wait})",
            name=self.name,
        )

    def _acquire_slow(self) -> None:
        wait, why = self._allowed_wait()
        if not self._queueing or (wait is not None and wait <= 0):
            if self._take_now():
                return
            raise self._reject("deadline" if self._queueing else "full")
        gate = threading.Lock()
        gate.acquire()
        waiter = _Waiter(gate.release, None)
        outcome = self._admit(waiter)
        if outcome == _TOOK:
            return
        if outcome != _QUEUED:
            raise self._reject(outcome)
        try:
            if wait is None:
                gate.acquire()
            elif self._native:
                gate.acquire(timeout=min(wait, threading.TIMEOUT_MAX))
            else:
                self._expire_later(waiter, wait)
                gate.acquire()  # opened by a release or by the timer
        except BaseException:
            if not self._withdraw(waiter, rejected=False):
                self._forfeit(waiter)
            raise
        if waiter.state == _GRANTED:
            return
        if self._withdraw(waiter, rejected=True):
            raise self._reject(why)
        # handed a permit just as the wait ran out: keep it

    def _expire_later(self, waiter: _Waiter, wait: float) -> None:
        """With an injected clock, a helper thread sleeps on it and times the waiter out."""
        rt = self._rt
        clock = self._clock

        def expire() -> None:
            clock.sleep(wait)
            with rt.lock:
                if waiter.state != _WAITING:
                    return
                rt.waiters.remove(waiter)
                waiter.state = _GONE
            waiter.signal()

        threading.Thread(target=expire, name=f"{self.name}-max-wait", daemon=True).start()

    async def _acquire_slow_async(self) -> None:
        wait, why = self._allowed_wait()
        if not self._queueing or (wait is not None and wait <= 0):
            if self._take_now():
                return
            raise self._reject("deadline" if self._queueing else "full")
        event = anyio.Event()
        waiter = _Waiter(event.set, _loop_waker())
        outcome = self._admit(waiter)
        if outcome == _TOOK:
            return
        if outcome != _QUEUED:
            raise self._reject(outcome)
        try:
            if wait is None:
                await event.wait()
            elif self._native:
                with anyio.move_on_after(wait):
                    await event.wait()
            else:
                await self._wait_on_clock(event, wait)
        except BaseException:
            if not self._withdraw(waiter, rejected=False):
                self._forfeit(waiter)
            raise
        if waiter.state == _GRANTED:
            return
        if self._withdraw(waiter, rejected=True):
            raise self._reject(why)

    async def _wait_on_clock(self, event: anyio.Event, wait: float) -> None:
        """Wait for ``event`` at most ``wait`` seconds of the injected clock."""
        clock = self._clock
        async with anyio.create_task_group() as tg:

            async def expire() -> None:
                await clock.sleep_async(wait)
                tg.cancel_scope.cancel()

            tg.start_soon(expire)
            await event.wait()
            tg.cancel_scope.cancel()

    # -- drivers ---------------------------------------------------------------------------------

    def _execute(self, thunk: Callable[[], T]) -> T:
        if self._limit is not None:
            return self._execute_adaptive(thunk)
        rt = self._rt
        with rt.lock:
            admitted = rt.free > 0
            if admitted:
                rt.free -= 1
                rt.acquired += 1
        if not admitted:
            self._acquire_slow()
        try:
            return thunk()
        finally:
            # `release()` inlined: this is the success path.
            with rt.lock:
                rt.completed += 1
                waiter = rt.waiters.popleft() if rt.waiters else None
                if waiter is None:
                    rt.free += 1
                else:
                    waiter.state = _GRANTED
                    rt.acquired += 1
            if waiter is not None:
                self._wake(waiter)

    async def _execute_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        if self._limit is not None:
            return await self._execute_adaptive_async(thunk)
        rt = self._rt
        with rt.lock:
            admitted = rt.free > 0
            if admitted:
                rt.free -= 1
                rt.acquired += 1
        if not admitted:
            await self._acquire_slow_async()
        try:
            return await thunk()
        finally:
            with rt.lock:
                rt.completed += 1
                waiter = rt.waiters.popleft() if rt.waiters else None
                if waiter is None:
                    rt.free += 1
                else:
                    waiter.state = _GRANTED
                    rt.acquired += 1
            if waiter is not None:
                self._wake(waiter)

    def _execute_adaptive(self, thunk: Callable[[], T]) -> T:
        limit = self._limit
        assert limit is not None
        rt = self._rt
        with rt.lock:
            admitted = rt.free > 0
            if admitted:
                rt.free -= 1
                rt.acquired += 1
        if not admitted:
            self._acquire_slow()
        clock = self._clock if limit.timeout is not None else None
        started = clock.monotonic() if clock is not None else 0.0
        try:
            result = thunk()
        except Exception as exc:
            took = clock.monotonic() - started if clock is not None else None
            self._give_back_after(exc, took)
            raise
        except BaseException:
            self._give_back(None, None)  # cancelled: no sample
            raise
        self._give_back(False, clock.monotonic() - started if clock is not None else None)
        return result

    async def _execute_adaptive_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        limit = self._limit
        assert limit is not None
        rt = self._rt
        with rt.lock:
            admitted = rt.free > 0
            if admitted:
                rt.free -= 1
                rt.acquired += 1
        if not admitted:
            await self._acquire_slow_async()
        clock = self._clock if limit.timeout is not None else None
        started = clock.monotonic() if clock is not None else 0.0
        try:
            result = await thunk()
        except Exception as exc:
            took = clock.monotonic() - started if clock is not None else None
            self._give_back_after(exc, took)
            raise
        except BaseException:
            self._give_back(None, None)  # cancelled: no sample
            raise
        self._give_back(False, clock.monotonic() - started if clock is not None else None)
        return result
