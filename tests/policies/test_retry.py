from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import tenacity

import resilient as rs
from resilient.events import Event, RetryGaveUp, RetryScheduled
from resilient.policies.retry import full_jitter
from resilient.testing import FakeClock


def notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", []))


class Flaky:
    """Fails ``failures`` times with ``exc``, then returns ``value``; advances the clock per call."""

    def __init__(
        self,
        failures: int,
        exc: Callable[[], BaseException] = lambda: OSError("down"),
        *,
        value: object = "ok",
        clock: FakeClock | None = None,
        takes: float = 0.0,
    ) -> None:
        self.failures = failures
        self.exc = exc
        self.value = value
        self.calls = 0
        self.clock = clock
        self.takes = takes

    def __call__(self) -> object:
        self.calls += 1
        if self.clock is not None and self.takes:
            self.clock.advance(self.takes)
        if self.calls <= self.failures:
            raise self.exc()
        return self.value

    async def run_async(self) -> object:
        await anyio.lowlevel.checkpoint()
        return self()


def test_first_success_is_returned_without_retry() -> None:
    clock = FakeClock()
    fn = Flaky(0)
    assert rs.Retry(on=OSError, clock=clock).call(fn) == "ok"
    assert fn.calls == 1
    assert clock.sleeps == []


def test_retries_then_succeeds_with_waits_from_the_clock() -> None:
    clock = FakeClock()
    fn = Flaky(2)
    assert rs.Retry(on=OSError, attempts=3, wait=0.25, clock=clock).call(fn) == "ok"
    assert fn.calls == 3
    assert clock.sleeps == [0.25, 0.25]


def test_exhausted_retries_raise_the_original_exception_with_a_note() -> None:
    clock = FakeClock()
    errors: list[OSError] = []

    def fail() -> None:
        errors.append(OSError(f"down {len(errors)}"))
        raise errors[-1]

    with pytest.raises(OSError) as info:
        rs.Retry(on=OSError, attempts=4, wait=0, clock=clock).call(fail)
    assert info.value is errors[-1]
    assert len(errors) == 4
    assert notes(info.value) == ["resilient: retry gave up after 4 attempts: attempts exhausted"]


def test_exceptions_not_matching_on_are_not_retried() -> None:
    fn = Flaky(5, lambda: ValueError("bad input"))
    with pytest.raises(ValueError, match="bad input") as info:
        rs.Retry(on=OSError, clock=FakeClock()).call(fn)
    assert fn.calls == 1
    assert notes(info.value) == []


@pytest.mark.parametrize(
    "on",
    [
        OSError,
        (KeyError, OSError),
        lambda exc: isinstance(exc, OSError),
        tenacity.retry_if_exception_type(OSError),
    ],
    ids=["class", "tuple", "predicate", "tenacity"],
)
def test_on_accepts_classes_tuples_predicates_and_tenacity(on: Any) -> None:
    fn = Flaky(2)
    assert rs.Retry(on=on, wait=0, clock=FakeClock()).call(fn) == "ok"
    assert fn.calls == 3


def test_on_is_required() -> None:
    with pytest.raises(TypeError, match="on"):
        rs.Retry()  # type: ignore[call-arg]


def test_keyboard_interrupt_is_never_retried_even_if_on_says_so() -> None:
    fn = Flaky(3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        rs.Retry(on=BaseException, wait=0, clock=FakeClock()).call(fn)
    assert fn.calls == 1


def test_retry_on_results_returns_the_last_result_when_exhausted() -> None:
    values = iter([503, 503, 503, 200])
    retry = rs.Retry(on=OSError, result=lambda status: status == 503, wait=0, clock=FakeClock())
    assert retry.call(lambda: next(values)) == 503
    values = iter([503, 200])
    assert retry.call(lambda: next(values)) == 200


def test_tenacity_result_strategy_is_honoured() -> None:
    values = iter([None, None, 7])
    retry = rs.Retry(on=tenacity.retry_if_result(lambda v: v is None), wait=0, clock=FakeClock())
    assert retry.call(lambda: next(values)) == 7


def test_discarded_results_are_closed() -> None:
    class Resource:
        def __init__(self, bad: bool) -> None:
            self.bad = bad
            self.closed = False

        def close(self) -> None:
            self.closed = True

    made = [Resource(True), Resource(True), Resource(False)]
    results = iter(made)
    retry = rs.Retry(on=OSError, result=lambda r: r.bad, wait=0, clock=FakeClock())
    assert retry.call(lambda: next(results)) is made[2]
    assert [r.closed for r in made] == [True, True, False]


def test_default_wait_is_full_jitter_exponential() -> None:
    clock = FakeClock()
    fn = Flaky(4)
    rs.Retry(on=OSError, attempts=5, clock=clock, random=lambda: 1.0).call(fn)
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8])
    clock = FakeClock()
    rs.Retry(on=OSError, attempts=3, clock=clock, random=lambda: 0.5).call(Flaky(2))
    assert clock.sleeps == pytest.approx([0.05, 0.1])


def test_full_jitter_is_capped_at_ten_seconds() -> None:
    assert full_jitter(30, 1.0) == 10.0
    assert full_jitter(1000, 0.5) == 5.0


def test_tenacity_wait_and_stop_strategies() -> None:
    clock = FakeClock()
    fn = Flaky(10)
    retry = rs.Retry(
        on=OSError,
        attempts=10,
        wait=tenacity.wait_exponential(multiplier=1, max=4) + tenacity.wait_fixed(1),
        stop=tenacity.stop_after_delay(6),
        clock=clock,
    )
    with pytest.raises(OSError) as info:
        retry.call(fn)
    # waits 1+1, 2+1, 4+1; stop_after_delay(6) sees 5 s after the third attempt (go on), 10 s
    # after the fourth (stop)
    assert clock.sleeps == [2.0, 3.0, 5.0]
    assert fn.calls == 4
    assert "the stop strategy said so" in notes(info.value)[0]


def test_a_stop_strategy_sees_the_coming_wait() -> None:
    # tenacity's stop_before_delay does not start a sleep that would cross its limit: it reads
    # the coming sleep, which must be known before the stop strategy is asked.
    clock = FakeClock()
    fn = Flaky(10, clock=clock, takes=0.5)
    retry = rs.Retry(
        on=OSError, attempts=10, wait=0.8, stop=tenacity.stop_before_delay(1.0), clock=clock
    )
    with pytest.raises(OSError):
        retry.call(fn)
    assert fn.calls == 1  # 0.5 s in, a 0.8 s wait would cross 1.0 s
    assert clock.sleeps == []


def test_deadline_never_slept_past() -> None:
    # Retry(deadline=0.5) with a 0.4 s wait: the second wait would end at 0.8 s, so it gives up
    # at 0.4 s instead of starting an attempt that cannot finish in time.
    clock = FakeClock()
    fn = Flaky(10)
    with pytest.raises(OSError) as info:
        rs.Retry(on=OSError, attempts=10, wait=0.4, deadline=0.5, clock=clock).call(fn)
    assert clock.monotonic() <= 0.5
    assert clock.sleeps == [0.4]
    assert fn.calls == 2
    assert "could not finish before the deadline" in notes(info.value)[0]


def test_deadline_accounts_for_attempt_duration() -> None:
    clock = FakeClock()
    fn = Flaky(10, clock=clock, takes=0.2)
    with pytest.raises(OSError):
        rs.Retry(on=OSError, attempts=10, wait=0.1, deadline=1.0, clock=clock).call(fn)
    # attempts end at 0.2, 0.5, 0.8; a fourth would start at 0.9 and end at 1.1 > 1.0
    assert fn.calls == 3
    assert clock.monotonic() == pytest.approx(0.8)


def test_an_enclosing_deadline_bounds_an_inner_retry() -> None:
    clock = FakeClock()
    fn = Flaky(10)
    outer = rs.Retry(on=ValueError, attempts=1, deadline=1.0, clock=clock)
    inner = rs.Retry(on=OSError, attempts=100, wait=0.3, clock=clock)
    with pytest.raises(OSError):
        outer.call(inner.call, fn)
    assert clock.monotonic() <= 1.0
    assert fn.calls == 4


def test_budget_caps_retries() -> None:
    clock = FakeClock()
    budget = rs.RetryBudget(ratio=0.5, min_per_second=0.1, ttl=10.0, clock=clock)  # reserve 1
    retry = rs.Retry(on=OSError, attempts=3, wait=0, budget=budget, clock=clock)
    fn = Flaky(100)
    with pytest.raises(OSError) as info:
        retry.call(fn)
    # one call deposited 0.5 tokens; reserve 1 + 0.5 allows one retry, not two
    assert fn.calls == 2
    assert "retry budget exhausted" in notes(info.value)[0]


def test_events_are_emitted_for_retries_and_give_ups() -> None:
    seen: list[Event] = []
    retry = rs.Retry(on=OSError, attempts=2, wait=0.5, hooks=[seen.append], clock=FakeClock())
    with pytest.raises(OSError):
        retry.call(Flaky(5))
    assert [type(e) for e in seen] == [RetryScheduled, RetryGaveUp]
    scheduled, gave_up = seen
    assert isinstance(scheduled, RetryScheduled)
    assert scheduled.attempt == 1 and scheduled.wait == 0.5
    assert isinstance(gave_up, RetryGaveUp)
    assert gave_up.attempts == 2 and gave_up.reason == "attempts"


def test_no_events_on_success() -> None:
    seen: list[Event] = []
    rs.Retry(on=OSError, hooks=[seen.append]).call(lambda: 1)
    assert seen == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"attempts": 0}, "attempts"),
        ({"attempts": 2.5}, "attempts"),
        ({"wait": -1.0}, "wait"),
        ({"wait": "soon"}, "wait"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": float("inf")}, "deadline"),
        ({"on": 42}, "on"),
        ({"on": ()}, "on"),
        ({"budget": 3}, "budget"),
        ({"result": 1}, "result"),
        ({"random": 0.5}, "random"),
        ({"on": int}, "on"),
    ],
)
def test_bad_configuration_names_the_field_and_value(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"on": OSError, **kwargs}
    with pytest.raises(ValueError, match=field) as info:
        rs.Retry(**args)
    assert repr(kwargs[field]) in str(info.value)


def test_decorator_keeps_name_and_signature() -> None:
    @rs.Retry(on=OSError)
    def add(a: int, b: int = 2) -> int:
        """Adds."""
        return a + b

    assert add(1) == 3
    assert add.__name__ == "add" and add.__doc__ == "Adds."


# -- async -----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_retries_then_succeeds() -> None:
    clock = FakeClock()
    fn = Flaky(2)
    retry = rs.Retry(on=OSError, wait=0.25, clock=clock)
    assert await retry.call_async(fn.run_async) == "ok"
    assert fn.calls == 3
    assert clock.sleeps == [0.25, 0.25]


@pytest.mark.anyio
async def test_async_decorator_exhausts_and_raises_original() -> None:
    clock = FakeClock()
    fn = Flaky(10)

    @rs.Retry(on=OSError, attempts=3, wait=0.1, clock=clock)
    async def call() -> object:
        return await fn.run_async()

    with pytest.raises(OSError, match="down") as info:
        await call()
    assert fn.calls == 3
    assert "gave up after 3 attempts" in notes(info.value)[0]


@pytest.mark.anyio
async def test_async_deadline_gives_up_in_time() -> None:
    clock = FakeClock()
    fn = Flaky(10)
    retry = rs.Retry(on=OSError, attempts=10, wait=0.4, deadline=0.5, clock=clock)
    with pytest.raises(OSError):
        await retry.call_async(fn.run_async)
    assert clock.monotonic() <= 0.5
    assert fn.calls == 2


@pytest.mark.anyio
async def test_cancellation_is_never_retried() -> None:
    # A predicate that says "retry everything" must still not retry cancellation.
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        await anyio.sleep_forever()

    retry = rs.Retry(on=lambda exc: True, attempts=5, wait=0)
    with anyio.move_on_after(0.05) as scope:
        await retry.call_async(slow)
    assert scope.cancelled_caught
    assert calls == 1


@pytest.mark.anyio
async def test_cancellation_is_not_retried_with_a_tenacity_negated_strategy() -> None:
    # tenacity and stamina retried CancelledError with retry_if_not_exception_type (PEERS.md).
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        await anyio.sleep_forever()

    retry = rs.Retry(on=tenacity.retry_if_not_exception_type(ValueError), attempts=5, wait=0)
    with anyio.move_on_after(0.05) as scope:
        await retry.call_async(slow)
    assert scope.cancelled_caught
    assert calls == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_asyncio_cancelled_error_propagates_from_wait_for() -> None:
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(10)

    retry = rs.Retry(on=BaseException, attempts=5, wait=0)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(retry.call_async(slow), 0.05)
    assert calls == 1


# -- a result nobody takes is closed -----------------------------------------------------------------


class _Answer:
    """A result with resources (an HTTP response): closed when thrown away."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def _broken_predicate(result: object) -> bool:
    raise AttributeError("status_code")  # e.g. a predicate written for another result type


def _judging_policies() -> list[rs.Policy]:
    return [
        rs.Retry(on=OSError, result=_broken_predicate, wait=0.0),
        rs.AdaptiveThrottle(result=_broken_predicate),
        rs.CircuitBreaker(name="judge", result=_broken_predicate),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["retry", "throttle", "breaker"])
def test_a_result_whose_predicate_raises_is_closed(index: int) -> None:
    policy = _judging_policies()[index]
    answer = _Answer()
    with pytest.raises(AttributeError):
        policy.call(lambda: answer)
    assert answer.closed


@pytest.mark.anyio
@pytest.mark.parametrize("index", [0, 1, 2], ids=["retry", "throttle", "breaker"])
async def test_an_async_result_whose_predicate_raises_is_closed(index: int) -> None:
    policy = _judging_policies()[index]
    answer = _Answer()

    async def call() -> _Answer:
        return answer

    with pytest.raises(AttributeError):
        await policy.call_async(call)
    assert answer.closed
