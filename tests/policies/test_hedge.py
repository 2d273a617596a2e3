from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import trio.testing

import resilient as rs
from resilient._deadline import deadline_scope
from resilient.events import Event, HedgeLaunched
from resilient.testing import FakeClock
from tests.policies._waits import wait_until

# A hedging bug tends to hang a call rather than fail it: fail fast instead.
pytestmark = pytest.mark.timeout(10)

AsyncFn = Callable[[], Awaitable[object]]
SyncFn = Callable[[], object]


class Resource:
    """A result that must be closed when it is thrown away (like an HTTP response)."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


class AsyncResource:
    def __init__(self) -> None:
        self.aclosed = False
        self.closed = False

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.aclosed = True

    def close(self) -> None:  # pragma: no cover - must not be called when aclose exists
        self.closed = True


def async_attempts(*fns: AsyncFn) -> tuple[AsyncFn, list[int]]:
    """A thunk whose n-th call runs ``fns[n]``, and the list of the calls made."""
    calls: list[int] = []

    async def thunk() -> object:
        n = len(calls)
        calls.append(n)
        return await fns[n]()

    return thunk, calls


def sync_attempts(*fns: SyncFn) -> tuple[SyncFn, list[int]]:
    calls: list[int] = []
    lock = threading.Lock()

    def thunk() -> object:
        with lock:
            n = len(calls)
            calls.append(n)
        return fns[n]()

    return thunk, calls


async def hang_forever() -> object:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


def value(result: object) -> AsyncFn:
    async def fn() -> object:
        await anyio.lowlevel.checkpoint()
        return result

    return fn


def failure(exc: Exception) -> AsyncFn:
    async def fn() -> object:
        await anyio.lowlevel.checkpoint()
        raise exc

    return fn


# -- async ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_slow_primary_loses_to_hedge_and_is_cancelled() -> None:
    cancelled = False

    async def primary() -> object:
        nonlocal cancelled
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise
        raise AssertionError("unreachable")

    thunk, calls = async_attempts(primary, value("hedge"))
    seen: list[Event] = []
    hedge = rs.Hedge(delay=0.05, clock=FakeClock(), hooks=[seen.append])
    assert await hedge.call_async(thunk) == "hedge"
    assert calls == [0, 1]
    assert cancelled
    assert seen == [HedgeLaunched("hedge", 1, 0.05)]


@pytest.mark.anyio
async def test_fast_primary_launches_no_hedge() -> None:
    clock = FakeClock(autojump=False)  # time never moves: only a bug could start a hedge
    seen: list[Event] = []
    hedge = rs.Hedge(delay=0.05, clock=clock, hooks=[seen.append])
    for _ in range(5):
        thunk, calls = async_attempts(value("primary"), value("hedge"))
        assert await hedge.call_async(thunk) == "primary"
        assert calls == [0]
    assert seen == []
    assert clock.sleeps == [0.05] * 5


@pytest.mark.anyio
async def test_hedges_start_every_delay_up_to_max_hedges() -> None:
    clock = FakeClock(autojump=False)
    seen: list[Event] = []
    hedge = rs.Hedge(delay=0.05, max_hedges=3, clock=clock, hooks=[seen.append])
    finish = anyio.Event()

    async def last() -> object:
        await finish.wait()
        return "third hedge"

    thunk, calls = async_attempts(hang_forever, hang_forever, hang_forever, last, value("extra"))
    results: list[object] = []

    async def run() -> None:
        results.append(await hedge.call_async(thunk))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        assert calls == [0]
        for launched in (2, 3, 4):
            clock.advance(0.05)
            await anyio.wait_all_tasks_blocked()
            assert len(calls) == launched
        clock.advance(10.0)  # long past another delay: a fourth hedge would start now
        await anyio.wait_all_tasks_blocked()
        assert calls == [0, 1, 2, 3]
        finish.set()
    assert results == ["third hedge"]
    events = [e for e in seen if isinstance(e, HedgeLaunched)]
    assert [e.hedge for e in events] == [1, 2, 3]
    assert [e.after for e in events] == pytest.approx([0.05, 0.10, 0.15])


@pytest.mark.anyio
async def test_failing_primary_starts_the_hedge_at_once() -> None:
    clock = FakeClock(autojump=False)  # never advanced: the delay never elapses
    seen: list[Event] = []
    thunk, calls = async_attempts(failure(ConnectionError("down")), value("hedge"))
    hedge = rs.Hedge(delay=10.0, clock=clock, hooks=[seen.append])
    assert await hedge.call_async(thunk) == "hedge"
    assert calls == [0, 1]
    assert seen == [HedgeLaunched("hedge", 1, 0.0)]


@pytest.mark.anyio
async def test_two_failures_at_once_start_two_hedges_at_once() -> None:
    clock = FakeClock(autojump=False)
    thunk, calls = async_attempts(
        failure(OSError("a")), failure(OSError("b")), failure(OSError("c")), value("third")
    )
    hedge = rs.Hedge(delay=10.0, max_hedges=3, clock=clock)
    assert await hedge.call_async(thunk) == "third"
    assert calls == [0, 1, 2, 3]
    assert clock.monotonic() == 0.0


@pytest.mark.anyio
async def test_all_attempts_failing_raise_the_last_failure_not_a_group() -> None:
    clock = FakeClock(autojump=False)
    thunk, calls = async_attempts(
        failure(ValueError("first")), failure(ValueError("second")), failure(ValueError("third"))
    )
    hedge = rs.Hedge(delay=1.0, max_hedges=2, clock=clock)
    with pytest.raises(ValueError, match="third") as info:
        await hedge.call_async(thunk)
    assert type(info.value) is ValueError
    assert calls == [0, 1, 2]
    assert any("all 3 attempts failed" in note for note in getattr(info.value, "__notes__", []))


@pytest.mark.anyio
async def test_single_failure_without_hedges_left_is_raised_untouched() -> None:
    thunk, _ = async_attempts(failure(KeyError("k")))
    budget = rs.RetryBudget(ratio=0.5, min_per_second=0.0, clock=FakeClock())
    with pytest.raises(KeyError) as info:
        await rs.Hedge(budget=budget, clock=FakeClock()).call_async(thunk)
    assert type(info.value) is KeyError
    assert getattr(info.value, "__notes__", []) == []


@pytest.mark.anyio
async def test_no_budget_token_means_no_hedge() -> None:
    clock = FakeClock(autojump=False)
    # Each call deposits 0.5 tokens and there is no floor: the first call cannot hedge, the second can.
    budget = rs.RetryBudget(ratio=0.5, min_per_second=0.0, ttl=10.0, clock=clock)
    seen: list[Event] = []
    hedge = rs.Hedge(delay=1.0, budget=budget, clock=clock, hooks=[seen.append])

    thunk, calls = async_attempts(failure(ConnectionError("first call")), value("hedge"))
    with pytest.raises(ConnectionError, match="first call"):
        await hedge.call_async(thunk)
    assert calls == [0]
    assert seen == []

    thunk, calls = async_attempts(failure(ConnectionError("second call")), value("hedge"))
    assert await hedge.call_async(thunk) == "hedge"
    assert calls == [0, 1]
    assert len(seen) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["close", "aclose"])
async def test_a_losers_late_result_is_closed(kind: str) -> None:
    hedge_won = anyio.Event()
    resource: Resource | AsyncResource = Resource() if kind == "close" else AsyncResource()

    async def primary() -> object:
        # Ignores cancellation and returns after the hedge has already won.
        with anyio.CancelScope(shield=True):
            await hedge_won.wait()
        return resource

    async def fast() -> object:
        hedge_won.set()
        return "hedge"

    thunk, _ = async_attempts(primary, fast)
    assert await rs.Hedge(delay=0.05, clock=FakeClock()).call_async(thunk) == "hedge"
    if isinstance(resource, Resource):
        assert resource.closed.is_set()
    else:
        assert resource.aclosed
        assert not resource.closed


@pytest.mark.anyio
async def test_cancelling_the_caller_cancels_every_attempt_and_propagates() -> None:
    both_running = anyio.Event()
    running: list[int] = []
    cancelled: list[int] = []

    def hanging(n: int) -> AsyncFn:
        async def fn() -> object:
            running.append(n)
            if len(running) == 2:
                both_running.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled.append(n)
                raise
            raise AssertionError("unreachable")

        return fn

    thunk, _ = async_attempts(hanging(0), hanging(1))
    hedge = rs.Hedge(delay=0.05, clock=FakeClock())
    returned = False
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_when_both_run() -> None:
                await both_running.wait()
                scope.cancel()

            tg.start_soon(cancel_when_both_run)
            await hedge.call_async(thunk)
            returned = True
    assert scope.cancelled_caught
    assert not returned
    assert sorted(cancelled) == [0, 1]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_asyncio_task_cancel_reaches_every_attempt() -> None:
    both_running = asyncio.Event()
    cancelled: list[int] = []
    running: list[int] = []

    def hanging(n: int) -> AsyncFn:
        async def fn() -> object:
            running.append(n)
            if len(running) == 2:
                both_running.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(n)
                raise
            raise AssertionError("unreachable")

        return fn

    thunk, _ = async_attempts(hanging(0), hanging(1))
    task = asyncio.create_task(rs.Hedge(delay=0.05, clock=FakeClock()).call_async(thunk))
    await both_running.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cancelled) == [0, 1]
    if sys.version_info >= (3, 11):  # the test's own task carries no stray cancellation
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0


@pytest.mark.anyio
async def test_ambient_deadline_and_context_flow_into_every_attempt() -> None:
    clock = FakeClock(autojump=False)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[tuple[float | None, str]] = []

    async def primary() -> object:
        seen.append((rs.time_left(), var.get()))
        raise ConnectionError

    async def hedge_attempt() -> object:
        seen.append((rs.time_left(), var.get()))
        return "ok"

    thunk, _ = async_attempts(primary, hedge_attempt)
    var.set("set by caller")
    with deadline_scope(clock, 5.0):
        assert await rs.Hedge(clock=clock).call_async(thunk) == "ok"
    assert seen == [(5.0, "set by caller"), (5.0, "set by caller")]


@pytest.mark.anyio
async def test_default_clock_hedges_in_real_time() -> None:
    thunk, calls = async_attempts(hang_forever, value("hedge"))
    started = time.monotonic()
    assert await rs.Hedge(delay=0.01).call_async(thunk) == "hedge"
    assert time.monotonic() - started < 5.0  # bounded; the primary would hang forever
    assert calls == [0, 1]


@pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}))],
)
@pytest.mark.anyio
async def test_trio_mock_clock_drives_the_default_clock() -> None:
    async def slow() -> object:
        await anyio.sleep(60.0)
        return "primary"

    thunk, calls = async_attempts(slow, value("hedge"))
    seen: list[Event] = []
    started = anyio.current_time()
    assert await rs.Hedge(delay=2.0, hooks=[seen.append]).call_async(thunk) == "hedge"
    assert anyio.current_time() - started == pytest.approx(2.0)
    assert calls == [0, 1]
    assert [type(e) for e in seen] == [HedgeLaunched]


@pytest.mark.anyio
async def test_decorator_works_for_async_functions() -> None:
    hedge = rs.Hedge(clock=FakeClock(autojump=False))

    @hedge
    async def double(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return 2 * x

    assert await double(21) == 42


# -- sync ----------------------------------------------------------------------------------------


def test_sync_hedge_wins_over_a_slow_primary_in_real_time() -> None:
    release = threading.Event()
    late = Resource()

    def primary() -> object:
        release.wait(10.0)
        return late

    thunk, calls = sync_attempts(primary, lambda: "hedge")
    seen: list[Event] = []
    hedge = rs.Hedge(delay=0.02, name="sync-real", hooks=[seen.append])
    try:
        started = time.monotonic()
        assert hedge.call(thunk) == "hedge"
        assert time.monotonic() - started < 5.0  # the primary alone would take 10 s
        assert calls == [0, 1]
        assert len(seen) == 1
        assert isinstance(seen[0], HedgeLaunched)
        assert seen[0].after >= 0.02
        assert not late.closed.is_set()
        release.set()  # the loser finishes in its thread; its result is closed then
        assert late.closed.wait(5.0)
    finally:
        release.set()
        hedge.shutdown()


def test_sync_slow_primary_with_fake_clock_is_deterministic() -> None:
    release = threading.Event()
    late = Resource()

    def primary() -> object:
        release.wait(10.0)
        return late

    thunk, calls = sync_attempts(primary, lambda: "hedge")
    seen: list[Event] = []
    hedge = rs.Hedge(delay=0.05, clock=FakeClock(), hooks=[seen.append])
    try:
        assert hedge.call(thunk) == "hedge"
        assert calls == [0, 1]
        assert seen == [HedgeLaunched("hedge", 1, 0.05)]
        release.set()
        assert late.closed.wait(5.0)
    finally:
        release.set()
        hedge.shutdown()


def test_sync_fast_primary_launches_no_hedge() -> None:
    clock = FakeClock(autojump=False)
    seen: list[Event] = []
    hedge = rs.Hedge(delay=0.05, clock=clock, hooks=[seen.append])
    try:
        for _ in range(5):
            thunk, calls = sync_attempts(lambda: "primary", lambda: "hedge")
            assert hedge.call(thunk) == "primary"
            assert calls == [0]
        assert seen == []
    finally:
        clock.advance(1.0)  # lets any timer thread still asleep on the fake clock finish
        hedge.shutdown()


def test_sync_failing_primary_starts_the_hedge_at_once() -> None:
    clock = FakeClock(autojump=False)
    seen: list[Event] = []

    def primary() -> object:
        raise ConnectionError("down")

    thunk, calls = sync_attempts(primary, lambda: "hedge")
    hedge = rs.Hedge(delay=10.0, clock=clock, hooks=[seen.append])
    try:
        assert hedge.call(thunk) == "hedge"
        assert calls == [0, 1]
        assert seen == [HedgeLaunched("hedge", 1, 0.0)]
    finally:
        clock.advance(20.0)
        hedge.shutdown()


def test_sync_all_attempts_failing_raise_the_last_failure() -> None:
    clock = FakeClock(autojump=False)

    def failing(message: str) -> SyncFn:
        def fn() -> object:
            raise ValueError(message)

        return fn

    thunk, calls = sync_attempts(failing("first"), failing("second"), failing("third"))
    hedge = rs.Hedge(delay=10.0, max_hedges=2, clock=clock)
    try:
        with pytest.raises(ValueError, match="third") as info:
            hedge.call(thunk)
        assert type(info.value) is ValueError
        assert calls == [0, 1, 2]
    finally:
        clock.advance(20.0)
        hedge.shutdown()


def test_sync_no_budget_token_means_no_hedge() -> None:
    clock = FakeClock(autojump=False)
    budget = rs.RetryBudget(ratio=0.5, min_per_second=0.0, clock=clock)

    def primary() -> object:
        raise ConnectionError("primary")

    hedge = rs.Hedge(delay=10.0, budget=budget, clock=clock)
    try:
        thunk, calls = sync_attempts(primary, lambda: "hedge")
        with pytest.raises(ConnectionError, match="primary"):
            hedge.call(thunk)
        assert calls == [0]
        thunk, calls = sync_attempts(primary, lambda: "hedge")
        assert hedge.call(thunk) == "hedge"
        assert calls == [0, 1]
    finally:
        clock.advance(20.0)
        hedge.shutdown()


def test_sync_context_and_deadline_flow_into_pool_threads() -> None:
    clock = FakeClock(autojump=False)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[tuple[float | None, str, bool]] = []

    def attempt() -> object:
        in_pool = threading.current_thread() is not threading.main_thread()
        seen.append((rs.time_left(), var.get(), in_pool))
        if len(seen) == 1:
            raise ConnectionError
        return "ok"

    hedge = rs.Hedge(clock=clock)
    try:
        var.set("set by caller")
        with deadline_scope(clock, 5.0):
            assert hedge.call(attempt) == "ok"
        assert seen == [(5.0, "set by caller", True), (5.0, "set by caller", True)]
    finally:
        clock.advance(1.0)
        hedge.shutdown()


def _pool_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"resilient-hedge-{name}_")]


def test_sync_pool_never_grows_beyond_max_workers() -> None:
    gate = threading.Event()
    lock = threading.Lock()
    where: list[str] = []

    def attempt() -> object:
        with lock:
            where.append(threading.current_thread().name)
        gate.wait(10.0)
        return "done"

    hedge = rs.Hedge(delay=0.0, max_hedges=1, max_workers=4, name="bounded")
    results: list[object] = []
    callers = [
        threading.Thread(target=lambda: results.append(hedge.call(attempt))) for _ in range(8)
    ]
    try:
        for t in callers:
            t.start()
        deadline = time.monotonic() + 5.0
        while len(where) < 8 and time.monotonic() < deadline:  # every caller has an attempt going
            time.sleep(0.005)
        time.sleep(0.05)  # room for any hedge that might still be submitted
        assert len(where) >= 8
        assert 0 < len(_pool_threads("bounded")) <= 4
        in_pool = [n for n in where if n.startswith("resilient-hedge-bounded_")]
        assert len(in_pool) <= 4
        assert len(where) > len(in_pool)  # callers that found the pool full ran in their own thread
    finally:
        gate.set()
        for t in callers:
            t.join(10.0)
    assert results == ["done"] * 8
    assert len(_pool_threads("bounded")) <= 4
    hedge.shutdown()
    assert _pool_threads("bounded") == []


def test_sync_decorator_and_call_with_arguments() -> None:
    hedge = rs.Hedge(clock=FakeClock(autojump=False))
    try:

        @hedge
        def add(a: int, b: int = 0) -> int:
            return a + b

        assert add(40, b=2) == 42
        assert hedge.call(add, 1, 2) == 3
    finally:
        hedge.shutdown()


# -- nothing lost when the caller leaves -------------------------------------------------------------


class _Stop(BaseException):
    """What a hook or a Ctrl-C may raise where only Exception is caught."""


def test_a_hook_raising_a_base_exception_as_a_hedge_launches_gives_the_slot_back() -> None:
    # The hedge's pool slot is taken before HedgeLaunched is announced: lost, two such calls
    # would leave a 2-thread policy that never hedges again.
    def hook(event: Event) -> None:
        if isinstance(event, HedgeLaunched):
            raise _Stop

    release = threading.Event()

    def slow() -> str:
        release.wait(5.0)
        return "ok"

    hedge = rs.Hedge(delay=0.01, max_hedges=1, max_workers=2, hooks=[hook])
    try:
        with pytest.raises(_Stop):
            hedge.call(slow)
        release.set()  # the first attempt ends and gives its own slot back
        wait_until(lambda: hedge._rt.slots._value == 2)
    finally:
        release.set()
        hedge.shutdown()


class _Closable:
    closed = False

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.anyio
async def test_an_async_winner_is_closed_when_the_caller_is_cancelled_as_it_wins() -> None:
    hedge = rs.Hedge(delay=10.0, max_hedges=1)
    won = _Closable()
    with anyio.CancelScope() as caller:

        async def fetch() -> _Closable:
            await anyio.sleep(0.01)
            caller.cancel()  # the caller's deadline fires as this attempt wins
            return won

        await hedge.call_async(fetch)
    assert caller.cancelled_caught
    assert won.closed  # nobody took it


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"delay": -0.1}, "delay"),
        ({"delay": float("inf")}, "delay"),
        ({"delay": float("nan")}, "delay"),
        ({"delay": "0.05"}, "delay"),
        ({"max_hedges": 0}, "max_hedges"),
        ({"max_hedges": 1.5}, "max_hedges"),
        ({"max_hedges": True}, "max_hedges"),
        ({"budget": 0.2}, "budget"),
        ({"max_workers": 1}, "max_workers"),
    ],
)
def test_invalid_configuration_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    (value_,) = kwargs.values()
    with pytest.raises(ValueError, match=field) as info:
        rs.Hedge(**kwargs)
    assert repr(value_) in str(info.value)


def test_config_is_frozen_and_compares_by_identity() -> None:
    hedge = rs.Hedge(delay=0.0)
    with pytest.raises(AttributeError):
        hedge.delay = 1.0  # type: ignore[misc]
    assert hedge != rs.Hedge(delay=0.0)
    assert "delay=0.0" in hedge.describe()
