"""Hedging: when a call is slow, start another copy and take whichever succeeds first.

"The Tail at Scale" (Dean and Barroso): most slow calls are slow by bad luck (a GC pause, a busy
replica, a lost packet), so a second attempt started after ``delay`` usually finishes long before the
first. The price is extra load, which ``max_hedges`` and an optional `RetryBudget` cap. Only hedge
**idempotent** work: the same request may run several times at once, and a losing attempt may still
have its effects after the call has returned.

How a call runs::

    t=0        attempt 0 starts
    t=delay    not finished yet -> hedge 1 starts (if the budget has a token)
    t=2·delay  still nothing     -> hedge 2 ...            (up to max_hedges)
    an attempt fails             -> the next hedge starts at once
    an attempt succeeds          -> its result is returned; the others are losers
    every attempt failed         -> the last failure is raised as it was (never an ExceptionGroup)

Async (asyncio or trio): the attempts are tasks in one anyio task group; the winner cancels the
losers, and the call returns once they have unwound. A loser that returns a result anyway (it
finished in the same instant, or shielded itself) has the result closed (``aclose()``/``close()``).
Cancelling the caller cancels every attempt and the cancellation propagates.

Sync: the attempts, the first included, run in a thread pool owned by the policy, so the caller
returns as soon as any attempt wins. Threads cannot be cancelled: losers run to the end and their
results are closed when they arrive. The pool is bounded (``max_workers`` threads) and never queues:
when no thread is free a hedge is skipped, and a call that finds the pool full runs as a plain call in
the caller's thread, unhedged. A loser that never returns keeps its thread (and, like any pool
thread, delays interpreter exit). The ambient deadline and every other context variable follow each
attempt into its thread. The delay is waited on a condition with a timeout; with a clock other than
the system clock (a `FakeClock` in tests) it is waited out by ``clock.sleep`` in a short-lived daemon
thread instead, so tests stay deterministic.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio

from resilient._clock import Clock, SystemClock
from resilient._policy import Policy
from resilient.events import HedgeLaunched, Hook, emit
from resilient.policies._common import check_count, check_positive, resolve_clock
from resilient.policies._common import discard as _discard
from resilient.policies._common import discard_async as _discard_async
from resilient.policies.budget import RetryBudget
from resilient.policies.retry import add_note

__all__ = ["Hedge"]

T = TypeVar("T")

_log = logging.getLogger("resilient")


class _AsyncRace(Generic[T]):
    """Where one async call's attempts stand (touched only from the event loop's thread)."""

    __slots__ = ("claimed", "failures", "fatal", "pending", "value", "waiting", "won")

    def __init__(self) -> None:
        self.won = False
        self.claimed = False  # the winner's value was returned to the caller
        self.value: T | None = None
        self.failures: list[Exception] = []
        self.pending = 0  # failures not yet answered with a hedge
        self.fatal: BaseException | None = None
        self.waiting: anyio.CancelScope | None = None  # the launcher's wait for the next hedge

    def decided(self) -> bool:
        """An attempt won, or one raised what ends the call (KeyboardInterrupt)."""
        return self.won or self.fatal is not None


class _SyncRace(Generic[T]):
    """Where one sync call's attempts stand; shared by the caller and the pool threads."""

    __slots__ = (
        "claimed",
        "closed",
        "cond",
        "failures",
        "fatal",
        "pending",
        "running",
        "timer_fired",
        "timer_gen",
        "value",
        "won",
    )

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.running = 0
        self.won = False
        self.claimed = False
        self.closed = False  # the caller has left: whatever arrives now is discarded
        self.value: T | None = None
        self.failures: list[Exception] = []
        self.pending = 0
        self.fatal: BaseException | None = None
        self.timer_gen = 0
        self.timer_fired = False

    def failed(self, exc: Exception) -> None:
        with self.cond:
            self.running -= 1
            self.failures.append(exc)
            self.pending += 1
            self.cond.notify_all()

    def crashed(self, exc: BaseException) -> None:
        with self.cond:
            self.running -= 1
            if self.fatal is None:
                self.fatal = exc
            self.cond.notify_all()

    def offer(self, value: T) -> bool:
        """Propose ``value`` as the winner; False when the race is already over (discard it)."""
        with self.cond:
            self.running -= 1
            self.cond.notify_all()
            if self.won or self.closed or self.fatal is not None:
                return False
            self.won = True
            self.value = value
            return True


class _Runtime:
    __slots__ = ("lock", "pool", "slots")

    def __init__(self, max_workers: int) -> None:
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        # One permit per pool thread: attempts are submitted only with a permit, so the pool never
        # queues work behind a slow loser.
        self.slots = threading.BoundedSemaphore(max_workers)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Hedge(Policy):
    """Start another attempt when a call is slow; the first success wins. Idempotent work only.

    After ``delay`` seconds without an answer a hedge (a concurrent copy of the call) starts, then
    another every ``delay`` seconds, up to ``max_hedges`` extra attempts; an attempt that fails starts
    the next hedge at once. The first attempt to succeed wins; the others are cancelled (async) or
    left to finish in their threads (sync), and any result they return is closed. If every attempt
    fails, the **last** failure is raised as it was, with a note counting the attempts.

    ``budget`` caps the extra load: every call deposits into it and every hedge must withdraw a
    token; without one, no hedge starts and the call simply goes on. Sync calls run their attempts in
    a pool of at most ``max_workers`` threads, created on first use and owned by this policy (see
    `shutdown`); when it is full, hedges are skipped and a new call runs unhedged in its own thread.

    Example::

        @rs.Hedge(delay=0.05, max_hedges=1, budget=rs.RetryBudget())
        async def get_price(sku: str) -> Price: ...   # a read: safe to send twice

        hedge = rs.Hedge(delay=0.02)
        profile = hedge.call(fetch_profile, user_id)   # sync: attempts run in hedge's threads
    """

    delay: float = 0.05
    max_hedges: int = 1
    budget: RetryBudget | None = None
    name: str = "hedge"
    clock: Clock | None = None
    hooks: Sequence[Hook] = ()
    max_workers: int = 16
    _clock: Clock = field(init=False, repr=False)
    _real_time: bool = field(init=False, repr=False)
    _rt: _Runtime = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_positive("delay", self.delay, allow_zero=True)
        check_count("max_hedges", self.max_hedges)
        check_count("max_workers", self.max_workers, minimum=2)
        if self.budget is not None and not isinstance(self.budget, RetryBudget):
            raise ValueError(f"budget must be a RetryBudget, got {self.budget!r}")
        clock = resolve_clock(self.clock)
        object.__setattr__(self, "_clock", clock)
        object.__setattr__(self, "_real_time", isinstance(clock, SystemClock))
        object.__setattr__(self, "_rt", _Runtime(self.max_workers))
        object.__setattr__(self, "hooks", tuple(self.hooks))

    def describe(self) -> str:
        return f"Hedge(delay={self.delay}, max_hedges={self.max_hedges})"

    def shutdown(self, wait: bool = True) -> None:
        """Stop this policy's sync thread pool (a later sync call starts a new one).

        Example::

            hedge.shutdown()  # at application exit, or at the end of a test
        """
        rt = self._rt
        with rt.lock:
            pool, rt.pool = rt.pool, None
        if pool is not None:
            pool.shutdown(wait=wait)

    # -- async -------------------------------------------------------------------------------------

    async def _execute_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        budget = self.budget
        if budget is not None:
            budget.deposit()
        clock = self._clock
        started = clock.monotonic()
        race: _AsyncRace[T] = _AsyncRace()
        try:
            async with anyio.create_task_group() as tg:
                everyone = tg.cancel_scope
                tg.start_soon(self._attempt_async, thunk, race, everyone)
                hedge = 0
                while hedge < self.max_hedges:
                    if not race.pending:
                        with anyio.CancelScope() as waiting:
                            race.waiting = waiting  # a failing attempt cancels it: hedge at once
                            await clock.sleep_async(self.delay)
                        race.waiting = None
                    if race.decided():
                        break
                    if race.pending:
                        race.pending -= 1
                    if budget is not None and not await budget.try_withdraw_async():
                        break
                    if race.decided():
                        break  # (while a store was asked for the token)
                    hedge += 1
                    emit(self.hooks, HedgeLaunched(self.name, hedge, clock.monotonic() - started))
                    tg.start_soon(self._attempt_async, thunk, race, everyone)
            if race.fatal is None and race.won:
                race.claimed = True
                return race.value  # type: ignore[return-value]
        finally:
            if race.won and not race.claimed:
                # The caller leaves (cancelled, or another attempt raised KeyboardInterrupt) just
                # as an attempt won: nobody takes its result.
                with anyio.CancelScope(shield=True):
                    await _drop_async(race.value)
        if race.fatal is not None:
            raise race.fatal
        raise self._all_failed(race.failures)

    async def _attempt_async(
        self, thunk: Callable[[], Awaitable[T]], race: _AsyncRace[T], everyone: anyio.CancelScope
    ) -> None:
        # Outcomes go into ``race``, never out of the task: an exception escaping a task group
        # would reach the caller wrapped in an ExceptionGroup.
        try:
            value = await thunk()
        except Exception as exc:
            race.failures.append(exc)
            race.pending += 1
            if race.waiting is not None:
                race.waiting.cancel()
            return
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            if race.fatal is None:  # KeyboardInterrupt, SystemExit: re-raised by the caller
                race.fatal = exc
            everyone.cancel()
            return
        if race.won or race.fatal is not None:
            with anyio.CancelScope(shield=True):
                await _drop_async(value)
            return
        race.won = True
        race.value = value
        everyone.cancel()

    # -- sync --------------------------------------------------------------------------------------

    def _execute(self, thunk: Callable[[], T]) -> T:
        budget = self.budget
        if budget is not None:
            budget.deposit()
        slots = self._rt.slots
        if not slots.acquire(blocking=False):
            # Every pool thread is busy: run plainly here rather than queue behind slow losers.
            return thunk()
        clock = self._clock
        started = clock.monotonic()
        race: _SyncRace[T] = _SyncRace()
        try:
            self._launch(thunk, race)
            hedge = 0
            hedging = True
            while self._wait(race, hedging and hedge < self.max_hedges):
                if not slots.acquire(blocking=False):
                    hedging = False
                    continue
                try:  # the slot is ours until `_launch` hands it to the attempt
                    funded = budget is None or budget.try_withdraw()
                    if funded:
                        hedge += 1
                        emit(
                            self.hooks, HedgeLaunched(self.name, hedge, clock.monotonic() - started)
                        )
                except BaseException:  # a hook's BaseException, a KeyboardInterrupt
                    slots.release()
                    raise
                if not funded:
                    slots.release()
                    hedging = False
                    continue
                self._launch(thunk, race)
            with race.cond:
                if race.fatal is not None:
                    raise race.fatal
                if race.won:
                    race.claimed = True
                    return race.value  # type: ignore[return-value]
                failures = list(race.failures)
            raise self._all_failed(failures)
        finally:
            with race.cond:
                race.closed = True
                orphan = race.won and not race.claimed
            if orphan:  # the caller left (e.g. KeyboardInterrupt) just as an attempt won
                _drop(race.value)

    def _pool(self) -> ThreadPoolExecutor:
        rt = self._rt
        pool = rt.pool
        if pool is None:
            with rt.lock:
                pool = rt.pool
                if pool is None:
                    pool = ThreadPoolExecutor(
                        max_workers=self.max_workers,
                        thread_name_prefix=f"resilient-hedge-{self.name}",
                    )
                    rt.pool = pool
        return pool

    def _launch(self, thunk: Callable[[], T], race: _SyncRace[T]) -> None:
        """Start one attempt in the pool; the caller holds a slot for it."""
        with race.cond:
            race.running += 1
        try:
            self._pool().submit(self._attempt, contextvars.copy_context(), thunk, race)
        except BaseException:
            with race.cond:
                race.running -= 1
            self._rt.slots.release()
            raise

    def _attempt(
        self, ctx: contextvars.Context, thunk: Callable[[], T], race: _SyncRace[T]
    ) -> None:
        try:
            try:
                value = ctx.run(thunk)
            except Exception as exc:
                race.failed(exc)
                return
            except BaseException as exc:  # SystemExit and the like: re-raised by the caller
                race.crashed(exc)
                return
            if not race.offer(value):
                _drop(value)
        finally:
            self._rt.slots.release()

    def _wait(self, race: _SyncRace[T], hedging: bool) -> bool:
        """Block until the call is decided (False) or the next hedge is due (True)."""
        cond = race.cond
        delay = self.delay
        with cond:
            if self._real_time:
                due = time.monotonic() + delay
            elif hedging and delay > 0 and not (race.won or race.fatal or race.pending):
                # Another clock (a FakeClock in tests) can only be waited on by sleeping in it.
                race.timer_gen += 1
                race.timer_fired = False
                threading.Thread(
                    target=self._timer,
                    args=(race, race.timer_gen),
                    name=f"resilient-hedge-timer-{self.name}",
                    daemon=True,
                ).start()
            while True:
                if race.won or race.fatal is not None:
                    return False
                if not hedging:
                    if race.running == 0:
                        return False
                    cond.wait()
                    continue
                if race.pending:
                    race.pending -= 1
                    return True
                if delay <= 0:
                    return True
                if self._real_time:
                    left = due - time.monotonic()
                    if left <= 0:
                        return True
                    cond.wait(left)
                elif race.timer_fired:
                    return True
                else:
                    cond.wait()

    def _timer(self, race: _SyncRace[Any], gen: int) -> None:
        self._clock.sleep(self.delay)
        with race.cond:
            if race.timer_gen == gen and not race.closed:
                race.timer_fired = True
                race.cond.notify_all()

    def _all_failed(self, failures: list[Exception]) -> Exception:
        exc = failures[-1]
        if len(failures) > 1:
            add_note(exc, f"resilient: {self.name}: all {len(failures)} attempts failed")
        return exc


def _drop(value: object) -> None:
    """Close a loser's result; a failing close() is logged, never raised into a winning call."""
    try:
        _discard(value)
    except Exception:
        _log.exception("resilient: closing a losing hedge's result failed")


async def _drop_async(value: object) -> None:
    try:
        await _discard_async(value)
    except Exception:
        _log.exception("resilient: closing a losing hedge's result failed")
