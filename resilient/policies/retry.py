"""Retry with backoff, deadlines and budgets; tenacity's strategies as the vocabulary.

The first attempt is a plain call: nothing is built and tenacity is not consulted unless it fails.
After a failure one pure function, `Retry._decide`, says "sleep d, then attempt again" or "give up,
because ..."; the sync and async drivers only carry that out.
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from resilient._clock import Clock
from resilient._deadline import _DEADLINE, deadline_scope
from resilient._policy import Policy
from resilient.events import GiveUpReason, Hook, RetryGaveUp, RetryScheduled, emit
from resilient.policies._common import (
    ExceptionMatcher,
    check_count,
    check_positive,
    compile_matcher,
    discard_shielded,
    resolve_clock,
)
from resilient.policies._common import discard as _discard
from resilient.policies._common import discard_async as _discard_async
from resilient.policies.budget import RetryBudget

__all__ = ["Retry", "add_note", "full_jitter"]

T = TypeVar("T")

#: What ``wait=`` accepts: seconds, a tenacity ``wait_*`` strategy, or any callable taking
#: tenacity's ``RetryCallState`` (as tenacity itself accepts).
WaitSpec = float | wait_base | Callable[[tenacity.RetryCallState], float] | None
RetryOn = ExceptionMatcher | tenacity.retry_base

_NOT_RETRYABLE = "not_retryable"


def full_jitter(attempt: int, rand: float, base: float = 0.1, cap: float = 10.0) -> float:
    """AWS's "full jitter": uniform in [0, min(cap, base × 2^(attempt-1))).

    Example::

        full_jitter(3, random.random())  # somewhere in [0, 0.4)
    """
    return rand * min(cap, base * 2.0 ** min(attempt - 1, 64))


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``, also on Python 3.10."""
    notes = getattr(exc, "__notes__", None)
    if notes is None:
        try:
            exc.__notes__ = [note]  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - exceptions with __slots__
            pass
    elif isinstance(notes, list):
        notes.append(note)


class _CallState:
    """Where one call's retries stand."""

    __slots__ = ("attempt", "deadline_at", "last_duration", "started", "tenacity_state")

    def __init__(self, started: float, last_duration: float, deadline_at: float | None) -> None:
        self.attempt = 1
        self.started = started
        self.last_duration = last_duration
        self.deadline_at = deadline_at
        self.tenacity_state: tenacity.RetryCallState | None = None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Retry(Policy):
    """Call again when a call fails, with backoff, within a deadline and a budget.

    ``on`` says what is worth retrying (required: there is no safe default): an exception class, a
    tuple of them, a predicate ``exc -> bool``, or a tenacity ``retry_*`` strategy (which may also
    look at results). ``result`` retries on returned values (``value -> True``). ``attempts`` counts
    every call, the first included. ``wait`` is seconds, a tenacity ``wait_*`` strategy, or ``None``
    for full-jitter exponential backoff from 100 ms to 10 s. ``stop`` adds a tenacity ``stop_*``.
    ``deadline`` (seconds from the first attempt) is never crossed: no sleep, and no attempt that
    could not finish before it (judged by the last attempt's duration) is started. A `RetryBudget`
    caps retries across calls.

    When retrying stops, the last exception is raised as it was (its ``__notes__`` say how many
    attempts were made and why retrying stopped), or the last result is returned. Cancellation is
    never retried.

    Example::

        @rs.Retry(on=(ConnectionError, TimeoutError), attempts=4, deadline=2.0)
        def fetch(url: str) -> bytes: ...

        from tenacity import wait_exponential, retry_if_exception_type
        rs.Retry(on=retry_if_exception_type(OSError), wait=wait_exponential(max=5))
    """

    on: RetryOn
    attempts: int = 3
    wait: WaitSpec = None
    result: Callable[[Any], bool] | None = None
    deadline: float | None = None
    budget: RetryBudget | None = None
    stop: stop_base | Callable[[tenacity.RetryCallState], bool] | None = None
    clock: Clock | None = None
    random: Callable[[], float] | None = None
    name: str = "retry"
    hooks: Sequence[Hook] = ()
    _clock: Clock = field(init=False, repr=False)
    _match: Callable[[BaseException], bool] | None = field(init=False, repr=False)
    _rand: Callable[[], float] = field(init=False, repr=False)
    _check_results: bool = field(init=False, repr=False)
    _tenacity_results: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_count("attempts", self.attempts)
        if self.deadline is not None:
            check_positive("deadline", self.deadline)
        wait = self.wait
        if isinstance(wait, (int, float)) and not isinstance(wait, bool):
            check_positive("wait", wait, allow_zero=True)
        elif wait is not None and not callable(wait):
            raise ValueError(
                f"wait must be seconds, a tenacity wait strategy or None, got {wait!r}"
            )
        if self.result is not None and not callable(self.result):
            raise ValueError(f"result must be a predicate, got {self.result!r}")
        if self.stop is not None and not callable(self.stop):
            raise ValueError(f"stop must be a tenacity stop strategy, got {self.stop!r}")
        if self.random is not None and not callable(self.random):
            raise ValueError(f"random must be a function returning [0, 1), got {self.random!r}")
        if self.budget is not None and not isinstance(self.budget, RetryBudget):
            raise ValueError(f"budget must be a RetryBudget, got {self.budget!r}")
        match = None if isinstance(self.on, tenacity.retry_base) else compile_matcher(self.on, "on")
        object.__setattr__(self, "_match", match)
        tenacity_results = match is None and _looks_at_results(self.on)
        object.__setattr__(self, "_tenacity_results", tenacity_results)
        object.__setattr__(self, "_check_results", tenacity_results or self.result is not None)
        object.__setattr__(self, "_clock", resolve_clock(self.clock))
        object.__setattr__(self, "_rand", self.random or _random.random)
        object.__setattr__(self, "hooks", tuple(self.hooks))

    def describe(self) -> str:
        return f"Retry(on={self.on!r}, attempts={self.attempts}, deadline={self.deadline})"

    # -- the decision ------------------------------------------------------------------------------

    def _tenacity_state(
        self, st: _CallState, exc: BaseException | None, value: Any, now: float
    ) -> tenacity.RetryCallState:
        ts = st.tenacity_state
        if ts is None:
            ts = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
            ts.start_time = st.started
            st.tenacity_state = ts
        ts.attempt_number = st.attempt
        ts.outcome = tenacity.Future.construct(st.attempt, exc if exc else value, exc is not None)
        ts.outcome_timestamp = now
        return ts

    def _decide(
        self, st: _CallState, exc: BaseException | None, value: Any, withdraw: bool = True
    ) -> float | GiveUpReason | str:
        """After attempt ``st.attempt`` failed: seconds to wait before the next, or why not.
        ``withdraw=False`` leaves the budget's token to the caller (`_decide_async`)."""
        now = self._clock.monotonic()
        on = self.on
        if exc is None:
            retryable = self.result is not None and bool(self.result(value))
            if not retryable and self._tenacity_results:
                assert isinstance(on, tenacity.retry_base)
                retryable = bool(on(self._tenacity_state(st, exc, value, now)))
        elif self._match is None:
            assert isinstance(on, tenacity.retry_base)
            retryable = bool(on(self._tenacity_state(st, exc, value, now)))
        else:
            retryable = self._match(exc)
        if not retryable:
            return _NOT_RETRYABLE
        if st.attempt >= self.attempts:
            return "attempts"
        wait = self.wait
        if wait is None:
            delay = full_jitter(st.attempt, self._rand())
        elif isinstance(wait, (int, float)):
            delay = float(wait)
        else:
            delay = float(wait(self._tenacity_state(st, exc, value, now)))
        if not math.isfinite(delay) or delay < 0:
            delay = 0.0
        if self.stop is not None:
            # As tenacity does: the wait first, so that a stop strategy sees the coming sleep
            # (``stop_before_delay`` does not start one that would cross its limit).
            ts = self._tenacity_state(st, exc, value, now)
            ts.upcoming_sleep = delay
            if self.stop(ts):
                return "stop"
        deadline_at = st.deadline_at
        ambient = _DEADLINE.get()
        if ambient is not None:
            clock, at = ambient
            ambient_at = now + (at - clock.monotonic())
            deadline_at = ambient_at if deadline_at is None else min(deadline_at, ambient_at)
        if deadline_at is not None and now + delay + st.last_duration > deadline_at:
            return "deadline"
        if withdraw and self.budget is not None and not self.budget.try_withdraw():
            return "budget"
        return delay

    async def _decide_async(
        self, st: _CallState, exc: BaseException | None, value: Any
    ) -> float | GiveUpReason | str:
        """`_decide` for async drivers: a store's round trip for the budget's token does not
        block the event loop."""
        decision = self._decide(st, exc, value, withdraw=False)
        budget = self.budget
        if (
            budget is not None
            and not isinstance(decision, str)
            and not await budget.try_withdraw_async()
        ):
            return "budget"
        return decision

    def _give_up(self, st: _CallState, reason: str, exc: BaseException | None) -> None:
        if reason == _NOT_RETRYABLE:
            return
        plural = "attempt" if st.attempt == 1 else "attempts"
        why = {
            "attempts": "attempts exhausted",
            "deadline": "the next attempt could not finish before the deadline",
            "budget": "retry budget exhausted",
            "stop": "the stop strategy said so",
        }[reason]
        if exc is not None:
            add_note(exc, f"resilient: {self.name} gave up after {st.attempt} {plural}: {why}")
        emit(self.hooks, RetryGaveUp(self.name, st.attempt, reason, exc))  # type: ignore[arg-type]

    def _begin(self, started: float) -> _CallState:
        now = self._clock.monotonic()
        deadline_at = None if self.deadline is None else started + self.deadline
        return _CallState(started, now - started, deadline_at)

    # -- drivers ---------------------------------------------------------------------------------

    def _execute(self, thunk: Callable[[], T]) -> T:
        if self.budget is not None:
            self.budget.deposit()
        if self.deadline is not None:
            with deadline_scope(self._clock, self.deadline):
                return self._run(thunk)
        return self._run(thunk)

    def _run(self, thunk: Callable[[], T]) -> T:
        clock = self._clock
        started = clock.monotonic()
        try:
            value = thunk()
        except Exception as exc:
            return self._again(thunk, self._begin(started), exc, None)
        if self._check_results and self._retry_wanted(value):
            return self._again(thunk, self._begin(started), None, value)
        return value

    def _again(
        self, thunk: Callable[[], T], st: _CallState, exc: Exception | None, value: Any
    ) -> T:
        clock = self._clock
        while True:
            try:
                decision = self._decide(st, exc, value)
            except BaseException:
                if exc is None:  # a predicate raised: nobody takes the result
                    _discard(value)
                raise
            if isinstance(decision, str):
                self._give_up(st, decision, exc)
                if exc is not None:
                    raise exc
                return value  # type: ignore[no-any-return]
            emit(self.hooks, RetryScheduled(self.name, st.attempt, decision, exc, value))
            if exc is None:
                _discard(value)
            if decision > 0:
                clock.sleep(decision)
            st.attempt += 1
            began = clock.monotonic()
            try:
                got = thunk()
            except Exception as e:
                exc, value = e, None
            else:
                if not (self._check_results and self._retry_wanted(got)):
                    return got
                exc, value = None, got
            st.last_duration = clock.monotonic() - began

    def _wants_retry(self, value: Any) -> bool:
        """A cheap first look at a result; `_decide` has the final word."""
        return self._tenacity_results or (self.result is not None and bool(self.result(value)))

    def _retry_wanted(self, value: Any) -> bool:
        """`_wants_retry`; if the predicate raises, ``value`` is closed (nobody will take it)."""
        try:
            return self._wants_retry(value)
        except BaseException:
            _discard(value)
            raise

    async def _retry_wanted_async(self, value: Any) -> bool:
        """`_retry_wanted` for async results (``aclose``)."""
        try:
            return self._wants_retry(value)
        except BaseException:
            await discard_shielded(value)
            raise

    async def _execute_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        if self.budget is not None:
            self.budget.deposit()
        if self.deadline is not None:
            with deadline_scope(self._clock, self.deadline):
                return await self._run_async(thunk)
        return await self._run_async(thunk)

    async def _run_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        clock = self._clock
        started = clock.monotonic()
        try:
            value = await thunk()
        except Exception as exc:
            return await self._again_async(thunk, self._begin(started), exc, None)
        if self._check_results and await self._retry_wanted_async(value):
            return await self._again_async(thunk, self._begin(started), None, value)
        return value

    async def _again_async(
        self, thunk: Callable[[], Awaitable[T]], st: _CallState, exc: Exception | None, value: Any
    ) -> T:
        clock = self._clock
        while True:
            try:
                decision = await self._decide_async(st, exc, value)
            except BaseException:
                if exc is None:  # a predicate raised, or cancelled while a store was asked:
                    await discard_shielded(value)  # nobody takes the result
                raise
            if isinstance(decision, str):
                self._give_up(st, decision, exc)
                if exc is not None:
                    raise exc
                return value  # type: ignore[no-any-return]
            emit(self.hooks, RetryScheduled(self.name, st.attempt, decision, exc, value))
            if exc is None:
                await _discard_async(value)
            await clock.sleep_async(decision)
            st.attempt += 1
            began = clock.monotonic()
            try:
                got = await thunk()
            except Exception as e:
                exc, value = e, None
            else:
                if not (self._check_results and await self._retry_wanted_async(got)):
                    return got
                exc, value = None, got
            st.last_duration = clock.monotonic() - began


_EXCEPTION_ONLY = tuple(
    getattr(tenacity, name)
    for name in (
        "retry_if_exception",
        "retry_if_exception_type",
        "retry_if_not_exception_type",
        "retry_unless_exception_type",
        "retry_if_exception_cause_type",
        "retry_if_exception_message",
        "retry_if_not_exception_message",
        "retry_never",
    )
    if isinstance(getattr(tenacity, name, None), type)
)


def _looks_at_results(strategy: object) -> bool:
    """Could this tenacity strategy want to retry a returned value? (Unknown kinds: assume so.)"""
    if isinstance(strategy, (tenacity.retry_any, tenacity.retry_all)):
        return any(_looks_at_results(s) for s in strategy.retries)
    return not isinstance(strategy, _EXCEPTION_ONLY)
