from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import resilient as rs
from resilient._clock import system_clock
from resilient._deadline import deadline_scope
from resilient.events import CallRejected, Event
from resilient.policies.limits import AIMDLimit
from resilient.testing import FakeClock
from tests.policies._waits import until, wait_until

# -- helpers ---------------------------------------------------------------------------------------


def assert_idle(bh: rs.Bulkhead) -> None:
    stats = bh.statistics()
    assert stats.in_use == 0
    assert stats.available == stats.max_concurrent
    assert stats.queued == 0


def rejections(seen: list[Event]) -> list[str]:
    return [e.reason for e in seen if isinstance(e, CallRejected)]


# -- bounding concurrency --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_thousand_tasks_never_exceed_max_concurrent() -> None:
    bh = rs.Bulkhead(max_concurrent=10, max_queue=1000)
    active = peak = done = 0

    async def work() -> None:
        nonlocal active, peak, done
        active += 1
        peak = max(peak, active)
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        active -= 1
        done += 1

    async with anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(bh.call_async, work)

    assert peak == 10
    assert done == 1000
    assert_idle(bh)
    stats = bh.statistics()
    assert (stats.acquired_total, stats.completed_total, stats.rejected_total) == (1000, 1000, 0)


def test_fifty_threads_never_exceed_max_concurrent() -> None:
    bh = rs.Bulkhead(max_concurrent=5, max_queue=50)
    guard = threading.Lock()
    gate = threading.Event()
    active = peak = 0
    errors: list[BaseException] = []

    def work() -> None:
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        gate.wait(5.0)
        time.sleep(0.0005)
        with guard:
            active -= 1

    def run() -> None:
        try:
            bh.call(work)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(50)]
    for t in threads:
        t.start()
    wait_until(lambda: bh.statistics().queued == 45)
    assert bh.statistics().in_use == 5
    assert peak == 5
    gate.set()
    for t in threads:
        t.join(10.0)
    assert not errors
    assert peak == 5
    assert_idle(bh)
    assert bh.statistics().completed_total == 50


# -- rejection -------------------------------------------------------------------------------------


def test_full_bulkhead_without_queue_rejects_at_once() -> None:
    seen: list[Event] = []
    bh = rs.Bulkhead(name="db", max_concurrent=1, hooks=[seen.append])
    calls = 0

    def work() -> None:
        nonlocal calls
        calls += 1

    assert bh.try_acquire()
    started = time.monotonic()
    with pytest.raises(rs.BulkheadFullError) as info:
        bh.call(work)
    assert time.monotonic() - started < 1.0
    assert calls == 0
    assert info.value.name == "db"
    assert info.value.policy == "bulkhead"
    assert isinstance(info.value, rs.RejectedError)
    assert seen == [CallRejected("db", "bulkhead", "full")]
    bh.release()
    bh.call(work)
    assert calls == 1


@pytest.mark.anyio
async def test_full_bulkhead_without_queue_rejects_async_at_once() -> None:
    seen: list[Event] = []
    bh = rs.Bulkhead(max_concurrent=2, hooks=[seen.append])

    async def work() -> int:
        return 1

    assert bh.try_acquire()
    assert bh.try_acquire()
    with pytest.raises(rs.BulkheadFullError):
        await bh.call_async(work)
    assert rejections(seen) == ["full"]
    bh.release()
    assert await bh.call_async(work) == 1


def test_max_wait_zero_never_queues() -> None:
    seen: list[Event] = []
    bh = rs.Bulkhead(max_concurrent=1, max_queue=5, max_wait=0, hooks=[seen.append])
    assert bh.try_acquire()
    with pytest.raises(rs.BulkheadFullError):
        bh.acquire()
    assert bh.statistics().queued == 0
    assert rejections(seen) == ["full"]


@pytest.mark.anyio
async def test_queue_bound_is_respected() -> None:
    seen: list[Event] = []
    bh = rs.Bulkhead(max_concurrent=1, max_queue=2, hooks=[seen.append])
    release = anyio.Event()
    entered: list[int] = []

    async def work(i: int) -> None:
        entered.append(i)
        await release.wait()

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(bh.call_async, work, i)
        await until(lambda: bh.statistics().queued == 2)
        with pytest.raises(rs.BulkheadFullError):
            await bh.call_async(work, 99)
        with pytest.raises(rs.BulkheadFullError):
            bh.call(lambda: None)  # sync callers count against the same queue
        stats = bh.statistics()
        assert (stats.in_use, stats.queued, stats.rejected_total) == (1, 2, 2)
        release.set()
    assert sorted(entered) == [0, 1, 2]  # start order is not defined on trio
    assert rejections(seen) == ["queue_full", "queue_full"]
    assert_idle(bh)


def test_try_acquire_never_waits_and_counts_rejections() -> None:
    bh = rs.Bulkhead(max_concurrent=2, max_queue=10)
    assert bh.try_acquire()
    assert bh.try_acquire()
    assert not bh.try_acquire()
    stats = bh.statistics()
    assert (stats.in_use, stats.available, stats.rejected_total) == (2, 0, 1)
    bh.release()
    bh.on_success(0.1)
    assert_idle(bh)
    with pytest.raises(RuntimeError, match="without a permit"):
        bh.release()
    assert bh.try_acquire()
    bh.on_failure(0.1, OSError())
    assert_idle(bh)


# -- waiting: max_wait and the deadline ------------------------------------------------------------


@pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}))],
)
@pytest.mark.anyio
async def test_max_wait_expires_on_trio_mock_clock() -> None:
    seen: list[Event] = []
    bh = rs.Bulkhead(max_concurrent=1, max_queue=1, max_wait=30.0, hooks=[seen.append])
    assert bh.try_acquire()
    began = anyio.current_time()
    with pytest.raises(rs.BulkheadFullError):
        await bh.acquire_async()
    assert anyio.current_time() - began == pytest.approx(30.0)
    assert rejections(seen) == ["max_wait"]
    stats = bh.statistics()
    assert (stats.in_use, stats.queued, stats.rejected_total) == (1, 0, 1)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_max_wait_expires_on_asyncio_real_time() -> None:
    bh = rs.Bulkhead(max_concurrent=1, max_queue=1, max_wait=0.05)
    assert bh.try_acquire()
    began = time.monotonic()
    with pytest.raises(rs.BulkheadFullError):
        await bh.acquire_async()
    assert 0.04 <= time.monotonic() - began < 5.0
    assert bh.statistics().queued == 0


def test_max_wait_expires_for_a_thread() -> None:
    seen: list[Event] = []
    bh = rs.Bulkhead(max_concurrent=1, max_queue=1, max_wait=0.05, hooks=[seen.append])
    assert bh.try_acquire()
    began = time.monotonic()
    with pytest.raises(rs.BulkheadFullError):
        bh.call(lambda: None)
    assert 0.04 <= time.monotonic() - began < 5.0
    assert rejections(seen) == ["max_wait"]
    assert bh.statistics().queued == 0
    bh.release()
    assert_idle(bh)


def test_max_wait_on_a_fake_clock_for_a_thread() -> None:
    clock = FakeClock(autojump=False)
    bh = rs.Bulkhead(max_concurrent=1, max_queue=1, max_wait=1.0, clock=clock)
    assert bh.try_acquire()
    outcome: list[str] = []

    def run() -> None:
        try:
            bh.acquire()
            outcome.append("acquired")
        except rs.BulkheadFullError:
            outcome.append("rejected")

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: clock.sleeps == [1.0] and bh.statistics().queued == 1)
    clock.advance(0.5)
    time.sleep(0.02)
    assert outcome == []
    assert bh.statistics().queued == 1
    clock.advance(0.5)
    thread.join(5.0)
    assert outcome == ["rejected"]
    assert bh.statistics().queued == 0


@pytest.mark.anyio
async def test_max_wait_on_a_fake_clock_for_a_task() -> None:
    clock = FakeClock(autojump=False)
    bh = rs.Bulkhead(max_concurrent=1, max_queue=1, max_wait=1.0, clock=clock)
    assert bh.try_acquire()
    outcome: list[str] = []

    async def run() -> None:
        try:
            await bh.acquire_async()
            outcome.append("acquired")
        except rs.BulkheadFullError:
            outcome.append("rejected")

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await until(lambda: clock.sleeps == [1.0])
        clock.advance(0.9)
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert outcome == []
        clock.advance(0.1)
    assert outcome == ["rejected"]
    assert bh.statistics().queued == 0


@pytest.mark.anyio
async def test_a_permit_that_comes_in_time_is_taken_on_a_fake_clock() -> None:
    clock = FakeClock(autojump=False)
    bh = rs.Bulkhead(max_concurrent=1, max_queue=1, max_wait=1.0, clock=clock)
    assert bh.try_acquire()
    outcome: list[str] = []

    async def run() -> None:
        await bh.acquire_async()
        outcome.append("acquired")
        bh.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await until(lambda: clock.sleeps == [1.0])
        clock.advance(0.5)
        bh.release()
    assert outcome == ["acquired"]
    assert_idle(bh)


def test_wait_is_clipped_to_the_ambient_deadline_for_a_thread() -> None:
    seen: list[Event] = []
    bh = rs.Bulkhead(max_concurrent=1, max_queue=1, max_wait=None, hooks=[seen.append])
    assert bh.try_acquire()
    began = time.monotonic()
    with deadline_scope(system_clock, 0.05), pytest.raises(rs.BulkheadFullError):
        bh.acquire()
    assert 0.03 <= time.monotonic() - began < 5.0
    assert rejections(seen) == ["deadline"]


@pytest.mark.anyio
async def test_wait_is_clipped_to_the_ambient_deadline_for_a_task() -> None:
    seen: list[Event] = []
    bh = rs.Bulkhead(max_concurrent=1, max_queue=1, max_wait=10.0, hooks=[seen.append])
    assert bh.try_acquire()
    began = time.monotonic()
    with deadline_scope(system_clock, 0.05), pytest.raises(rs.BulkheadFullError):
        await bh.acquire_async()
    assert 0.03 <= time.monotonic() - began < 5.0
    assert rejections(seen) == ["deadline"]


def test_no_time_left_rejects_at_once_but_a_free_permit_is_still_taken() -> None:
    seen: list[Event] = []
    bh = rs.Bulkhead(max_concurrent=1, max_queue=1, hooks=[seen.append])
    with deadline_scope(FakeClock(), 0.0):
        assert bh.call(lambda: 7) == 7
        assert bh.try_acquire()
        with pytest.raises(rs.BulkheadFullError):
            bh.call(lambda: 7)
    assert rejections(seen) == ["deadline"]
    assert bh.statistics().queued == 0


# -- FIFO hand-off ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_permits_are_handed_off_in_fifo_order_to_tasks() -> None:
    bh = rs.Bulkhead(max_concurrent=1, max_queue=10)
    order: list[int] = []

    async def work(i: int) -> None:
        order.append(i)
        await anyio.lowlevel.checkpoint()

    assert bh.try_acquire()
    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(bh.call_async, work, i)
            await until(lambda i=i: bh.statistics().queued == i + 1)  # type: ignore[misc]
        bh.release()
        # no barging: the permit went to the first waiter, not to whoever asks now
        assert not bh.try_acquire()
        assert bh.statistics().in_use == 1
    assert order == list(range(8))
    assert_idle(bh)


def test_permits_are_handed_off_in_fifo_order_to_threads() -> None:
    bh = rs.Bulkhead(max_concurrent=1, max_queue=10)
    order: list[int] = []
    assert bh.try_acquire()
    threads = []
    for i in range(6):
        thread = threading.Thread(target=bh.call, args=(order.append, i))
        thread.start()
        threads.append(thread)
        wait_until(lambda i=i: bh.statistics().queued == i + 1)  # type: ignore[misc]
    bh.release()
    for thread in threads:
        thread.join(5.0)
    assert order == list(range(6))
    assert_idle(bh)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sync_and_async_callers_share_one_count_and_one_queue(backend: str) -> None:
    bh = rs.Bulkhead(max_concurrent=1, max_queue=5)
    order: list[str] = []

    async def async_work() -> None:
        order.append("async")
        await anyio.lowlevel.checkpoint()

    assert bh.try_acquire()  # held by this thread
    with start_blocking_portal(backend) as portal:
        future = portal.start_task_soon(bh.call_async, async_work)
        wait_until(lambda: bh.statistics().queued == 1)
        thread = threading.Thread(target=bh.call, args=(order.append, "sync"))
        thread.start()
        wait_until(lambda: bh.statistics().queued == 2)
        # this thread hands its permit to a task in another thread's event loop, and that task
        # hands it on to a blocked thread
        bh.release()
        future.result(5.0)
        thread.join(5.0)
    assert order == ["async", "sync"]
    assert_idle(bh)


# -- permits never leak ----------------------------------------------------------------------------


def test_exceptions_release_the_permit() -> None:
    bh = rs.Bulkhead(max_concurrent=2)

    def boom() -> None:
        raise ValueError("boom")

    class Stop(BaseException):
        pass

    def stop() -> None:
        raise Stop

    for _ in range(5):
        with pytest.raises(ValueError, match="boom"):
            bh.call(boom)
        with pytest.raises(Stop):
            bh.call(stop)
    assert_idle(bh)
    assert bh.statistics().completed_total == 10


@pytest.mark.anyio
async def test_async_exceptions_release_the_permit() -> None:
    bh = rs.Bulkhead(max_concurrent=2)

    async def boom() -> None:
        await anyio.lowlevel.checkpoint()
        raise ValueError("boom")

    for _ in range(5):
        with pytest.raises(ValueError, match="boom"):
            await bh.call_async(boom)
    assert_idle(bh)


@pytest.mark.anyio
async def test_cancellation_while_running_releases_the_permit() -> None:
    bh = rs.Bulkhead(max_concurrent=2, max_queue=5)
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(bh.call_async, anyio.sleep_forever)
        await until(lambda: bh.statistics().queued == 2)
        tg.cancel_scope.cancel()
    assert_idle(bh)
    stats = bh.statistics()
    assert (stats.acquired_total, stats.completed_total) == (2, 2)


@pytest.mark.anyio
async def test_cancellation_while_queued_leaves_the_queue_and_leaks_nothing() -> None:
    bh = rs.Bulkhead(max_concurrent=1, max_queue=5)
    entered: list[str] = []

    async def work(tag: str) -> None:
        entered.append(tag)

    assert bh.try_acquire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(bh.call_async, work, "first")
        await until(lambda: bh.statistics().queued == 1)
        victim = anyio.CancelScope()

        async def queued_then_cancelled() -> None:
            with victim:
                await bh.call_async(work, "cancelled")

        tg.start_soon(queued_then_cancelled)
        await until(lambda: bh.statistics().queued == 2)
        victim.cancel()
        await until(lambda: bh.statistics().queued == 1)
        assert bh.statistics().in_use == 1
        bh.release()
    assert entered == ["first"]
    assert_idle(bh)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_waiter_cancelled_just_after_the_hand_off_passes_the_permit_on() -> None:
    bh = rs.Bulkhead(max_concurrent=1, max_queue=5)
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
    bh.release()  # hands the permit to `first`...
    first.cancel()  # ...which is cancelled before it resumes: it must pass the permit on
    await asyncio.wait([first, second], timeout=5.0)
    assert first.cancelled()
    assert entered == ["second"]
    assert_idle(bh)
    stats = bh.statistics()
    assert (stats.acquired_total, stats.completed_total) == (2, 2)


def test_a_waiter_whose_event_loop_is_gone_passes_the_permit_on() -> None:
    bh = rs.Bulkhead(max_concurrent=1, max_queue=5)
    assert bh.try_acquire()
    loop = asyncio.new_event_loop()
    stranded: list[asyncio.Task[None]] = []

    async def strand_a_waiter() -> None:
        stranded.append(asyncio.ensure_future(bh.acquire_async()))
        await until(lambda: bh.statistics().queued == 1)

    def run_loop() -> None:
        loop.run_until_complete(strand_a_waiter())
        loop.close()  # the waiter task is never resumed nor cancelled

    thread = threading.Thread(target=run_loop)
    thread.start()
    thread.join(5.0)
    assert bh.statistics().queued == 1
    bh.release()  # the waiter's loop is closed: the permit must not vanish with it
    assert_idle(bh)
    # when the stranded coroutine is finally closed, it must not hand the permit on a second time
    stranded[0].get_coro().close()
    assert_idle(bh)
    assert bh.try_acquire()
    assert not bh.try_acquire()


# -- configuration, statistics, surface ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_concurrent": -3}, "max_concurrent"),
        ({"max_concurrent": 2.5}, "max_concurrent"),
        ({"max_concurrent": True}, "max_concurrent"),
        ({"max_queue": -1}, "max_queue"),
        ({"max_queue": 1.5}, "max_queue"),
        ({"max_wait": -0.1}, "max_wait"),
        ({"max_wait": math.inf}, "max_wait"),
        ({"max_wait": math.nan}, "max_wait"),
        ({"max_wait": "1"}, "max_wait"),
        ({"name": ""}, "name"),
        ({"clock": object()}, "clock"),
    ],
)
def test_validation_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        rs.Bulkhead(**kwargs)


def test_defaults_and_describe() -> None:
    bh = rs.Bulkhead()
    assert (bh.max_concurrent, bh.max_queue, bh.max_wait, bh.name) == (10, 0, None, "bulkhead")
    assert "max_concurrent=10" in bh.describe()
    with pytest.raises(AttributeError):
        bh.max_concurrent = 3  # type: ignore[misc]
    assert rs.Bulkhead(max_wait=0).max_wait == 0


def test_statistics_are_right() -> None:
    bh = rs.Bulkhead(max_concurrent=3, max_queue=4)
    assert bh.statistics() == rs.BulkheadStatistics(
        max_concurrent=3,
        max_queue=4,
        in_use=0,
        available=3,
        queued=0,
        acquired_total=0,
        rejected_total=0,
        completed_total=0,
    )
    assert bh.call(lambda: 1) == 1
    assert bh.try_acquire()
    assert bh.try_acquire()
    stats = bh.statistics()
    assert (stats.in_use, stats.available, stats.acquired_total, stats.completed_total) == (
        2,
        1,
        3,
        1,
    )
    assert bh.try_acquire()
    assert not bh.try_acquire()
    stats = bh.statistics()
    assert (stats.in_use, stats.available, stats.rejected_total) == (3, 0, 1)
    for _ in range(3):
        bh.release()
    stats = bh.statistics()
    assert (stats.in_use, stats.available, stats.acquired_total, stats.completed_total) == (
        0,
        3,
        4,
        4,
    )


def test_decorates_sync_and_async_functions() -> None:
    bh = rs.Bulkhead(max_concurrent=1)

    @bh
    def add(a: int, b: int) -> int:
        return a + b

    @bh
    async def add_async(a: int, b: int) -> int:
        await anyio.lowlevel.checkpoint()
        return a + b

    assert add(1, 2) == 3
    assert anyio.run(add_async, 2, 3) == 5
    assert anyio.run(add_async, 3, 4, backend="trio") == 7
    assert_idle(bh)


# -- the model -------------------------------------------------------------------------------------


class _Task:
    """A task in the machine's event loop that takes a permit (waiting if it must) and holds it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.status = "new"
        self.scope: anyio.CancelScope | None = None
        self.done: anyio.Event | None = None


class BulkheadMachine(RuleBasedStateMachine):
    """Permits taken by this thread (try_acquire) and by tasks in a trio loop in another thread
    (acquire_async with the queue), released and cancelled in any order, against a simple model."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.portal: BlockingPortal = self.stack.enter_context(start_blocking_portal("trio"))
        self.bh: rs.Bulkhead | None = None
        self.tasks: list[_Task] = []
        self.free = 0
        self.queue: list[_Task] = []
        self.holders: list[_Task] = []
        self.held_here = 0
        self.acquired = self.completed = self.rejected = 0

    @initialize(max_concurrent=st.integers(1, 3), max_queue=st.integers(0, 3))
    def make(self, max_concurrent: int, max_queue: int) -> None:
        self.bh = rs.Bulkhead(max_concurrent=max_concurrent, max_queue=max_queue)
        self.free = max_concurrent

    # -- the model's moves

    def _grant(self) -> None:
        if self.queue:
            self.holders.append(self.queue.pop(0))
            self.acquired += 1
        else:
            self.free += 1

    def _settle(self) -> None:
        self.portal.call(trio.testing.wait_all_tasks_blocked)

    async def _worker(self, task: _Task) -> None:
        assert self.bh is not None
        task.done = anyio.Event()
        with anyio.CancelScope() as scope:
            task.scope = scope
            task.status = "queued"
            try:
                await self.bh.acquire_async()
            except rs.BulkheadFullError:
                task.status = "rejected"
                return
            task.status = "holding"
            try:
                await task.done.wait()
            finally:
                self.bh.release()
            task.status = "finished"
        if scope.cancelled_caught:
            task.status = "cancelled"

    # -- rules

    @rule()
    def try_acquire(self) -> None:
        assert self.bh is not None
        expected = self.free > 0
        assert self.bh.try_acquire() is expected
        if expected:
            self.free -= 1
            self.held_here += 1
            self.acquired += 1
        else:
            self.rejected += 1

    @precondition(lambda self: self.held_here > 0)
    @rule()
    def release_here(self) -> None:
        assert self.bh is not None
        self.bh.release()  # from this thread, possibly waking a task in the trio thread
        self.held_here -= 1
        self.completed += 1
        self._grant()
        self._settle()

    @rule()
    def start_task(self) -> None:
        task = _Task(len(self.tasks))
        self.tasks.append(task)
        self.portal.start_task_soon(self._worker, task)
        self._settle()
        assert self.bh is not None
        if self.free:
            self.free -= 1
            self.acquired += 1
            self.holders.append(task)
        elif len(self.queue) < self.bh.max_queue:
            self.queue.append(task)
        else:
            self.rejected += 1
            assert task.status == "rejected"

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def finish_task(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from(self.holders))
        assert task.done is not None
        self.portal.call(task.done.set)
        self._settle()
        assert task.status == "finished"
        self.holders.remove(task)
        self.completed += 1
        self._grant()

    @precondition(lambda self: self.holders or self.queue)
    @rule(data=st.data())
    def cancel_task(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from(self.holders + self.queue))
        assert task.scope is not None
        self.portal.call(task.scope.cancel)
        self._settle()
        assert task.status == "cancelled"
        if task in self.queue:
            self.queue.remove(task)
        else:
            self.holders.remove(task)
            self.completed += 1
            self._grant()

    @precondition(lambda self: self.held_here > 0 and self.queue)
    @rule()
    def release_here_and_cancel_the_next_at_once(self) -> None:
        """The first waiter is handed a permit and cancelled before it resumes."""
        assert self.bh is not None
        bh = self.bh
        task = self.queue[0]
        assert task.scope is not None
        scope = task.scope

        def both() -> None:
            bh.release()
            scope.cancel()

        self.portal.call(both)
        self._settle()
        assert task.status == "cancelled"
        self.held_here -= 1
        self.completed += 1
        self._grant()  # to `task`, which runs until its first checkpoint...
        self.holders.remove(task)
        self.completed += 1
        self._grant()  # ...and passes the permit on

    # -- invariants

    @invariant()
    def matches_the_model(self) -> None:
        if self.bh is None:
            return
        stats = self.bh.statistics()
        assert stats.in_use <= stats.max_concurrent
        assert stats.in_use + stats.available == stats.max_concurrent
        assert stats.queued <= stats.max_queue
        assert stats.available == self.free
        assert stats.queued == len(self.queue)
        assert stats.in_use == self.held_here + len(self.holders)
        assert (stats.acquired_total, stats.completed_total, stats.rejected_total) == (
            self.acquired,
            self.completed,
            self.rejected,
        )
        assert all(t.status == "queued" for t in self.queue)
        assert all(t.status == "holding" for t in self.holders)

    def teardown(self) -> None:
        try:
            if self.bh is not None:
                for task in self.queue + self.holders:
                    assert task.scope is not None
                    self.portal.call(task.scope.cancel)
                self._settle()
                for _ in range(self.held_here):
                    self.bh.release()
                assert_idle(self.bh)
        finally:
            self.stack.close()


TestBulkheadMachine = BulkheadMachine.TestCase
TestBulkheadMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


# -- an adaptive limit (AIMDLimit; the limit's own tests are in test_limits.py) --------------------


@given(
    ops=st.lists(
        st.sampled_from(["try_acquire", "on_success", "on_failure", "on_timeout", "release"]),
        max_size=80,
    ),
    initial=st.integers(1, 6),
)
@settings(max_examples=200, deadline=None)
def test_adaptive_statistics_follow_a_simple_model(ops: list[str], initial: int) -> None:
    aimd = AIMDLimit(initial=initial, min_limit=1, max_limit=8, backoff=0.5)
    bh = rs.Bulkhead(max_concurrent=aimd)
    limit, held = initial, 0
    for op in ops:
        if op == "try_acquire":
            assert bh.try_acquire() is (held < limit)
            held += held < limit
        elif held:
            if op == "on_success":
                bh.on_success(0.1)
                limit = aimd.next_limit(limit, held)
            elif op == "on_failure":
                bh.on_failure(0.1)
                limit = aimd.next_limit(limit, held, dropped=True)
            elif op == "on_timeout":
                bh.on_failure(0.1, TimeoutError())
                limit = aimd.next_limit(limit, held, dropped=True)
            else:
                bh.release()
            held -= 1
        stats = bh.statistics()
        assert 1 <= stats.max_concurrent <= 8
        assert (stats.max_concurrent, stats.in_use, stats.available) == (
            limit,
            held,
            max(0, limit - held),
        )


def test_adaptive_describe_and_fields() -> None:
    aimd = AIMDLimit(initial=5)
    bh = rs.Bulkhead(max_concurrent=aimd, max_queue=3)
    assert bh.max_concurrent is aimd
    assert "AIMDLimit(initial=5" in bh.describe()
    assert bh.statistics().max_concurrent == 5
