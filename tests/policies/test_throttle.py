from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import resilient as rs
from resilient import ThrottledError
from resilient.events import CallRejected, Event
from resilient.policies.throttle import AdaptiveThrottle, ThrottleStatistics
from resilient.testing import FakeClock

# -- helpers ---------------------------------------------------------------------------------------


class Overloaded(Exception):
    pass


def draws(*values: float) -> Callable[[], float]:
    """A ``random`` that returns ``values`` in order and fails the test if drawn once more."""
    it = iter(values)

    def draw() -> float:
        try:
            return next(it)
        except StopIteration:
            raise AssertionError("random drawn more often than expected") from None

    return draw


def raises(exc: BaseException) -> Callable[[], None]:
    def fail() -> None:
        raise exc

    return fail


def never_drawn() -> float:
    raise AssertionError("random must not be drawn while the probability is 0")


def record(throttle: AdaptiveThrottle, *, accepted: int = 0, refused: int = 0) -> None:
    for _ in range(accepted):
        throttle.on_accepted()
    for _ in range(refused):
        throttle.on_rejected()


def sre(requests: float, accepts: float, k: float) -> float:
    """The SRE book's formula, written out independently of the code under test."""
    return max(0.0, (requests - k * accepts) / (requests + 1))


# -- the formula -----------------------------------------------------------------------------------


def test_probability_is_the_sre_formula_100_requests_30_accepts() -> None:
    throttle = AdaptiveThrottle(clock=FakeClock())
    record(throttle, accepted=30, refused=70)
    assert throttle.probability() == 40 / 101  # (100 − 2·30) / (100 + 1)
    assert throttle.statistics() == ThrottleStatistics(
        requests=100, accepts=30, probability=40 / 101, throttled_total=0
    )


@pytest.mark.parametrize(
    ("k", "accepted", "refused", "expected"),
    [
        (2.0, 0, 0, 0.0),  # nothing yet
        (2.0, 5, 5, 0.0),  # 10 requests ≤ 2·5 accepts
        (2.0, 4, 6, 2 / 11),  # (10 − 8) / 11
        (2.0, 0, 9, 9 / 10),  # a dead backend: R / (R + 1)
        (1.5, 4, 6, 4 / 11),  # (10 − 6) / 11
        (1.0, 3, 1, 1 / 5),  # k = 1: the refused share, damped by + 1
        (3.0, 30, 70, 10 / 101),  # (100 − 90) / 101
        (3.0, 40, 60, 0.0),  # 100 − 120 < 0
    ],
)
def test_probability_against_hand_computed_values(
    k: float, accepted: int, refused: int, expected: float
) -> None:
    throttle = AdaptiveThrottle(k=k, clock=FakeClock())
    record(throttle, accepted=accepted, refused=refused)
    assert throttle.probability() == pytest.approx(expected, abs=1e-12)
    assert throttle.probability() == pytest.approx(sre(accepted + refused, accepted, k))


def test_defaults() -> None:
    throttle = AdaptiveThrottle()
    assert (throttle.k, throttle.window, throttle.name) == (2.0, 120.0, "adaptive_throttle")
    assert throttle.on is Exception
    assert throttle.probability() == 0.0
    assert "k=2.0" in throttle.describe()
    with pytest.raises(AttributeError):
        throttle.k = 3.0  # type: ignore[misc]


# -- the window ------------------------------------------------------------------------------------


def test_counts_expire_after_the_window_on_the_fake_clock() -> None:
    clock = FakeClock(autojump=False)
    throttle = AdaptiveThrottle(clock=clock)
    record(throttle, accepted=30, refused=70)
    clock.advance(119.9)
    assert throttle.probability() == 40 / 101
    clock.advance(0.1)  # 120 s after the calls
    assert throttle.probability() == 0.0
    assert throttle.statistics().requests == 0


def test_the_window_slides_older_refusals_leave_first() -> None:
    clock = FakeClock(autojump=False)
    throttle = AdaptiveThrottle(clock=clock)
    record(throttle, refused=10)  # at t = 0
    clock.advance(60.0)
    record(throttle, refused=10, accepted=2)  # at t = 60
    assert throttle.probability() == (22 - 4) / 23
    clock.advance(60.0)  # t = 120: the first ten have aged out
    assert throttle.probability() == (12 - 4) / 13
    clock.advance(60.0)  # t = 180: all gone
    assert throttle.probability() == 0.0


def test_the_window_moves_in_slices_of_a_twentieth() -> None:
    clock = FakeClock(start=5.9, autojump=False)
    throttle = AdaptiveThrottle(clock=clock)  # slices of 6 s: [0, 6), [6, 12), ...
    throttle.on_rejected()  # in the slice [0, 6)
    clock.advance(1.1)
    throttle.on_rejected()  # t = 7, in the slice [6, 12)
    clock.advance(112.9)  # t = 119.9
    assert throttle.statistics().requests == 2
    clock.advance(0.1)  # t = 120: the slice [0, 6) leaves, 114.1 s after its call
    assert throttle.statistics().requests == 1
    clock.advance(5.9)  # t = 125.9
    assert throttle.statistics().requests == 1
    clock.advance(0.1)  # t = 126
    assert throttle.statistics().requests == 0


def test_a_shorter_window() -> None:
    clock = FakeClock(autojump=False)
    throttle = AdaptiveThrottle(window=10.0, clock=clock)
    record(throttle, refused=4)
    clock.advance(9.9)
    assert throttle.probability() == 4 / 5
    clock.advance(0.1)
    assert throttle.probability() == 0.0


# -- rejecting -------------------------------------------------------------------------------------


def test_random_is_not_drawn_while_the_probability_is_zero() -> None:
    throttle = AdaptiveThrottle(clock=FakeClock(), random=never_drawn)
    for _ in range(10):
        assert throttle.call(lambda: 1) == 1
    assert throttle.statistics().accepts == 10


def test_the_injected_random_decides() -> None:
    seen: list[Event] = []
    throttle = AdaptiveThrottle(
        name="search",
        on=Overloaded,
        clock=FakeClock(),
        random=draws(0.40, 0.40),
        hooks=[seen.append],
    )
    record(throttle, accepted=30, refused=70)  # p = 40/101 = 0.396…
    with pytest.raises(Overloaded):
        throttle.call(raises(Overloaded()))  # 0.40 >= p: sent, and refused by the backend
    # 101 requests, 30 accepts: p = (101 − 60) / 102 = 0.402…, so the same draw now sheds
    calls = 0

    def work() -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(ThrottledError) as info:
        throttle.call(work)
    assert calls == 0
    assert info.value.probability == 41 / 102
    assert seen == [CallRejected("search", "adaptive_throttle", "throttled")]
    assert throttle.statistics() == ThrottleStatistics(
        requests=102, accepts=30, probability=42 / 103, throttled_total=1
    )


def test_a_draw_below_the_probability_rejects_and_at_it_admits() -> None:
    throttle = AdaptiveThrottle(clock=FakeClock(), random=draws(0.5, 0.5))
    record(throttle, refused=1)  # p = 1/2
    assert throttle.call(lambda: 1) == 1  # 0.5 is not < 0.5: admitted
    # 2 requests, 1 accept: p = 0
    throttle.on_rejected()  # 3 requests, 1 accept: p = 1/4
    assert throttle.probability() == 1 / 4
    assert throttle.try_acquire()  # 0.5 >= 1/4


def test_locally_rejected_calls_count_as_requests() -> None:
    throttle = AdaptiveThrottle(name="api", clock=FakeClock(), random=lambda: 0.0)
    record(throttle, refused=2)  # p = 2/3
    with pytest.raises(ThrottledError) as info:
        throttle.call(lambda: None)
    assert info.value.probability == 2 / 3
    assert throttle.statistics() == ThrottleStatistics(
        requests=3, accepts=0, probability=3 / 4, throttled_total=1
    )
    assert not throttle.try_acquire()  # counted too, without raising
    assert throttle.statistics().requests == 4
    assert throttle.probability() == 4 / 5
    assert throttle.statistics().throttled_total == 2


def test_a_dead_backend_gets_a_trickle_and_traffic_returns_after_the_window() -> None:
    clock = FakeClock(autojump=False)
    throttle = AdaptiveThrottle(clock=clock, random=lambda: 0.5)
    sent = 0

    def dead() -> None:
        nonlocal sent
        sent += 1
        raise Overloaded

    outcomes = []
    for _ in range(100):
        try:
            throttle.call(dead)
        except Overloaded:
            outcomes.append("refused")
        except ThrottledError:
            outcomes.append("shed")
    # R = 0: p = 0, sent; R = 1: p = 1/2, 0.5 is not < 1/2, sent; R = 2: p = 2/3 > 0.5 from then on.
    assert sent == 2
    assert outcomes == ["refused", "refused"] + ["shed"] * 98
    assert throttle.probability() == 100 / 101
    clock.advance(120.0)
    assert throttle.call(lambda: "back") == "back"


def test_throttled_error_is_a_rejection() -> None:
    throttle = AdaptiveThrottle(name="api", clock=FakeClock(), random=lambda: 0.0)
    throttle.on_rejected()
    with pytest.raises(rs.RejectedError) as info:
        throttle.call(lambda: None)
    assert isinstance(info.value, ThrottledError)
    assert isinstance(info.value, rs.ResilienceError)
    assert info.value.policy == "adaptive_throttle"
    assert info.value.name == "api"
    assert "api" in str(info.value)


# -- what counts as accepted -----------------------------------------------------------------------


def test_exceptions_matched_by_on_are_refusals_others_are_accepts() -> None:
    throttle = AdaptiveThrottle(on=Overloaded, clock=FakeClock(), random=lambda: 1.0)

    def overloaded() -> None:
        raise Overloaded

    def missing() -> None:
        raise KeyError("no such item")

    with pytest.raises(Overloaded):
        throttle.call(overloaded)
    with pytest.raises(KeyError):
        throttle.call(missing)  # the backend answered: accepted
    stats = throttle.statistics()
    assert (stats.requests, stats.accepts) == (2, 1)


def test_default_on_counts_every_exception_as_a_refusal() -> None:
    throttle = AdaptiveThrottle(clock=FakeClock())
    with pytest.raises(ValueError, match="x"):
        throttle.call(lambda: int("x"))
    assert (throttle.statistics().requests, throttle.statistics().accepts) == (1, 0)


def test_result_predicate_marks_returned_values_as_refusals() -> None:
    throttle = AdaptiveThrottle(
        result=lambda status: status in (429, 503), clock=FakeClock(), random=lambda: 1.0
    )
    for status in (200, 503, 429, 404):
        assert throttle.call(lambda s=status: s) == status  # type: ignore[misc]
    stats = throttle.statistics()
    assert (stats.requests, stats.accepts) == (4, 2)
    assert stats.probability == 0.0  # 4 ≤ 2·2


def test_on_predicate() -> None:
    throttle = AdaptiveThrottle(
        on=lambda exc: "busy" in str(exc), clock=FakeClock(), random=lambda: 1.0
    )
    with pytest.raises(RuntimeError):
        throttle.call(raises(RuntimeError("busy")))
    with pytest.raises(RuntimeError):
        throttle.call(raises(RuntimeError("bad input")))
    assert (throttle.statistics().requests, throttle.statistics().accepts) == (2, 1)


def test_cancellation_counts_as_neither() -> None:
    throttle = AdaptiveThrottle(clock=FakeClock())

    class Stop(BaseException):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        throttle.call(stop)
    with pytest.raises(KeyboardInterrupt):
        throttle.call(raises(KeyboardInterrupt()))
    assert throttle.statistics().requests == 0


@pytest.mark.anyio
async def test_async_calls_are_counted_and_shed() -> None:
    seen: list[Event] = []
    throttle = AdaptiveThrottle(
        on=Overloaded, clock=FakeClock(), random=lambda: 0.0, hooks=[seen.append]
    )

    async def ok() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    async def overloaded() -> int:
        await anyio.lowlevel.checkpoint()
        raise Overloaded

    assert await throttle.call_async(ok) == 1
    with pytest.raises(Overloaded):
        await throttle.call_async(overloaded)
    with pytest.raises(Overloaded):
        await throttle.call_async(overloaded)
    # 3 requests, 1 accept: p = 1/4 and random() = 0.0 < 1/4
    assert throttle.probability() == 1 / 4
    with pytest.raises(ThrottledError):
        await throttle.call_async(ok)
    assert throttle.statistics() == ThrottleStatistics(
        requests=4, accepts=1, probability=2 / 5, throttled_total=1
    )
    assert [type(e) for e in seen] == [CallRejected]


@pytest.mark.anyio
async def test_async_cancellation_counts_as_neither() -> None:
    throttle = AdaptiveThrottle(clock=FakeClock())
    async with anyio.create_task_group() as tg:
        tg.start_soon(throttle.call_async, anyio.sleep_forever)
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert throttle.statistics().requests == 0


def test_decorates_sync_and_async_functions() -> None:
    throttle = AdaptiveThrottle(clock=FakeClock())

    @throttle
    def add(a: int, b: int) -> int:
        return a + b

    @throttle
    async def add_async(a: int, b: int) -> int:
        await anyio.lowlevel.checkpoint()
        return a + b

    assert add(1, 2) == 3
    assert anyio.run(add_async, 2, 3) == 5
    assert anyio.run(add_async, 3, 4, backend="trio") == 7
    assert throttle.statistics().accepts == 3


def test_in_a_pipeline_a_retry_sees_the_rejection() -> None:
    throttle = AdaptiveThrottle(clock=FakeClock(), random=lambda: 0.0)
    throttle.on_rejected()
    pipeline = rs.Pipeline(rs.Fallback(value="fallback"), throttle)
    assert pipeline.call(lambda: "live") == "fallback"


# -- the permission protocol -----------------------------------------------------------------------


def test_permission_protocol() -> None:
    seen: list[Event] = []
    throttle = AdaptiveThrottle(
        name="t", clock=FakeClock(), random=draws(0.0, 0.0), hooks=[seen.append]
    )
    assert throttle.try_acquire()  # p = 0: no draw
    throttle.on_accepted()
    assert throttle.try_acquire()
    throttle.on_rejected()
    assert throttle.try_acquire()
    throttle.release()  # never sent: counts as nothing
    assert throttle.statistics() == ThrottleStatistics(
        requests=2, accepts=1, probability=0.0, throttled_total=0
    )
    throttle.on_rejected()  # 3 requests, 1 accept: p = 1/4
    assert not throttle.try_acquire()  # draws 0.0
    assert seen == []  # try_acquire emits nothing
    with pytest.raises(ThrottledError) as info:
        throttle.acquire()  # draws 0.0; 4 → 5 requests
    assert info.value.probability == 2 / 5
    assert seen == [CallRejected("t", "adaptive_throttle", "throttled")]
    error = throttle.rejection()
    assert isinstance(error, ThrottledError)
    assert error.probability == throttle.probability() == (5 - 2) / 6
    assert len(seen) == 2
    stats = throttle.statistics()
    assert (stats.requests, stats.accepts, stats.throttled_total) == (5, 1, 2)


def test_breaker_style_outcomes() -> None:
    throttle = AdaptiveThrottle(on=Overloaded, clock=FakeClock())
    throttle.on_success(0.1)  # accepted
    throttle.on_failure(0.1)  # no exception: the caller says refused
    throttle.on_failure(0.1, Overloaded())  # refused
    throttle.on_failure(0.1, KeyError("x"))  # answered: accepted
    throttle.on_failure(0.1, KeyboardInterrupt())  # cancellation-like: nothing
    assert throttle.metrics() == {
        "requests": 4,
        "accepts": 2,
        "probability": 0.0,
        "throttled_total": 0,
    }


def test_acquire_admits_when_not_shed() -> None:
    throttle = AdaptiveThrottle(clock=FakeClock(), random=never_drawn)
    throttle.acquire()
    throttle.on_accepted()
    assert throttle.statistics().accepts == 1


def test_threads_lose_no_counts() -> None:
    throttle = AdaptiveThrottle()

    def work(n: int) -> None:
        for i in range(n):
            if i % 4:
                throttle.on_accepted()
            else:
                throttle.on_rejected()

    threads = [threading.Thread(target=work, args=(1000,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)
    stats = throttle.statistics()
    assert (stats.requests, stats.accepts) == (8000, 6000)


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0.5}, "k must be a finite number >= 1, got 0.5"),
        ({"k": 0}, "k must be a finite number >= 1, got 0"),
        ({"k": float("nan")}, "k must be a finite number >= 1, got nan"),
        ({"k": float("inf")}, "k must be a finite number >= 1, got inf"),
        ({"k": True}, "k must be a finite number >= 1, got True"),
        ({"k": "2"}, "k must be a finite number >= 1, got '2'"),
        ({"window": 0}, "window must be a finite number > 0, got 0"),
        ({"window": -1.0}, "window must be a finite number > 0, got -1.0"),
        ({"on": "Overloaded"}, "on must be"),
        ({"result": 3}, "result must be a predicate, got 3"),
        ({"random": 0.5}, "random must be a callable"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"clock": object()}, "clock must have"),
    ],
)
def test_validation_errors_name_the_parameter_and_value(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        AdaptiveThrottle(**kwargs)


def test_k_of_one_is_allowed() -> None:
    assert AdaptiveThrottle(k=1).k == 1
