from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.lowlevel
import pybreaker
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import resilient as rs
from resilient.events import CircuitStateChanged, Event
from resilient.testing import FakeClock


def state(breaker: rs.CircuitBreaker) -> str:
    # a function, so that mypy does not narrow the property between calls
    return breaker.state


def fail() -> None:
    raise OSError("down")


def ok() -> str:
    return "ok"


def run(breaker: rs.CircuitBreaker, fn: Any) -> str:
    """Call through the breaker and say what happened."""
    try:
        fn_result = breaker.call(fn)
    except rs.CircuitOpenError:
        return "rejected"
    except OSError:
        return "failed"
    return str(fn_result)


def test_opens_at_the_failure_rate_and_not_before_min_calls() -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(failure_rate=0.5, min_calls=10, clock=clock)
    for _ in range(9):
        assert run(breaker, fail) == "failed"
    assert state(breaker) == "closed"  # 9 of 9 failed, but fewer than min_calls
    assert run(breaker, fail) == "failed"
    assert state(breaker) == "open"
    assert run(breaker, ok) == "rejected"


def test_failure_rate_just_below_the_threshold_stays_closed() -> None:
    breaker = rs.CircuitBreaker(failure_rate=0.5, min_calls=10, clock=FakeClock())
    for _ in range(6):
        run(breaker, ok)
    for _ in range(4):
        run(breaker, fail)
    assert state(breaker) == "closed"  # 4 / 10 < 0.5
    run(breaker, ok)
    run(breaker, fail)  # 5 / 12
    assert state(breaker) == "closed"
    run(breaker, fail)  # 6 / 13
    assert state(breaker) == "closed"
    run(breaker, fail)  # 7 / 14 = 0.5
    assert state(breaker) == "open"


def test_time_window_forgets_old_failures() -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(failure_rate=0.5, min_calls=4, window=10.0, clock=clock)
    for _ in range(3):
        run(breaker, fail)
    clock.advance(11.0)
    run(breaker, fail)  # the three old failures have left the window: 1 call
    assert state(breaker) == "closed"
    assert breaker.metrics()["calls"] == 1


def test_successes_leave_the_time_window_as_they_would_one_by_one() -> None:
    # Closed-state successes are counted without the lock and given to the window in batches;
    # a batch must land in the slices where its calls happened, and leave with them.
    clock = FakeClock()
    breaker = rs.CircuitBreaker(window=10.0, clock=clock)
    for _ in range(100):  # one every 0.1 s, for 10 s
        run(breaker, ok)
        clock.advance(0.1)
    clock.advance(5.0)
    assert 45 <= breaker.metrics()["calls"] <= 55  # the last 5 s of them, give or take a slice


def test_a_batch_of_successes_never_straddles_two_slices() -> None:
    # Whole calls per slice: when a slice leaves the window, exactly its calls leave with it.
    clock = FakeClock()
    breaker = rs.CircuitBreaker(window=10.0, clock=clock)  # ten slices of 1 s
    clock.advance(0.5)
    run(breaker, ok)  # slice 0
    clock.advance(0.75)
    run(breaker, ok)  # slice 1
    clock.advance(9.0)  # t = 10.25: slice 0 has left the window, slice 1 has not
    assert breaker.metrics()["calls"] == 1


def test_a_quiet_spell_splits_the_batches_of_successes() -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(window=10.0, clock=clock)
    for _ in range(5):
        run(breaker, ok)
    clock.advance(1000.0)  # a long quiet spell, then a burst: the burst alone is in the window
    for _ in range(20):
        run(breaker, ok)
        clock.advance(0.01)
    assert breaker.metrics()["calls"] == pytest.approx(20)
    for _ in range(20):
        run(breaker, ok)
    clock.advance(15.0)  # a batch not yet taken leaves the window when its calls do
    assert breaker.metrics()["calls"] == pytest.approx(0)


def test_a_batch_of_successes_counts_before_the_failures_after_it() -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(failure_rate=0.5, min_calls=10, clock=clock)
    for _ in range(10):
        run(breaker, ok)
    for _ in range(9):
        run(breaker, fail)
    assert state(breaker) == "closed"  # 9 / 19
    run(breaker, fail)  # 10 / 20
    assert state(breaker) == "open"
    assert breaker.metrics()["calls"] == 20


def test_a_batch_of_successes_in_a_count_window_pushes_out_older_failures() -> None:
    breaker = rs.CircuitBreaker(failure_rate=0.5, min_calls=4, window_calls=4, clock=FakeClock())
    for _ in range(3):
        run(breaker, fail)
    for _ in range(50):  # more than a batch and more than the window
        run(breaker, ok)
    assert breaker.metrics() | {} == {
        "calls": 4,
        "failures": 0,
        "slow_calls": 0,
        "failure_rate": 0.0,
        "consecutive_failures": 0,
        "probes_in_flight": 0,
    }


def test_count_window_keeps_the_last_n_calls() -> None:
    breaker = rs.CircuitBreaker(failure_rate=0.5, min_calls=4, window_calls=4, clock=FakeClock())
    run(breaker, fail)
    for _ in range(4):
        run(breaker, ok)
    assert breaker.metrics()["failures"] == 0  # the failure was pushed out
    run(breaker, fail)
    assert state(breaker) == "closed"  # 1 / 4
    run(breaker, fail)  # 2 / 4
    assert state(breaker) == "open"


def test_a_count_window_smaller_than_min_calls_still_judges_the_failure_rate() -> None:
    # A window of 10 calls never holds 20: with the default min_calls the rate was never judged.
    breaker = rs.CircuitBreaker(failure_rate=0.5, window_calls=10, clock=FakeClock())
    assert breaker.min_calls == 10
    for _ in range(10):
        run(breaker, fail)
    assert state(breaker) == "open"


class _Raising(pybreaker.CircuitBreakerListener):
    def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("listener bug")


def _breaker_whose_code_raises(where: str, clock: FakeClock) -> rs.CircuitBreaker:
    """A half-open breaker whose ``on=``, ``result=`` or listener raises on its probe."""
    broken = {"armed": False}

    def on(exc: BaseException) -> bool:
        if broken["armed"]:
            raise RuntimeError("predicate bug")
        return True

    def result(value: object) -> bool:
        if broken["armed"]:
            raise RuntimeError("predicate bug")
        return False

    breaker = rs.CircuitBreaker(
        consecutive_failures=1,
        open_for=1.0,
        clock=clock,
        on=on if where == "on" else OSError,
        result=result if where == "result" else None,
    )
    run(breaker, fail)
    clock.advance(1.0)
    assert state(breaker) == "half_open"
    broken["armed"] = True
    if where == "listener":
        object.__setattr__(breaker, "listeners", (_Raising(),))
        object.__setattr__(breaker, "_plain", False)
    return breaker


@pytest.mark.parametrize("where", ["on", "result", "listener"])
def test_a_probe_whose_predicate_or_listener_raises_gives_its_slot_back(where: str) -> None:
    # The probe's slot was gone for good: every later call was refused, the breaker half open
    # forever. The user's error still reaches the caller.
    clock = FakeClock()
    breaker = _breaker_whose_code_raises(where, clock)
    with pytest.raises(RuntimeError):
        breaker.call(fail if where == "on" else ok)
    assert breaker.try_acquire()  # the slot is there to take


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["on", "result", "listener"])
async def test_an_async_probe_whose_predicate_or_listener_raises_gives_its_slot_back(
    where: str,
) -> None:
    clock = FakeClock()
    breaker = _breaker_whose_code_raises(where, clock)

    async def afail() -> None:
        raise OSError("down")

    async def aok() -> str:
        return "ok"

    with pytest.raises(RuntimeError):
        await breaker.call_async(afail if where == "on" else aok)
    assert breaker.try_acquire()  # the slot is there to take


class _RaisesOnHalfOpen(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if getattr(new_state, "name", new_state) == "half-open":
            raise RuntimeError("listener bug")


def test_a_listener_raising_as_the_probe_is_admitted_gives_the_slot_back() -> None:
    # The move to half-open is announced after the probe's slot is taken: the caller never got
    # a permit to give back, and the breaker stayed half open for good.
    clock = FakeClock()
    breaker = rs.CircuitBreaker(
        consecutive_failures=1, open_for=1.0, clock=clock, listeners=[_RaisesOnHalfOpen()]
    )
    run(breaker, fail)
    clock.advance(1.0)
    with pytest.raises(RuntimeError, match="listener bug"):
        breaker.call(ok)
    assert breaker.try_acquire()


def test_consecutive_failures_open_regardless_of_min_calls() -> None:
    breaker = rs.CircuitBreaker(consecutive_failures=3, min_calls=100, clock=FakeClock())
    run(breaker, fail)
    run(breaker, fail)
    run(breaker, ok)  # resets the streak
    run(breaker, fail)
    run(breaker, fail)
    assert state(breaker) == "closed"
    run(breaker, fail)
    assert state(breaker) == "open"


def test_slow_calls_open_the_breaker() -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(
        min_calls=4, slow_call_duration=1.0, slow_call_rate=0.5, clock=clock
    )

    def slow() -> str:
        clock.advance(2.0)
        return "slow"

    run(breaker, ok)
    run(breaker, ok)
    run(breaker, slow)
    assert state(breaker) == "closed"  # 3 calls < min_calls
    run(breaker, slow)  # 2 of 4 slow
    assert state(breaker) == "open"


def test_exceptions_not_matching_on_count_as_successes() -> None:
    breaker = rs.CircuitBreaker(consecutive_failures=2, on=OSError, clock=FakeClock())

    def bad_input() -> None:
        raise ValueError("the dependency answered: bad input")

    for _ in range(5):
        with pytest.raises(ValueError, match="bad input"):
            breaker.call(bad_input)
    assert state(breaker) == "closed"


def test_result_predicate_marks_failures() -> None:
    breaker = rs.CircuitBreaker(
        consecutive_failures=2, result=lambda status: status >= 500, clock=FakeClock()
    )
    assert breaker.call(lambda: 503) == 503
    assert breaker.call(lambda: 503) == 503
    assert state(breaker) == "open"


def test_open_then_half_open_then_closed_after_probes() -> None:
    clock = FakeClock()
    seen: list[Event] = []
    breaker = rs.CircuitBreaker(
        consecutive_failures=1, open_for=5.0, half_open_probes=2, clock=clock, hooks=[seen.append]
    )
    run(breaker, fail)
    assert state(breaker) == "open"
    with pytest.raises(rs.CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.retry_after == 5.0
    assert info.value.name == "circuit_breaker"
    clock.advance(5.0)
    assert state(breaker) == "half_open"
    assert run(breaker, ok) == "ok"
    assert state(breaker) == "half_open"  # one of two probes
    assert run(breaker, ok) == "ok"
    assert state(breaker) == "closed"
    changes = [(e.old, e.new) for e in seen if isinstance(e, CircuitStateChanged)]
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_failed_probe_reopens_for_longer_up_to_the_cap() -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(
        consecutive_failures=1, open_for=1.0, open_for_multiplier=2.0, max_open_for=5.0, clock=clock
    )
    run(breaker, fail)
    waits = []
    for _ in range(5):
        retry_after = breaker.retry_after()
        assert retry_after is not None
        waits.append(retry_after)
        clock.advance(retry_after)
        assert run(breaker, fail) == "failed"  # the probe fails: open again, longer
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    clock.advance(5.0)
    run(breaker, ok)
    assert state(breaker) == "closed"
    run(breaker, fail)
    assert breaker.retry_after() == 1.0  # growth resets once closed


@pytest.mark.parametrize("k", [1, 3])
def test_half_open_admits_exactly_k_concurrent_probes_threads(k: int) -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(consecutive_failures=1, half_open_probes=k, clock=clock)
    run(breaker, fail)
    clock.advance(5.0)
    entered = 0
    rejected = 0
    lock = threading.Lock()
    release = threading.Event()

    def probe() -> None:
        nonlocal entered
        with lock:
            entered += 1
        assert release.wait(10.0)
        raise OSError("still down")

    def caller() -> None:
        nonlocal rejected
        try:
            breaker.call(probe)
        except rs.CircuitOpenError:
            with lock:
                rejected += 1
        except OSError:
            pass

    threads = [threading.Thread(target=caller) for _ in range(50)]
    for t in threads:
        t.start()
    # every caller either entered or was rejected before any probe finishes
    for _ in range(1000):
        with lock:
            if entered + rejected == 50:
                break
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join(10.0)
    assert entered == k
    assert rejected == 50 - k
    assert state(breaker) == "open"


@pytest.mark.anyio
@pytest.mark.parametrize("k", [1, 3])
async def test_half_open_admits_exactly_k_concurrent_probes_tasks(k: int) -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(consecutive_failures=1, half_open_probes=k, clock=clock)
    run(breaker, fail)
    clock.advance(5.0)
    entered = 0
    rejected = 0
    release = anyio.Event()

    async def probe() -> None:
        nonlocal entered
        entered += 1
        await release.wait()
        raise OSError("still down")

    async def caller() -> None:
        nonlocal rejected
        try:
            await breaker.call_async(probe)
        except rs.CircuitOpenError:
            rejected += 1
        except OSError:
            pass

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(caller)
        while entered + rejected < 50:
            await anyio.lowlevel.checkpoint()
        release.set()
    assert entered == k
    assert rejected == 50 - k
    assert state(breaker) == "open"


@pytest.mark.anyio
async def test_async_failures_open_the_breaker() -> None:
    # pybreaker records an awaited failure as a success and never opens (PEERS.md).
    breaker = rs.CircuitBreaker(consecutive_failures=3, clock=FakeClock())

    @breaker
    async def down() -> None:
        await anyio.lowlevel.checkpoint()
        raise OSError("down")

    for _ in range(3):
        with pytest.raises(OSError):
            await down()
    assert state(breaker) == "open"
    with pytest.raises(rs.CircuitOpenError):
        await down()


@pytest.mark.anyio
async def test_cancelled_call_changes_no_counts_and_returns_its_permit() -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(consecutive_failures=1, half_open_probes=1, clock=clock)

    # closed: cancelled calls count as nothing
    for _ in range(5):
        with anyio.move_on_after(0.01):
            await breaker.call_async(anyio.sleep_forever)
    assert breaker.metrics()["calls"] == 0
    assert state(breaker) == "closed"

    # half-open: a cancelled probe gives its permit back, and the next probe gets it
    run(breaker, fail)
    clock.advance(5.0)
    with anyio.move_on_after(0.01):
        await breaker.call_async(anyio.sleep_forever)
    assert state(breaker) == "half_open"
    assert breaker.metrics()["probes_in_flight"] == 0

    async def fine() -> str:
        return "ok"

    assert await breaker.call_async(fine) == "ok"
    assert state(breaker) == "closed"


def test_lock_is_not_held_across_the_call() -> None:
    # pybreaker serializes every call through one lock; here ten calls are inside at once.
    breaker = rs.CircuitBreaker()
    barrier = threading.Barrier(10, timeout=10.0)
    results: list[int] = []

    def inside() -> int:
        return barrier.wait()

    threads = [
        threading.Thread(target=lambda: results.append(breaker.call(inside))) for _ in range(10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15.0)
    assert sorted(results) == list(range(10))


def test_permission_protocol() -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(consecutive_failures=2, clock=clock)
    assert breaker.try_acquire()
    breaker.on_failure(0.1, OSError("x"))
    assert breaker.try_acquire()
    breaker.on_failure(0.1)
    assert state(breaker) == "open"
    assert not breaker.try_acquire()
    clock.advance(5.0)
    assert breaker.try_acquire()  # the probe
    assert not breaker.try_acquire()
    breaker.release()  # unused: give it back
    assert breaker.try_acquire()
    breaker.on_success(0.1)
    assert state(breaker) == "closed"


def test_manual_open_and_reset() -> None:
    breaker = rs.CircuitBreaker(clock=FakeClock())
    breaker.open()
    assert state(breaker) == "open"
    breaker.reset()
    assert state(breaker) == "closed"


class RecordingListener(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []
        self.failures = 0
        self.successes = 0

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.changes.append((old_state.name, new_state.name))

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.failures += 1

    def success(self, cb: Any) -> None:
        self.successes += 1


def test_pybreaker_listeners_are_called() -> None:
    clock = FakeClock()
    listener = RecordingListener()
    breaker = rs.CircuitBreaker(consecutive_failures=2, listeners=[listener], clock=clock)
    run(breaker, ok)
    run(breaker, fail)
    run(breaker, fail)
    clock.advance(5.0)
    run(breaker, ok)
    assert listener.successes == 2
    assert listener.failures == 2
    assert listener.changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_from_pybreaker_adopts_settings_and_listeners() -> None:
    listener = RecordingListener()

    class NotFound(Exception):
        pass

    legacy = pybreaker.CircuitBreaker(
        fail_max=3,
        reset_timeout=7,
        success_threshold=2,
        exclude=[NotFound],
        listeners=[listener],
        name="legacy",
    )
    breaker = rs.CircuitBreaker.from_pybreaker(legacy, clock=FakeClock())
    assert breaker.name == "legacy"
    assert breaker.consecutive_failures == 3
    assert breaker.open_for == 7.0
    assert breaker.half_open_probes == 2

    def missing() -> None:
        raise NotFound

    for _ in range(5):
        with pytest.raises(NotFound):
            breaker.call(missing)
    assert state(breaker) == "closed"  # excluded exceptions are not failures
    for _ in range(3):
        run(breaker, fail)
    assert state(breaker) == "open"
    assert listener.changes == [("closed", "open")]


def test_from_pybreaker_shares_state_through_its_storage() -> None:
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    one = rs.CircuitBreaker.from_pybreaker(
        pybreaker.CircuitBreaker(fail_max=2, reset_timeout=30, state_storage=storage)
    )
    two = rs.CircuitBreaker.from_pybreaker(
        pybreaker.CircuitBreaker(fail_max=2, reset_timeout=30, state_storage=storage)
    )
    run(one, fail)
    run(two, fail)  # the failure counter is shared: two failures in all
    assert storage.state == "open"
    assert run(one, ok) == "rejected"
    assert run(two, ok) == "rejected"
    # a pybreaker process closing the shared breaker closes ours too
    storage.state = pybreaker.STATE_CLOSED
    assert run(two, ok) == "ok"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_rate": 0}, "failure_rate"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"window": 0}, "window"),
        ({"window_calls": 0}, "window_calls"),
        ({"min_calls": 0}, "min_calls"),
        ({"consecutive_failures": 0}, "consecutive_failures"),
        ({"open_for": -1}, "open_for"),
        ({"open_for_multiplier": 0.5}, "open_for_multiplier"),
        ({"max_open_for": 1.0}, "max_open_for"),
        ({"half_open_probes": 0}, "half_open_probes"),
        ({"slow_call_duration": 0}, "slow_call_duration"),
        ({"slow_call_rate": 2}, "slow_call_rate"),
        ({"name": ""}, "name"),
        ({"on": "OSError"}, "on"),
    ],
)
def test_bad_configuration_names_the_field_and_value(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        rs.CircuitBreaker(**kwargs)
    assert repr(kwargs[field]) in str(info.value)


class BreakerModel(RuleBasedStateMachine):
    """Drive the breaker with a count window and compare it with a reference model at each step."""

    N, MIN, RATE, K, OPEN_FOR = 5, 3, 0.6, 2, 4.0

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.breaker = rs.CircuitBreaker(
            failure_rate=self.RATE,
            window_calls=self.N,
            min_calls=self.MIN,
            open_for=self.OPEN_FOR,
            open_for_multiplier=2.0,
            max_open_for=16.0,
            half_open_probes=self.K,
            clock=self.clock,
        )
        self.state = "closed"
        self.outcomes: list[bool] = []  # True = failed
        self.open_until = 0.0
        self.streak = 0
        self.probes = 0

    def _open(self, *, from_half_open: bool) -> None:
        self.streak = self.streak + 1 if from_half_open else 0
        self.open_until = self.clock.monotonic() + min(16.0, self.OPEN_FOR * 2**self.streak)
        self.state = "open"
        self.probes = 0

    def _admit(self) -> bool:
        if self.state == "open":
            if self.clock.monotonic() < self.open_until:
                return False
            self.state = "half_open"
            self.probes = 0
        return True

    def _expect(self, failed: bool) -> None:
        admitted = self._admit()
        result = run(self.breaker, fail if failed else ok)
        if not admitted:
            assert result == "rejected"
            return
        assert result == ("failed" if failed else "ok")
        if self.state == "closed":
            self.outcomes = [*self.outcomes, failed][-self.N :]
            n, f = len(self.outcomes), sum(self.outcomes)
            if failed and n >= self.MIN and f >= self.RATE * n:
                self._open(from_half_open=False)
        elif failed:
            self._open(from_half_open=True)
        else:
            self.probes += 1
            if self.probes >= self.K:
                self.state, self.outcomes, self.streak = "closed", [], 0

    @rule()
    def success(self) -> None:
        self._expect(failed=False)

    @rule()
    def failure(self) -> None:
        self._expect(failed=True)

    @rule()
    def cancelled(self) -> None:
        admitted = self._admit()
        if admitted:
            assert self.breaker.try_acquire()
            self.breaker.release()
        else:
            assert not self.breaker.try_acquire()

    @precondition(lambda self: self.state == "open")
    @rule(seconds=st.sampled_from([1.0, 4.0, 8.0, 16.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def same_state(self) -> None:
        expected = self.state
        if expected == "open" and self.clock.monotonic() >= self.open_until:
            expected = "half_open"
        assert state(self.breaker) == expected


BreakerModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_matches_its_model = BreakerModel.TestCase
