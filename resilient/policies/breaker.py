"""Circuit breaker: stop calling a dependency that is failing, probe it, resume when it recovers.

States and moves::

    closed ──(failure rate ≥ threshold over the window with ≥ min_calls,
    │         or N consecutive failures, or slow-call rate ≥ threshold)──► open
    open ──(open_for elapsed; the next try_acquire)──► half_open
    half_open ──(half_open_probes successes)──► closed
    half_open ──(any probe fails or is slow)──► open, for longer (×multiplier, up to max_open_for)

The breaker never holds its lock across the wrapped call: it decides under the lock, the call runs
unlocked, and the outcome is recorded under the lock again. Half-open admits exactly
``half_open_probes`` concurrent calls; a cancelled call gives its permit back and counts as neither
success nor failure.

With ``store=`` (a `resilient.stores.RedisStore`) the window, the state and the open-until time
live in the store and every process with a breaker of that name shares them. The local runtime
then caches the shared state (a closed breaker admits calls from the cache, without a round trip),
mirrors this process's outcomes, and takes over when the store is unavailable.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from resilient import _later
from resilient._clock import Clock
from resilient._errors import CircuitOpenError
from resilient._policy import Policy
from resilient.events import CallRejected, CircuitStateChanged, Hook, emit
from resilient.policies._common import (
    ExceptionMatcher,
    check_count,
    check_fraction,
    check_positive,
    compile_matcher,
    discard,
    discard_shielded,
    resolve_clock,
)
from resilient.policies._windows import CountWindow, TimeWindow

if TYPE_CHECKING:
    import pybreaker

    from resilient.stores._redis import BreakerHandle, BreakerReply, RedisStore

__all__ = ["CircuitBreaker"]

T = TypeVar("T")
State = Literal["closed", "open", "half_open"]

CLOSED: State = "closed"
OPEN: State = "open"
HALF_OPEN: State = "half_open"

_PYBREAKER_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half-open"}
_FROM_PYBREAKER: dict[str, State] = {"closed": CLOSED, "open": OPEN, "half-open": HALF_OPEN}

#: Returned by ``_acquire`` when the call is refused.
REJECTED = -1
#: Returned by ``_shared_plan`` when the cached shared state cannot decide: ask the store.
ASK = -2

_FROM_STORE: tuple[State, State, State] = (CLOSED, OPEN, HALF_OPEN)


#: Successes `CircuitBreaker._fast_success` counts before the window takes them (at the latest).
_FOLD_EVERY = 32


@dataclass(frozen=True, slots=True)
class _StateView:
    """What pybreaker listeners receive as ``old_state`` / ``new_state``: they read ``.name``."""

    name: str


#: A count window has no time slices: a batch of successes never has to end at one. (One shared
#: float, not a new one per breaker: a replica's breaker is ~1 KB of a 2 KB budget.)
_NO_SLICES = float("inf")


class _Runtime:
    """The breaker's mutable state; every write happens under ``lock``, but for the counts of
    closed-state successes (``ok``, ``ok_since``, ``ok_until``: see `CircuitBreaker._fast_success`)."""

    __slots__ = (
        "consecutive",
        "fold_width",
        "generation",
        "lock",
        "ok",
        "ok_folded",
        "ok_since",
        "ok_until",
        "open_until",
        "opened_for",
        "probe_successes",
        "probes_in_flight",
        "state",
        "streak",
        "window",
    )

    def __init__(self, window: TimeWindow | CountWindow) -> None:
        self.lock = threading.Lock()
        self.state: State = CLOSED
        self.generation = 0
        self.window = window
        self.consecutive = 0
        self.open_until = 0.0
        self.opened_for = 0.0
        self.streak = 0
        self.probes_in_flight = 0
        self.probe_successes = 0
        # Closed-state successes counted without the lock (`CircuitBreaker._fast_success`), the
        # count the window has taken (`_fold_locked`), when the first of those not taken came,
        # and when the window's slice it fell in ends (a batch stays within one slice).
        self.ok = 0
        self.ok_folded = 0
        self.ok_since = 0.0
        self.ok_until = 0.0
        self.fold_width = window.width if isinstance(window, TimeWindow) else _NO_SLICES


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class CircuitBreaker(Policy):
    """Fail fast while a dependency is failing; let a few probes through to find out when it is back.

    Opens when, over the last ``window`` seconds (or the last ``window_calls`` calls), at least
    ``min_calls`` calls were made (at most ``window_calls``) and the share that failed is at least
    ``failure_rate``; or after
    ``consecutive_failures`` failures in a row; or, with ``slow_call_duration`` set, when the share of
    calls that slow reaches ``slow_call_rate``. Exceptions matching ``on`` are failures; other
    exceptions mean the dependency answered, so they count as successes. ``result(value) -> True``
    marks a returned value as a failure. Open calls raise `CircuitOpenError` at once.

    Example::

        payments = rs.CircuitBreaker(name="payments", failure_rate=0.5, min_calls=20)

        @payments
        def charge(order): ...

        if payments.state == "open": ...

    The permission protocol serves code that is not a function call (the HTTP transport, a
    balancer)::

        if breaker.try_acquire():
            started = time.monotonic()
            try:
                response = send()
            except OSError as exc:
                breaker.on_failure(time.monotonic() - started, exc)
                raise
            except BaseException:
                breaker.release()  # cancelled: neither success nor failure
                raise
            breaker.on_success(time.monotonic() - started)

    ``store=`` shares the breaker across processes: every breaker with this ``name`` on that store
    (same Redis, same key prefix) is one breaker, with one window, one state and fleet-wide
    half-open probes (``half_open_probes`` across all processes). Give them the same settings.
    A call in the closed state costs one round trip to record its outcome; with the permission
    protocol that round trip blocks the calling thread. If the store is unavailable the breaker
    runs on local state until it answers again (see `resilient.stores.RedisStore`)::

        store = rs.RedisStore("redis://redis.internal:6379/0")
        payments = rs.CircuitBreaker(name="payments", min_calls=20, store=store)
    """

    name: str = "circuit_breaker"
    failure_rate: float | None = 0.5
    window: float = 10.0
    window_calls: int | None = None
    min_calls: int = 20
    consecutive_failures: int | None = None
    open_for: float = 5.0
    open_for_multiplier: float = 2.0
    max_open_for: float = 60.0
    half_open_probes: int = 1
    slow_call_duration: float | None = None
    slow_call_rate: float = 1.0
    on: ExceptionMatcher = Exception
    result: Callable[[Any], bool] | None = None
    clock: Clock | None = None
    hooks: Sequence[Hook] = ()
    listeners: Sequence[pybreaker.CircuitBreakerListener] = ()
    store: RedisStore | None = None
    _clock: Clock = field(init=False, repr=False)
    _is_failure: Callable[[BaseException], bool] = field(init=False, repr=False)
    _rt: _Runtime = field(init=False, repr=False)
    _plain: bool = field(init=False, repr=False)
    _storage: Any = field(default=None, repr=False)
    _shared: BreakerHandle | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.failure_rate is not None:
            check_fraction("failure_rate", self.failure_rate)
        if (
            self.failure_rate is None
            and self.consecutive_failures is None
            and self.slow_call_duration is None
        ):
            raise ValueError(
                "failure_rate=None needs consecutive_failures or slow_call_duration, "
                "or the breaker could never open"
            )
        check_positive("window", self.window)
        if self.window_calls is not None:
            check_count("window_calls", self.window_calls)
        check_count("min_calls", self.min_calls)
        if self.window_calls is not None and self.min_calls > self.window_calls:
            # A window of N calls never holds more than N: the failure rate would never be
            # judged. As resilience4j does, the minimum is the window's size.
            object.__setattr__(self, "min_calls", self.window_calls)
        if self.consecutive_failures is not None:
            check_count("consecutive_failures", self.consecutive_failures)
        check_positive("open_for", self.open_for)
        if not (
            isinstance(self.open_for_multiplier, (int, float)) and self.open_for_multiplier >= 1
        ):
            raise ValueError(f"open_for_multiplier must be >= 1, got {self.open_for_multiplier!r}")
        check_positive("max_open_for", self.max_open_for)
        if self.max_open_for < self.open_for:
            raise ValueError(
                f"max_open_for must be >= open_for ({self.open_for!r}), got {self.max_open_for!r}"
            )
        check_count("half_open_probes", self.half_open_probes)
        if self.slow_call_duration is not None:
            check_positive("slow_call_duration", self.slow_call_duration)
        check_fraction("slow_call_rate", self.slow_call_rate)
        if self.result is not None and not callable(self.result):
            raise ValueError(f"result must be a predicate, got {self.result!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        window: TimeWindow | CountWindow = (
            CountWindow(self.window_calls)
            if self.window_calls is not None
            else TimeWindow(self.window)
        )
        object.__setattr__(self, "_clock", resolve_clock(self.clock))
        object.__setattr__(self, "_is_failure", compile_matcher(self.on, "on"))
        object.__setattr__(self, "_rt", _Runtime(window))
        object.__setattr__(self, "listeners", tuple(self.listeners))
        shared = None
        if self.store is not None:
            from resilient.stores._redis import RedisStore

            if not isinstance(self.store, RedisStore):
                raise ValueError(f"store must be a RedisStore, got {self.store!r}")
            if self._storage is not None:
                raise ValueError("store= cannot be combined with a pybreaker state storage")
            shared = self.store.bind_breaker(self)
        object.__setattr__(self, "_shared", shared)
        # Nothing but the window to update on a success: the drivers take a fast path.
        plain = (
            not self.listeners
            and self._storage is None
            and shared is None
            and self.result is None
            and self.slow_call_duration is None
        )
        object.__setattr__(self, "_plain", plain)
        object.__setattr__(self, "hooks", tuple(self.hooks))

    # -- interop --------------------------------------------------------------------------------

    @classmethod
    def from_pybreaker(cls, cb: pybreaker.CircuitBreaker, **overrides: Any) -> CircuitBreaker:
        """Adopt a pybreaker breaker's settings, listeners, exclusions and state storage.

        ``fail_max`` becomes ``consecutive_failures``, ``reset_timeout`` becomes ``open_for``
        (not growing, as in pybreaker), ``success_threshold`` becomes ``half_open_probes``, and
        pybreaker's state storage (memory or Redis) keeps being the shared record of the state and
        the failure counter, so processes still on pybreaker and ones on resilient see one breaker.

        Example::

            legacy = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30, state_storage=redis_state)
            breaker = rs.CircuitBreaker.from_pybreaker(legacy)
        """
        settings: dict[str, Any] = {
            "name": cb.name or "circuit_breaker",
            "failure_rate": None,
            "consecutive_failures": cb.fail_max,
            "open_for": float(cb.reset_timeout),
            "open_for_multiplier": 1.0,
            "max_open_for": float(cb.reset_timeout),
            "half_open_probes": cb.success_threshold,
            "on": cb.is_system_error,
            "listeners": tuple(cb.listeners),
            "_storage": cb._state_storage,
        }
        settings.update(overrides)
        return cls(**settings)

    # -- reading ---------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """``"closed"``, ``"open"`` or ``"half_open"`` (an open breaker past its time reads half-open).

        With a store, a cached state older than the store's staleness is read again first: one
        round trip, which blocks (in async code, read it rarely, e.g. for a dashboard)."""
        rt = self._rt
        if self._shared is not None:
            if self._clock.monotonic() - self._shared.synced_at >= self._shared.staleness:
                reply = self._shared.call("peek")
                if reply is not None:
                    self._shared_adopt(reply)
        elif self._storage is not None:
            self._pull_storage()
        if rt.state is OPEN and self._clock.monotonic() >= rt.open_until:
            return HALF_OPEN
        return rt.state

    def retry_after(self) -> float | None:
        """Seconds until an open breaker admits a probe; None unless open."""
        rt = self._rt
        if rt.state is not OPEN:
            return None
        return max(0.0, rt.open_until - self._clock.monotonic())

    def metrics(self) -> dict[str, float]:
        """A snapshot: calls, failures and slow calls in the window, and the failure rate.

        With a store these are this process's own calls (the mirror kept for when the store is
        unavailable), not the fleet's.
        """
        rt = self._rt
        with rt.lock:
            self._fold_locked()
            window = rt.window
            if isinstance(window, TimeWindow):
                calls, failures, slow = window.totals(self._clock.monotonic())
            else:
                calls, failures, slow = window.calls, window.failures, window.slow
            return {
                "calls": calls,
                "failures": failures,
                "slow_calls": slow,
                "failure_rate": failures / calls if calls else 0.0,
                "consecutive_failures": rt.consecutive,
                "probes_in_flight": rt.probes_in_flight,
            }

    # -- the permission protocol --------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Ask to make one call: True if it may go ahead (then report it), False if refused."""
        return self._acquire() != REJECTED

    def release(self) -> None:
        """Give back a permit that was not used, or whose call was cancelled: counts as nothing."""
        self._release(None)

    def on_success(self, duration: float) -> None:
        """Report that a permitted call succeeded after ``duration`` seconds."""
        self._success(None, duration)

    def on_failure(self, duration: float, exc: BaseException | None = None) -> None:
        """Report that a permitted call failed after ``duration`` seconds (with ``exc`` if any)."""
        self._failure(None, duration, exc)

    def reset(self) -> None:
        """Close the breaker and forget its window (an operator's override; fleet-wide with a
        store)."""
        with self._rt.lock:
            change = self._close_locked()
        self._announce(change)
        if self._shared is not None:
            reply = self._shared.call("reset")
            if reply is not None:
                self._shared_adopt(reply)

    def open(self) -> None:
        """Open the breaker now, for ``open_for`` (an operator's override; fleet-wide with a
        store)."""
        with self._rt.lock:
            change = self._open_locked(self._clock.monotonic())
        self._announce(change)
        if self._shared is not None:
            reply = self._shared.call("open")
            if reply is not None:
                self._shared_adopt(reply)

    # Generations tell a probe's outcome from that of a call admitted in an earlier state: only the
    # current generation's outcomes move a half-open breaker. ``None`` means "the current one",
    # which is what callers of the public protocol get.

    def _acquire(self, local: bool = False) -> int:
        rt = self._rt
        if self._shared is not None and not local:
            gen = self._shared_plan()
            if gen != ASK:
                return gen
            claim = self._shared.new_claim()
            reply = self._shared.call("acquire", claim)
            if reply is None:
                return self._acquire(local=True)
            return self._shared_acquired(reply, claim)
        if self._storage is not None:
            self._pull_storage()
        if rt.state is CLOSED:
            return rt.generation
        change = None
        with rt.lock:
            if rt.state is OPEN:
                now = self._clock.monotonic()
                if now < rt.open_until:
                    return REJECTED
                change = self._move_locked(HALF_OPEN)
            if rt.state is HALF_OPEN:
                if rt.probes_in_flight + rt.probe_successes >= self.half_open_probes:
                    gen = REJECTED
                else:
                    rt.probes_in_flight += 1
                    gen = rt.generation
            else:
                gen = rt.generation
        self._announce_admitted(change, gen)
        return gen

    async def _acquire_async(self) -> int:
        """`_acquire` for async code: with a store, its round trip (a stale state's refresh, a
        half-open probe's claim) does not block the event loop."""
        shared = self._shared
        if shared is None:
            return self._acquire()
        gen = self._shared_plan()
        if gen != ASK:
            return gen
        claim = shared.new_claim()
        # Shielded (and bounded by the store's socket timeout): a cancellation between Redis
        # granting the claim and this process recording it would leak the probe. One that came
        # meanwhile is raised once the reply is in, unread: the claim is given back (a release
        # of a claim never granted changes nothing).
        try:
            reply = await _later.shielded(lambda: shared.call_async("acquire", claim))
        except BaseException:
            await _later.shielded(lambda: shared.call_async("release", claim))
            raise
        return self._acquire(local=True) if reply is None else self._shared_acquired(reply, claim)

    def _announce_admitted(
        self, change: tuple[State, State, float | None] | None, gen: int
    ) -> None:
        """Announce ``change``; if a listener raises, give the permit ``gen`` back first (a probe
        slot, a fleet-wide claim): nobody would hold it to give it back."""
        try:
            self._announce(change)
        except BaseException:
            if gen != REJECTED:
                self._release(gen)
            raise

    def _release(self, gen: int | None) -> None:
        rt = self._rt
        if rt.state is CLOSED:
            return
        if self._shared is not None:
            claim = self._shared_claim(gen)
            if claim and not _later.defer(
                functools.partial(self._shared.call_async, "release", claim)
            ):
                self._shared.call("release", claim)
        self._released(gen)

    async def _release_async(self, gen: int) -> None:
        """`_release` for the async driver with a store: its round trip does not block the loop."""
        shared = self._shared
        assert shared is not None
        claim = self._shared_claim(gen)  # ("" unless a probe of this episode)
        if claim:
            await shared.call_async("release", claim)
        self._released(gen)

    def _released(self, gen: int | None) -> None:
        rt = self._rt
        with rt.lock:
            if rt.state is HALF_OPEN and (gen is None or gen == rt.generation):
                rt.probes_in_flight = max(0, rt.probes_in_flight - 1)

    def _success(self, gen: int | None, duration: float, local: bool = False) -> None:
        rt = self._rt
        slow = self.slow_call_duration is not None and duration >= self.slow_call_duration
        if self._shared is not None and not local:
            self._shared_outcome(gen, False, slow, duration, None)
            return
        change = None
        with rt.lock:
            state = rt.state
            if state is CLOSED:
                self._fold_locked()
                rt.consecutive = 0
                if self._record_locked(failed=False, slow=slow):
                    change = self._open_locked(self._clock.monotonic())
            elif state is HALF_OPEN and (gen is None or gen == rt.generation):
                rt.probes_in_flight = max(0, rt.probes_in_flight - 1)
                if slow:
                    change = self._open_locked(self._clock.monotonic())
                else:
                    rt.probe_successes += 1
                    if rt.probe_successes >= self.half_open_probes:
                        change = self._close_locked()
        if self._storage is not None and change is None and rt.state is CLOSED:
            self._storage.reset_counter()
        self._announce(change)
        for listener in self.listeners:
            listener.success(self)  # type: ignore[arg-type]

    def _failure(
        self, gen: int | None, duration: float, exc: BaseException | None, local: bool = False
    ) -> None:
        rt = self._rt
        slow = self.slow_call_duration is not None and duration >= self.slow_call_duration
        if self._shared is not None and not local:
            self._shared_outcome(gen, True, slow, duration, exc)
            return
        change = None
        with rt.lock:
            state = rt.state
            if state is CLOSED:
                self._fold_locked()
                rt.consecutive += 1
                if self._storage is not None:
                    self._storage.increment_counter()
                    rt.consecutive = max(rt.consecutive, self._storage.counter)
                tripped = self._record_locked(failed=True, slow=slow)
                if tripped or (
                    self.consecutive_failures is not None
                    and rt.consecutive >= self.consecutive_failures
                ):
                    change = self._open_locked(self._clock.monotonic())
            elif state is HALF_OPEN and (gen is None or gen == rt.generation):
                rt.probes_in_flight = max(0, rt.probes_in_flight - 1)
                change = self._open_locked(self._clock.monotonic())
        self._announce(change)
        if exc is not None:
            for listener in self.listeners:
                listener.failure(self, exc)  # type: ignore[arg-type]

    # -- transitions (under the lock) ---------------------------------------------------------------

    def _record_locked(self, *, failed: bool, slow: bool) -> bool:
        """Add one outcome to the window; True if the window now says "open"."""
        window = self._rt.window
        if isinstance(window, TimeWindow):
            window.add(self._clock.monotonic(), 1.0, float(failed), float(slow))
        else:
            window.add(failed, slow)
        calls = window.calls
        if calls < self.min_calls:
            return False
        if (
            failed
            and self.failure_rate is not None
            and window.failures >= self.failure_rate * calls
        ):
            return True
        return (
            slow
            and self.slow_call_duration is not None
            and window.slow >= self.slow_call_rate * calls
        )

    def _fold_locked(self) -> None:
        """Give the window the successes `_fast_success` counted since the last fold: at most
        `_FOLD_EVERY`, all within one slice of the window, so they land in the slice where they
        happened, whole, and leave the window with it. Under the lock, before anything reads the
        window or records an outcome that could trip it: a failure after them resets the
        streak."""
        rt = self._rt
        ok = rt.ok
        n = ok - rt.ok_folded
        if n <= 0:
            return
        rt.ok_folded = ok
        rt.consecutive = 0
        rt.window.add_calls_at(rt.ok_since, float(n))

    def _move_locked(self, new: State) -> tuple[State, State, float | None] | None:
        rt = self._rt
        old = rt.state
        if old is new:
            return None
        rt.state = new
        rt.generation += 1
        rt.probes_in_flight = 0
        rt.probe_successes = 0
        if self._storage is not None:
            self._storage.state = _PYBREAKER_NAMES[new]
        return (old, new, rt.opened_for if new is OPEN else None)

    def _open_locked(self, now: float) -> tuple[State, State, float | None] | None:
        rt = self._rt
        was_probing = rt.state is HALF_OPEN
        rt.streak = rt.streak + 1 if was_probing else 0
        rt.opened_for = min(self.max_open_for, self.open_for * self.open_for_multiplier**rt.streak)
        rt.open_until = now + rt.opened_for
        if self._storage is not None:
            self._storage.opened_at = datetime.now(timezone.utc)
        if rt.state is OPEN:
            return None
        return self._move_locked(OPEN)

    def _close_locked(self) -> tuple[State, State, float | None] | None:
        rt = self._rt
        rt.window.clear()
        rt.ok_folded = rt.ok  # successes counted before it opened are history too
        rt.consecutive = 0
        rt.streak = 0
        if self._storage is not None:
            self._storage.reset_counter()
        return self._move_locked(CLOSED)

    def _announce(self, change: tuple[State, State, float | None] | None) -> None:
        if change is None:
            return
        old, new, open_for = change
        emit(self.hooks, CircuitStateChanged(self.name, old, new, open_for))
        for listener in self.listeners:
            listener.state_change(
                self,  # type: ignore[arg-type]
                _StateView(_PYBREAKER_NAMES[old]),  # type: ignore[arg-type]
                _StateView(_PYBREAKER_NAMES[new]),  # type: ignore[arg-type]
            )

    def _pull_storage(self) -> None:
        """Adopt a state another process wrote to the shared pybreaker storage."""
        storage = self._storage
        shared = _FROM_PYBREAKER.get(storage.state, CLOSED)
        rt = self._rt
        if shared is rt.state or (shared is OPEN and rt.state is HALF_OPEN):
            return
        change = None
        with rt.lock:
            if shared is OPEN and rt.state is CLOSED:
                opened_at: datetime | None = storage.opened_at
                now = self._clock.monotonic()
                left = self.open_for
                if opened_at is not None:
                    until = opened_at + timedelta(seconds=self.open_for)
                    left = (until - datetime.now(timezone.utc)).total_seconds()
                rt.opened_for = self.open_for
                rt.open_until = now + max(0.0, left)
                change = self._move_locked(OPEN)
            elif shared is CLOSED and rt.state is not CLOSED:
                rt.window.clear()
                rt.consecutive = 0
                rt.streak = 0
                change = self._move_locked(CLOSED)
        self._announce(change)

    # -- shared state (store=): decisions here, the round trips in the drivers ----------------------

    def _shared_plan(self) -> int:
        """Decide from the cached shared state: a generation, REJECTED, or ASK the store."""
        rt = self._rt
        state = rt.state
        if state is CLOSED:
            shared = self._shared
            assert shared is not None
            if self._clock.monotonic() - shared.synced_at < shared.staleness:
                return rt.generation
        elif state is OPEN and self._clock.monotonic() < rt.open_until:
            return REJECTED
        return ASK

    def _shared_adopt(self, reply: BreakerReply) -> None:
        with self._rt.lock:
            change = self._shared_adopt_locked(reply)
        self._announce(change)

    def _shared_adopt_locked(self, reply: BreakerReply) -> tuple[State, State, float | None] | None:
        """Take the state the store answered with; a change is announced like a local one."""
        rt = self._rt
        shared = self._shared
        assert shared is not None
        now = self._clock.monotonic()
        if reply.generation < shared.generation and now - shared.synced_at < shared.store.key_ttl:
            # A late reply, overtaken by a newer one (threads race from the round trip to the
            # lock; asyncio uses other connections). The shared generation only goes back when
            # the key expired, which takes key_ttl seconds without an update.
            return None
        shared.synced_at = now
        if reply.generation != shared.generation:
            shared.generation = reply.generation
            shared.claims.clear()
            rt.probe_successes = 0
        new = _FROM_STORE[reply.state]
        change = None
        if new is OPEN:
            rt.open_until = now + reply.open_left
            rt.opened_for = reply.opened_for
        if new is not rt.state:
            if new is CLOSED:
                rt.window.clear()
                rt.consecutive = 0
                rt.streak = 0
            change = self._move_locked(new)
        if new is HALF_OPEN:
            rt.probes_in_flight = len(shared.claims)
        return change

    def _shared_acquired(self, reply: BreakerReply, claim: str) -> int:
        """The store's answer to "may I call?": a generation, or REJECTED."""
        rt = self._rt
        with rt.lock:
            change = self._shared_adopt_locked(reply)
            if not reply.granted:
                gen = REJECTED
            else:
                if rt.state is HALF_OPEN:
                    shared = self._shared
                    assert shared is not None
                    shared.claims.append(claim)
                    rt.probes_in_flight = len(shared.claims)
                gen = rt.generation
        self._announce_admitted(change, gen)
        return gen

    def _shared_claim(self, gen: int | None) -> str:
        """The probe claim an outcome settles ("" unless it is a probe of this episode)."""
        rt = self._rt
        shared = self._shared
        assert shared is not None
        if rt.state is not HALF_OPEN:
            return ""
        with rt.lock:
            if shared.claims and (gen is None or gen == rt.generation):
                return shared.claims.pop()
        return ""

    def _shared_recorded(self, reply: BreakerReply, *, failed: bool, slow: bool) -> None:
        """An outcome the store took: mirror it locally (for when the store is down), adopt."""
        rt = self._rt
        with rt.lock:
            if rt.state is CLOSED:
                rt.consecutive = rt.consecutive + 1 if failed else 0
                window = rt.window
                if isinstance(window, TimeWindow):
                    window.add(self._clock.monotonic(), 1.0, float(failed), float(slow))
                else:
                    window.add(failed, slow)
            change = self._shared_adopt_locked(reply)
        self._announce(change)

    async def _execute_shared_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        """The async driver with a store: the round trips never block the event loop."""
        shared = self._shared
        assert shared is not None
        gen = await self._acquire_async()
        if gen == REJECTED:
            raise self._reject()
        try:  # as in `_execute`: the user's code may raise, and the permit goes back then
            self._before_call(thunk)
        except BaseException:
            await _later.shielded(lambda: self._release_async(gen))
            raise
        started = self._clock.monotonic()
        try:
            result = await thunk()
        except Exception as exc:
            await self._shared_outcome_async(gen, started, exc)
            raise
        except BaseException:
            # Cancelled: give a probe permit back (a round trip only when probing).
            await _later.shielded(lambda: self._release_async(gen))
            raise
        try:
            await self._shared_outcome_async(gen, started, None, result)
        except BaseException:  # ``result=`` raised (or cancelled): nobody takes the result
            await discard_shielded(result)
            raise
        return result

    async def _shared_outcome_async(
        self, gen: int, started: float, exc: Exception | None, result: object = None
    ) -> None:
        """`_settle` for the async driver with a store: the round trips do not block the loop."""
        try:
            failed = self._failed(exc, result)
        except BaseException:
            await _later.shielded(lambda: self._release_async(gen))
            raise
        duration = self._clock.monotonic() - started
        slow = self.slow_call_duration is not None and duration >= self.slow_call_duration
        claim = self._shared_claim(gen)  # off our books now: the store must hear its outcome
        await _later.shielded(lambda: self._shared_record(gen, claim, failed, slow, duration, exc))

    async def _shared_record(
        self,
        gen: int | None,
        claim: str,
        failed: bool,
        slow: bool,
        duration: float,
        exc: BaseException | None,
    ) -> None:
        """One outcome sent to the store without blocking the loop, then `_shared_replied`."""
        shared = self._shared
        assert shared is not None
        reply = await shared.call_async("record", claim, failed, slow)
        self._shared_replied(reply, gen, failed, slow, duration, exc)

    def _shared_outcome(
        self,
        gen: int | None,
        failed: bool,
        slow: bool,
        duration: float,
        exc: BaseException | None,
    ) -> None:
        """`_success` / `_failure` with a store: one round trip, inline; inside an async
        request, handed to its `resilient._later.Later` (`_shared_record`, awaited later)."""
        shared = self._shared
        assert shared is not None
        claim = self._shared_claim(gen)
        if _later.defer(
            functools.partial(self._shared_record, gen, claim, failed, slow, duration, exc)
        ):
            return
        reply = shared.call("record", claim, failed, slow)
        self._shared_replied(reply, gen, failed, slow, duration, exc)

    def _shared_replied(
        self,
        reply: BreakerReply | None,
        gen: int | None,
        failed: bool,
        slow: bool,
        duration: float,
        exc: BaseException | None,
    ) -> None:
        """What follows the store's answer to an outcome: adopt it and tell the listeners, or
        (no answer: the store is unavailable) record the outcome on local state."""
        if reply is None:
            if failed:
                self._failure(gen, duration, exc, local=True)
            else:
                self._success(gen, duration, local=True)
            return
        self._shared_recorded(reply, failed=failed, slow=slow)
        for listener in self.listeners:
            if not failed:
                listener.success(self)  # type: ignore[arg-type]
            elif exc is not None:
                listener.failure(self, exc)  # type: ignore[arg-type]

    # -- drivers ---------------------------------------------------------------------------------

    def _reject(self) -> CircuitOpenError:
        retry_after = self.retry_after()
        if self._shared is not None:
            # From the cache: a refused call makes no round trip, however old the cache is.
            rt = self._rt
            opened = rt.state is OPEN and self._clock.monotonic() >= rt.open_until
            state = HALF_OPEN if opened else rt.state
        else:
            state = self.state
        emit(self.hooks, CallRejected(self.name, "circuit_breaker", state))
        return CircuitOpenError(
            f"circuit breaker {self.name!r} is {state}",
            name=self.name,
            retry_after=retry_after,
        )

    def _fast_success(self, gen: int) -> None:
        """A success in the closed state can never trip the breaker: count it and go, without
        the lock; the window takes the batch at its next read or outcome, or when the batch is
        full (`_fold_locked`). Under threads an increment may rarely be lost, which only makes
        the breaker a hair stricter."""
        rt = self._rt
        if rt.state is CLOSED:
            now = self._clock.monotonic()
            pending = rt.ok - rt.ok_folded
            if pending and (pending >= _FOLD_EVERY or now >= rt.ok_until):
                with rt.lock:
                    self._fold_locked()
                pending = 0
            if pending <= 0:  # the first of a batch
                rt.ok_since = now
                rt.ok_until = (int(now / rt.fold_width) + 1) * rt.fold_width
            rt.ok += 1
            return
        self._success(gen, 0.0)

    def _execute(self, thunk: Callable[[], T]) -> T:
        rt = self._rt
        if self._plain and rt.state is CLOSED:
            gen = rt.generation
            try:
                result = thunk()
            except Exception as exc:
                if self._is_failure(exc):
                    self._failure(gen, 0.0, exc)
                else:
                    self._fast_success(gen)
                raise
            except BaseException:
                self._release(gen)
                raise
            self._fast_success(gen)
            return result
        gen = self._acquire()
        if gen == REJECTED:
            raise self._reject()
        # The user's code below (listeners, the ``on=`` and ``result=`` predicates) may raise: the
        # permit goes back then, or a half-open breaker's probe slot would be gone for good.
        try:
            self._before_call(thunk)
        except BaseException:
            self._release(gen)
            raise
        clock = self._clock
        started = clock.monotonic()
        try:
            result = thunk()
        except Exception as exc:
            self._settle(gen, clock.monotonic() - started, exc)
            raise
        except BaseException:
            self._release(gen)
            raise
        try:
            self._settle(gen, clock.monotonic() - started, None, result)
        except BaseException:  # ``result=`` raised: nobody takes the result
            discard(result)
            raise
        return result

    def _settle(
        self, gen: int, duration: float, exc: Exception | None, result: object = None
    ) -> None:
        """Record the call's outcome: it raised ``exc``, or returned ``result``. If the user's
        predicate that judges it raises, the permit goes back (a probe's slot would be lost for
        good) and that error stands."""
        try:
            failed = self._failed(exc, result)
        except BaseException:
            self._release(gen)
            raise
        if failed:
            self._failure(gen, duration, exc)
        else:
            self._success(gen, duration)

    def _failed(self, exc: Exception | None, result: object) -> bool:
        """Was the call a failure: ``exc`` matching ``on``, or ``result`` that ``result=`` marks?
        (Other exceptions mean the dependency answered: a success.)"""
        if exc is not None:
            return self._is_failure(exc)
        return self.result is not None and bool(self.result(result))

    def _before_call(self, thunk: Callable[..., Any]) -> None:
        if self.listeners:
            for listener in self.listeners:
                listener.before_call(self, thunk)  # type: ignore[arg-type]

    async def _execute_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        rt = self._rt
        if self._plain and rt.state is CLOSED:
            gen = rt.generation
            try:
                result = await thunk()
            except Exception as exc:
                if self._is_failure(exc):
                    self._failure(gen, 0.0, exc)
                else:
                    self._fast_success(gen)
                raise
            except BaseException:
                self._release(gen)
                raise
            self._fast_success(gen)
            return result
        if self._shared is not None:
            return await self._execute_shared_async(thunk)
        gen = self._acquire()
        if gen == REJECTED:
            raise self._reject()
        try:  # as in `_execute`: the user's code may raise, and the permit goes back then
            self._before_call(thunk)
        except BaseException:
            self._release(gen)
            raise
        clock = self._clock
        started = clock.monotonic()
        try:
            result = await thunk()
        except Exception as exc:
            self._settle(gen, clock.monotonic() - started, exc)
            raise
        except BaseException:
            self._release(gen)
            raise
        try:
            self._settle(gen, clock.monotonic() - started, None, result)
        except BaseException:  # ``result=`` raised: nobody takes the result
            await discard_shielded(result)
            raise
        return result

    def describe(self) -> str:
        return (
            f"CircuitBreaker(name={self.name!r}, failure_rate={self.failure_rate}, "
            f"min_calls={self.min_calls}, open_for={self.open_for})"
        )
