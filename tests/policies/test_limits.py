from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import hypothesis.strategies as st
import pytest
from hypothesis import given

import resilient as rs
from resilient.policies.limits import AIMDLimit
from resilient.testing import FakeClock
from tests.policies._waits import until, wait_until

# -- helpers ---------------------------------------------------------------------------------------


def limit_of(bh: rs.Bulkhead) -> int:
    return bh.statistics().max_concurrent


def in_use(bh: rs.Bulkhead) -> int:
    return bh.statistics().in_use


class Overloaded(Exception):
    pass


# -- the formula -----------------------------------------------------------------------------------


def test_defaults_are_netflix_aimd() -> None:
    limit = AIMDLimit()
    assert (limit.initial, limit.min_limit, limit.max_limit) == (20, 1, 200)
    assert (limit.backoff, limit.increase, limit.timeout) == (0.9, 1, None)


def test_a_sequence_of_outcomes_moves_the_limit_as_computed_by_hand() -> None:
    aimd = AIMDLimit(initial=20, timeout=1.0)
    steps: list[tuple[int, dict[str, Any], int]] = [
        # (in_flight, outcome, limit after)
        (12, {"dropped": True}, 18),  # floor(20 × 0.9) = 18
        (12, {"dropped": True}, 16),  # floor(18 × 0.9) = floor(16.2) = 16
        (8, {}, 17),  # 8 × 2 >= 16: in use, + 1
        (8, {}, 17),  # 8 × 2 < 17: not in use, unchanged
        (9, {}, 18),  # 9 × 2 >= 17
        (1, {"duration": 1.5}, 16),  # slower than timeout = 1.0: a drop, floor(16.2)
        (8, {"duration": 1.0}, 17),  # exactly the timeout is not a drop; in use
        (30, {"duration": 0.01}, 18),
        (0, {}, 18),  # idle
    ]
    limit = aimd.initial
    seen = []
    for in_flight, outcome, _ in steps:
        limit = aimd.next_limit(limit, in_flight, **outcome)
        seen.append(limit)
    assert seen == [after for _, _, after in steps]


def test_the_limit_never_falls_below_min_limit() -> None:
    aimd = AIMDLimit(initial=7, min_limit=5, max_limit=10)
    assert aimd.next_limit(7, 0, dropped=True) == 6  # floor(6.3)
    assert aimd.next_limit(6, 0, dropped=True) == 5  # floor(5.4)
    assert aimd.next_limit(5, 0, dropped=True) == 5  # floor(4.5) = 4 < 5
    one = AIMDLimit(initial=1)
    assert one.next_limit(1, 1, dropped=True) == 1  # floor(0.9) = 0 < 1
    assert one.next_limit(1, 1) == 2  # 1 × 2 >= 1: a limit of 1 can grow again


def test_the_limit_never_rises_above_max_limit() -> None:
    aimd = AIMDLimit(initial=20, max_limit=21)
    assert aimd.next_limit(20, 20) == 21
    assert aimd.next_limit(21, 21) == 21
    big_steps = AIMDLimit(initial=20, max_limit=25, increase=3)
    assert big_steps.next_limit(20, 10) == 23
    assert big_steps.next_limit(23, 12) == 25  # 26 capped


def test_other_backoffs_round_down_exactly() -> None:
    aimd = AIMDLimit(initial=90, max_limit=1000, backoff=0.7)
    # 90 × 0.7 is 62.99999999999999 in binary floating point; the limit is still 63
    assert aimd.next_limit(90, 0, dropped=True) == 63
    half = AIMDLimit(initial=9, backoff=0.5)
    assert half.next_limit(9, 0, dropped=True) == 4


def test_without_a_timeout_duration_is_ignored() -> None:
    aimd = AIMDLimit(initial=10)
    assert aimd.next_limit(10, 5, duration=3600.0) == 11


def test_is_drop() -> None:
    aimd = AIMDLimit()
    assert aimd.is_drop(TimeoutError())
    assert aimd.is_drop(rs.DeadlineExceeded("late"))
    assert aimd.is_drop(asyncio.TimeoutError())
    assert not aimd.is_drop(KeyError("x"))
    assert not aimd.is_drop(asyncio.CancelledError())
    custom = AIMDLimit(on=(TimeoutError, Overloaded))
    assert custom.is_drop(Overloaded())
    predicate = AIMDLimit(on=lambda exc: "busy" in str(exc))
    assert predicate.is_drop(RuntimeError("busy"))
    assert not predicate.is_drop(RuntimeError("bad"))


@given(
    initial=st.integers(1, 50),
    spread=st.tuples(st.integers(0, 50), st.integers(0, 50)),
    backoff=st.floats(0.01, 0.99),
    increase=st.integers(1, 5),
    steps=st.lists(st.tuples(st.integers(0, 120), st.booleans()), max_size=60),
)
def test_the_limit_always_stays_within_its_bounds(
    initial: int,
    spread: tuple[int, int],
    backoff: float,
    increase: int,
    steps: list[tuple[int, bool]],
) -> None:
    low, high = max(1, initial - spread[0]), initial + spread[1]
    aimd = AIMDLimit(
        initial=initial, min_limit=low, max_limit=high, backoff=backoff, increase=increase
    )
    limit = initial
    for in_flight, dropped in steps:
        new = aimd.next_limit(limit, in_flight, dropped=dropped)
        assert low <= new <= high
        if dropped:
            assert new <= limit
            assert new < limit or new == low
        else:
            assert new >= limit
        limit = new


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": 0}, "initial must be an integer >= 1, got 0"),
        ({"initial": 2.5}, "initial must be an integer >= 1, got 2.5"),
        ({"initial": 300}, "initial must be within [min_limit, max_limit] = [1, 200], got 300"),
        ({"min_limit": 0}, "min_limit must be an integer >= 1, got 0"),
        ({"max_limit": 0}, "max_limit must be an integer >= 1, got 0"),
        (
            {"min_limit": 10, "max_limit": 5, "initial": 7},
            "max_limit must be >= min_limit (10), got 5",
        ),
        ({"backoff": 1.0}, "backoff must satisfy 0 < backoff < 1, got 1.0"),
        ({"backoff": 0}, "backoff must satisfy 0 < backoff < 1, got 0"),
        ({"backoff": True}, "backoff must satisfy 0 < backoff < 1, got True"),
        ({"increase": 0}, "increase must be an integer >= 1, got 0"),
        ({"timeout": 0}, "timeout must be a finite number > 0, got 0"),
        ({"timeout": float("inf")}, "timeout must be a finite number > 0, got inf"),
        ({"on": "TimeoutError"}, "on must be"),
    ],
)
def test_validation_errors_name_the_parameter_and_value(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        AIMDLimit(**kwargs)


def test_is_a_frozen_value() -> None:
    aimd = AIMDLimit(initial=5)
    assert aimd == AIMDLimit(initial=5)
    with pytest.raises(AttributeError):
        aimd.initial = 6  # type: ignore[misc]


# -- in a bulkhead: the limit's movement -----------------------------------------------------------


def test_bulkhead_starts_at_the_initial_limit() -> None:
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=3))
    assert limit_of(bh) == 3
    assert [bh.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert "AIMDLimit(initial=3" in bh.describe()


def test_reported_outcomes_and_in_flight_levels_move_the_limit() -> None:
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=20))
    for _ in range(12):
        assert bh.try_acquire()
    limits = [limit_of(bh)]
    bh.on_failure(0.1)  # in flight 12; exc None: a drop → floor(20 × 0.9) = 18
    limits.append(limit_of(bh))
    bh.on_failure(0.1, TimeoutError())  # in flight 11; a drop → floor(16.2) = 16
    limits.append(limit_of(bh))
    bh.on_success(0.1)  # in flight 10: 20 >= 16 → 17
    limits.append(limit_of(bh))
    bh.on_success(0.1)  # in flight 9: 18 >= 17 → 18
    limits.append(limit_of(bh))
    bh.on_success(0.1)  # in flight 8: 16 < 18 → 18
    limits.append(limit_of(bh))
    bh.on_failure(0.1, KeyError("x"))  # in flight 7, not a drop: 14 < 18 → 18
    limits.append(limit_of(bh))
    bh.release()  # in flight 6: no sample
    limits.append(limit_of(bh))
    assert limits == [20, 18, 16, 17, 18, 18, 18, 18]
    stats = bh.statistics()
    assert (stats.in_use, stats.available) == (5, 13)


def test_the_decorator_reports_outcomes_and_durations_on_the_fake_clock() -> None:
    clock = FakeClock()  # autojump: a clock.sleep inside the call is its duration
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=4, timeout=1.0), clock=clock)

    def takes(seconds: float, exc: BaseException | None = None) -> Callable[[], None]:
        def work() -> None:
            clock.sleep(seconds)
            if exc is not None:
                raise exc

        return work

    limits = []

    def step(work: Callable[[], None]) -> None:
        try:
            bh.call(work)
        except Exception:
            pass
        limits.append(limit_of(bh))

    # every call runs alone: in flight 1 when it finishes
    step(takes(0.1))  # 1 × 2 < 4: unchanged
    step(takes(0.1, TimeoutError()))  # a drop: floor(3.6) = 3
    step(takes(0.1, rs.DeadlineExceeded("late")))  # a drop: floor(2.7) = 2
    step(takes(0.1))  # 1 × 2 >= 2: 3
    step(takes(1.5))  # 1.5 s > timeout: a drop, floor(2.7) = 2
    step(takes(1.0))  # exactly the timeout: not a drop; 2 >= 2: 3
    step(takes(0.2, ValueError()))  # answered: not a drop; 2 < 3: 3
    step(takes(0.0, Overloaded()))  # not matched by on=TimeoutError: 3
    assert limits == [4, 3, 2, 3, 2, 3, 3, 3]
    assert in_use(bh) == 0


def test_cancellation_is_no_sample_and_returns_the_permit() -> None:
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=4))

    class Stop(BaseException):
        pass

    def stop() -> None:
        raise Stop

    assert bh.try_acquire()
    with pytest.raises(Stop):
        bh.call(stop)  # in flight 2 would have grown the limit: 4 >= 4
    assert limit_of(bh) == 4
    assert in_use(bh) == 1
    bh.on_failure(0.1, KeyboardInterrupt())  # cancellation-like via the protocol: no sample
    assert (limit_of(bh), in_use(bh)) == (4, 0)


def test_release_without_a_permit_raises() -> None:
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=2))
    with pytest.raises(RuntimeError, match="without a permit"):
        bh.release()
    with pytest.raises(RuntimeError, match="without a permit"):
        bh.on_success(0.1)
    assert limit_of(bh) == 2


def test_the_fixed_limit_ignores_outcomes() -> None:
    bh = rs.Bulkhead(max_concurrent=4)
    for _ in range(4):
        assert bh.try_acquire()
    bh.on_failure(0.1)
    bh.on_failure(0.1, TimeoutError())
    bh.on_success(0.1)
    bh.release()
    stats = bh.statistics()
    assert (stats.max_concurrent, stats.in_use, stats.available) == (4, 0, 4)


# -- in a bulkhead: a lower limit holds back new calls ---------------------------------------------


def test_a_limit_dropped_below_in_flight_admits_nobody_until_in_flight_falls_below_it() -> None:
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=8, backoff=0.5))
    for _ in range(8):
        assert bh.try_acquire()
    bh.on_failure(0.1)  # in flight 8, a drop: limit floor(8 × 0.5) = 4; 7 still in flight
    stats = bh.statistics()
    assert (stats.max_concurrent, stats.in_use, stats.available) == (4, 7, 0)
    assert not bh.try_acquire()
    for expected in (6, 5, 4):
        bh.release()  # retired, not freed
        assert in_use(bh) == expected
        assert not bh.try_acquire()
    bh.release()  # 3 in flight < 4
    assert bh.try_acquire()  # the 4th
    assert not bh.try_acquire()  # the N+1th, N = 4
    stats = bh.statistics()
    assert (stats.max_concurrent, stats.in_use, stats.available) == (4, 4, 0)


def test_a_raised_limit_pays_off_debt_before_freeing_permits() -> None:
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=10, backoff=0.5))
    for _ in range(10):
        assert bh.try_acquire()
    bh.on_failure(0.1)  # 10 in flight, limit 5; 9 in flight: 4 over
    assert (limit_of(bh), in_use(bh)) == (5, 9)
    bh.on_success(0.1)  # 9 in flight: 18 >= 5 → 6; 8 in flight, 2 over
    assert (limit_of(bh), in_use(bh), bh.statistics().available) == (6, 8, 0)
    bh.on_success(0.1)  # 8 → limit 7; 7 in flight
    bh.on_success(0.1)  # 7 → limit 8; 6 in flight, 2 free
    stats = bh.statistics()
    assert (stats.max_concurrent, stats.in_use, stats.available) == (8, 6, 2)


def test_a_raised_limit_wakes_waiting_threads() -> None:
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=2), max_queue=5)
    assert bh.try_acquire()
    assert bh.try_acquire()
    entered: list[int] = []
    gate = threading.Event()

    def work(i: int) -> None:
        entered.append(i)
        gate.wait(5.0)

    threads = []
    for i in range(2):
        thread = threading.Thread(target=bh.call, args=(work, i))
        thread.start()
        threads.append(thread)
        wait_until(lambda i=i: bh.statistics().queued == i + 1)  # type: ignore[misc]
    # in flight 2: 2 × 2 >= 2, so the limit grows to 3: this permit and the new one go to both
    bh.on_success(0.1)
    wait_until(lambda: len(entered) == 2)
    stats = bh.statistics()
    assert (stats.max_concurrent, stats.in_use, stats.queued) == (3, 3, 0)
    gate.set()
    for thread in threads:
        thread.join(5.0)
    # the threads finished with 3 then 2 in flight: 6 >= 3 → 4, then 4 >= 4 → 5
    assert limit_of(bh) == 5
    bh.release()
    assert in_use(bh) == 0


@pytest.mark.anyio
async def test_a_raised_limit_wakes_waiting_tasks() -> None:
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=2), max_queue=5)
    assert bh.try_acquire()
    assert bh.try_acquire()
    entered: list[int] = []
    gate = anyio.Event()

    async def work(i: int) -> None:
        entered.append(i)
        await gate.wait()

    async with anyio.create_task_group() as tg:
        for i in range(2):
            tg.start_soon(bh.call_async, work, i)
            await until(lambda i=i: bh.statistics().queued == i + 1)  # type: ignore[misc]
        bh.on_success(0.1)  # limit 2 → 3: both waiters are handed a permit
        await until(lambda: len(entered) == 2)
        stats = bh.statistics()
        assert (stats.max_concurrent, stats.in_use, stats.queued) == (3, 3, 0)
        gate.set()
    assert limit_of(bh) == 5
    bh.release()
    assert in_use(bh) == 0


@pytest.mark.anyio
async def test_tasks_never_exceed_a_lowered_limit_and_the_limit_grows_back() -> None:
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=8, backoff=0.5), max_queue=10)
    for _ in range(8):
        assert bh.try_acquire()
    bh.on_failure(0.1)  # limit 4
    for _ in range(7):
        bh.release()
    assert (limit_of(bh), in_use(bh)) == (4, 0)
    gate = anyio.Event()
    active = peak = 0

    async def work() -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await gate.wait()
        active -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(bh.call_async, work)
        await until(lambda: bh.statistics().queued == 2)
        assert (active, in_use(bh)) == (4, 4)  # the 5th and 6th wait
        gate.set()
    # finishes with 4, 5, 4, 3, 2, 1 in flight (the first hands both waiters a permit):
    # 4 → 5 (8 >= 4), 5 → 6 (10 >= 5), 6 → 7 (8 >= 6), then 6, 4, 2 < 7
    assert peak <= 5
    assert limit_of(bh) == 7
    assert in_use(bh) == 0


def test_threads_never_exceed_a_lowered_limit() -> None:
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=6, backoff=0.5), max_queue=10)
    for _ in range(6):
        assert bh.try_acquire()
    bh.on_failure(0.1)  # limit 3, 5 in flight
    guard = threading.Lock()
    gate = threading.Event()
    active = peak = 0

    def work() -> None:
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        gate.wait(5.0)
        with guard:
            active -= 1

    threads = [threading.Thread(target=bh.call, args=(work,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: bh.statistics().queued == 3)
    for _ in range(4):
        bh.release()  # 2 retired (debt), then 2 handed to waiters
    wait_until(lambda: active == 2)
    assert bh.statistics().queued == 1
    bh.release()  # the last held here: the third waiter gets it
    wait_until(lambda: active == 3)
    gate.set()
    for thread in threads:
        thread.join(5.0)
    assert peak == 3
    assert in_use(bh) == 0


@pytest.mark.anyio
async def test_async_durations_on_the_fake_clock_and_cancellation() -> None:
    clock = FakeClock()
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=4, timeout=1.0), clock=clock)

    async def slow() -> None:
        await clock.sleep_async(2.0)

    async def timeout() -> None:
        await anyio.lowlevel.checkpoint()
        raise TimeoutError

    await bh.call_async(slow)  # 2 s > 1 s: a drop, floor(3.6) = 3
    assert limit_of(bh) == 3
    with pytest.raises(TimeoutError):
        await bh.call_async(timeout)  # floor(2.7) = 2
    assert limit_of(bh) == 2
    await bh.call_async(anyio.lowlevel.checkpoint)  # 1 × 2 >= 2: 3
    assert limit_of(bh) == 3
    async with anyio.create_task_group() as tg:
        tg.start_soon(bh.call_async, anyio.sleep_forever)
        await until(lambda: in_use(bh) == 1)
        tg.cancel_scope.cancel()
    assert (limit_of(bh), in_use(bh)) == (3, 0)  # cancelled: no sample


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_waiter_cancelled_as_a_raised_limit_hands_it_a_permit_passes_it_on() -> None:
    bh = rs.Bulkhead(max_concurrent=AIMDLimit(initial=1, min_limit=1), max_queue=5)
    entered: list[str] = []

    async def waiter(tag: str) -> None:
        await bh.acquire_async()
        entered.append(tag)
        bh.release()

    assert bh.try_acquire()
    first = asyncio.ensure_future(waiter("first"))
    await until(lambda: bh.statistics().queued == 1)
    second = asyncio.ensure_future(waiter("second"))
    await until(lambda: bh.statistics().queued == 2)
    bh.on_success(0.1)  # 1 × 2 >= 1: limit 2, both permits to the two waiters...
    first.cancel()  # ...the first is cancelled before it resumes and passes its permit on
    await asyncio.wait([first, second], timeout=5.0)
    assert first.cancelled()
    assert entered == ["second"]
    stats = bh.statistics()
    assert (stats.max_concurrent, stats.in_use, stats.available, stats.queued) == (2, 0, 2, 0)


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10", None, object()])
def test_max_concurrent_must_be_a_count_or_a_limit(bad: object) -> None:
    with pytest.raises(
        ValueError, match=r"^max_concurrent must be an integer >= 1 or an AIMDLimit"
    ):
        rs.Bulkhead(max_concurrent=bad)  # type: ignore[arg-type]


def test_one_limit_config_serves_two_bulkheads_independently() -> None:
    aimd = AIMDLimit(initial=4)
    a = rs.Bulkhead(name="a", max_concurrent=aimd)
    b = rs.Bulkhead(name="b", max_concurrent=aimd)
    assert a.try_acquire()
    a.on_failure(0.1)
    assert (limit_of(a), limit_of(b)) == (3, 4)


def test_rejection_message_names_the_current_limit() -> None:
    bh = rs.Bulkhead(name="api", max_concurrent=AIMDLimit(initial=2, backoff=0.5))
    assert bh.try_acquire()
    assert bh.try_acquire()
    bh.on_failure(0.1)  # limit 1, 1 in flight
    with pytest.raises(rs.BulkheadFullError, match=r"max_concurrent=1\b"):
        bh.call(lambda: None)


def test_a_failing_on_predicate_still_returns_the_permit() -> None:
    def broken(exc: BaseException) -> bool:
        raise RuntimeError("bug in the predicate")

    bh = rs.Bulkhead(max_concurrent=rs.AIMDLimit(initial=2, on=broken))

    @bh
    def fails() -> None:
        raise ValueError("the call failed")

    with pytest.raises(RuntimeError, match="bug in the predicate"):
        fails()
    assert bh.statistics().in_use == 0  # the permit came back before the error left
    assert bh.statistics().max_concurrent == 2  # and it was no sample
    bh.acquire()
    with pytest.raises(RuntimeError, match="bug in the predicate"):
        bh.on_failure(0.1, ValueError("x"))
    assert bh.statistics().in_use == 0
