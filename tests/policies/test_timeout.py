from __future__ import annotations

import asyncio
import gc
import sys
import time
import weakref

import anyio
import anyio.lowlevel
import pytest

import resilient as rs
from resilient.events import Event, TimedOut
from resilient.policies.timeout import LoopTimer, _cancelling, loop_timer
from resilient.testing import FakeClock


@pytest.mark.anyio
async def test_async_call_is_cancelled_and_raises_deadline_exceeded() -> None:
    cancelled = False

    async def hang() -> None:
        nonlocal cancelled
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise

    seen: list[Event] = []
    started = time.monotonic()
    with pytest.raises(rs.DeadlineExceeded) as info:
        await rs.Timeout(0.05, hooks=[seen.append]).call_async(hang)
    assert time.monotonic() - started < 5.0  # bounded; the exact time is not asserted
    assert cancelled
    assert isinstance(info.value, TimeoutError)
    assert info.value.timeout == pytest.approx(0.05)
    assert [type(e) for e in seen] == [TimedOut]


@pytest.mark.anyio
async def test_fast_async_call_returns_its_result() -> None:
    async def quick() -> int:
        await anyio.lowlevel.checkpoint()
        return 42

    timeout = rs.Timeout(5.0)
    for _ in range(100):
        assert await timeout.call_async(quick) == 42


@pytest.mark.anyio
async def test_timeout_is_reusable_after_firing_and_does_not_leak_cancellation() -> None:
    timeout = rs.Timeout(0.02)
    for _ in range(3):
        with pytest.raises(rs.DeadlineExceeded):
            await timeout.call_async(anyio.sleep_forever)
    # the task is not left with a pending cancellation: it can still sleep and finish
    await anyio.sleep(0.01)

    async def quick() -> str:
        return "fine"

    assert await timeout.call_async(quick) == "fine"


@pytest.mark.anyio
async def test_outer_cancellation_is_not_turned_into_a_timeout() -> None:
    timeout = rs.Timeout(10.0)
    with anyio.move_on_after(0.05) as scope:
        await timeout.call_async(anyio.sleep_forever)
    assert scope.cancelled_caught


@pytest.mark.anyio
async def test_many_concurrent_timeouts_fire_independently() -> None:
    # generous: the quick calls must finish within it even on a loaded 2-core machine
    timeout = rs.Timeout(0.5)
    outcomes: list[str] = []

    async def slow() -> None:
        await anyio.sleep_forever()

    async def quick() -> None:
        await anyio.lowlevel.checkpoint()

    async def one(fn: object) -> None:
        try:
            await timeout.call_async(fn)  # type: ignore[arg-type]
            outcomes.append("ok")
        except rs.DeadlineExceeded:
            outcomes.append("timeout")

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(one, slow if i % 2 else quick)
    assert outcomes.count("ok") == 100
    assert outcomes.count("timeout") == 100


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_asyncio_timer_heap_is_compacted() -> None:
    timeout = rs.Timeout(30.0)

    async def quick() -> None:
        return None

    for _ in range(10_000):
        await timeout.call_async(quick)
    timer = loop_timer(asyncio.get_running_loop())
    assert len(timer.heap) < 1_000  # finished entries do not pile up for 30 s


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_an_entry_added_while_the_timer_fires_is_not_delayed() -> None:
    # Callbacks run by one firing add entries; one of those adds compacts the heap into a new
    # list. An entry due soon, added after that, must still fire on time, not when the next entry
    # of the old list was due.
    loop = asyncio.get_running_loop()
    timer = LoopTimer(loop)
    now = loop.time()
    for _ in range(80):  # finished entries far away: the next add may compact
        timer.finish(timer.add(lambda: None, now + 100.0))
    fired: list[str] = []
    soon = asyncio.Event()

    def on_time() -> None:
        fired.append("soon")
        soon.set()

    timer.add(lambda: fired.append("late"), now + 2.0)  # live, in the old and the new list
    # ("x" comes 290 ms after "soon": a loop woken late on a busy machine still fires them apart.)
    timer.add(lambda: timer.add(lambda: fired.append("x"), loop.time() + 0.3), now)
    timer.add(lambda: timer.add(lambda: None, loop.time() + 0.31), now)  # compacts
    timer.add(lambda: timer.add(on_time, loop.time() + 0.01), now)
    await asyncio.wait_for(soon.wait(), timeout=1.0)  # well before 2 s
    assert fired == ["soon"]
    assert "late" not in fired


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_raising_timer_callback_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    timer = LoopTimer(loop)
    fired = asyncio.Event()

    def broken() -> None:
        raise RuntimeError("callback bug")

    now = loop.time()
    timer.add(broken, now)
    timer.add(fired.set, now + 0.02)
    await asyncio.wait_for(fired.wait(), timeout=1.0)
    assert "a timer callback raised" in caplog.text


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is Python 3.11's")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_call_that_turns_the_timeouts_cancellation_into_an_error_leaves_no_count() -> None:
    # Its error stands (as with asyncio.timeout), and the task is not left "being cancelled":
    # a TaskGroup or asyncio.timeout later in the task would take that for a pending cancel.
    async def converts() -> None:
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            raise ConnectionError("gave up") from None

    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(ConnectionError):
        await rs.Timeout(0.02).call_async(converts)
    assert _cancelling(task) == 0


def test_the_shared_timer_lets_finished_loops_go() -> None:
    # One timer per loop, in a weak dictionary: it must not keep its loop (nor, through a
    # finished entry's callback, the loop's task) alive once the loop is done with.
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        await rs.Timeout(30.0).call_async(asyncio.sleep, 0)

    for _ in range(3):
        asyncio.run(main())
    gc.collect()
    assert [ref() is None for ref in loops] == [True, True, True]


@pytest.mark.anyio
async def test_inner_retry_respects_the_timeout_deadline() -> None:
    clock = FakeClock()
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise OSError("down")

    pipeline = rs.Pipeline(
        rs.Timeout(1.0, clock=clock), rs.Retry(on=OSError, attempts=50, wait=0.3, clock=clock)
    )
    with pytest.raises(OSError):
        await pipeline.call_async(down)
    assert calls == 4  # at 0, 0.3, 0.6, 0.9; a wait to 1.2 would cross the deadline
    assert clock.monotonic() <= 1.0


def test_sync_call_that_returns_late_raises_and_closes_the_result() -> None:
    clock = FakeClock()

    class Late:
        closed = False

        def close(self) -> None:
            self.closed = True

    late = Late()

    def slow() -> Late:
        clock.advance(2.0)
        return late

    with pytest.raises(rs.DeadlineExceeded):
        rs.Timeout(1.0, clock=clock).call(slow)
    assert late.closed


def test_sync_deadline_is_visible_to_the_code_it_runs() -> None:
    clock = FakeClock()
    seen: list[float | None] = []

    def look() -> None:
        clock.advance(0.25)
        seen.append(rs.time_left())

    rs.Timeout(1.0, clock=clock).call(look)
    assert seen == [0.75]
    assert rs.time_left() is None


def test_nested_timeouts_take_the_sooner_deadline() -> None:
    clock = FakeClock()
    seen: list[float | None] = []
    outer = rs.Timeout(0.5, clock=clock)
    inner = rs.Timeout(10.0, clock=clock)
    outer.call(inner.call, lambda: seen.append(rs.time_left()))
    assert seen == [0.5]


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf")])
def test_bad_seconds(seconds: float) -> None:
    with pytest.raises(ValueError, match="seconds"):
        rs.Timeout(seconds)
