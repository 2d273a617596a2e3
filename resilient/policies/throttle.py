"""Adaptive throttling: the client sheds its own requests when the backend stops accepting them.

Client-side adaptive throttling from Google's *Site Reliability Engineering* (chapter 21,
"Handling Overload"). Over a sliding window (2 minutes by default) the client counts

* ``requests``: calls the application tried, *including* those this throttle rejected itself;
* ``accepts``: calls the backend accepted (answered with something other than an overload error),

and rejects each new call locally with probability::

    p = max(0, (requests − k × accepts) / (requests + 1))

While the backend accepts everything, ``p`` is 0. When it starts refusing, the client sends up to
about ``k`` times what gets accepted and sheds the rest without a network round trip; as the refusals
age out of the window, traffic returns. ``k = 2`` (the book's choice) lets through twice the
accepted rate: aggressive enough to find recovery quickly, still cutting a dead backend's load to
a trickle. Lower ``k`` sheds earlier.

Rejection is `ThrottledError` (a `RejectedError`); the function is not called. Cancellation counts
as neither a request nor an accept. See docs/decisions/0008-adaptive-protection.md.
"""

from __future__ import annotations

import math
import random as _random
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from resilient._clock import Clock
from resilient._errors import ThrottledError
from resilient._policy import Policy
from resilient.events import CallRejected, Hook, emit
from resilient.policies._common import (
    ExceptionMatcher,
    check_positive,
    compile_matcher,
    discard,
    discard_shielded,
    resolve_clock,
)
from resilient.policies._windows import TimeWindow

__all__ = ["AdaptiveThrottle", "ThrottleStatistics"]

T = TypeVar("T")

# The window is kept as a ring of this many slices: a call is forgotten between
# ``window × (1 - 1/_SLICES)`` and ``window`` seconds after it was recorded.
_SLICES = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class ThrottleStatistics:
    """A snapshot of an `AdaptiveThrottle`: its window's counts and the rejection probability.

    ``requests`` and ``accepts`` are over the window (requests include the calls the throttle
    rejected itself); ``probability`` is ``max(0, (requests − k·accepts) / (requests + 1))``;
    ``throttled_total`` counts every local rejection since the throttle was made.

    Example::

        stats = throttle.statistics()
        gauge.set(stats.probability)
    """

    requests: float
    accepts: float
    probability: float
    throttled_total: int


class _Runtime:
    """The throttle's mutable state; every read and write happens under ``lock``.

    The window's ``calls`` are requests and its ``failures`` the requests not accepted (refused by
    the backend or by this throttle), so an accepted call, the common case, is one ``add_calls``.
    """

    __slots__ = ("lock", "throttled", "window")

    def __init__(self, window: float) -> None:
        self.lock = threading.Lock()
        self.window = TimeWindow(window, _SLICES)
        self.throttled = 0


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class AdaptiveThrottle(Policy):
    """Reject calls locally, with probability ``max(0, (requests − k·accepts) / (requests + 1))``.

    Counts over the last ``window`` seconds. A call that raises an exception matched by ``on``
    (default: any ``Exception``), or returns a value for which ``result(value)`` is true, was not
    accepted; anything else was. Every call is a request, including those the throttle rejects
    with `ThrottledError` (the SRE book's rule: that is what makes the throttle ease off on its own
    as old refusals age out). ``random`` is drawn only when the probability is above 0.

    Example::

        search = rs.AdaptiveThrottle(name="search", on=(ConnectionError, Overloaded))

        @search
        def query(text: str) -> list[Hit]: ...

        @search
        async def query_async(text: str) -> list[Hit]: ...

        search.probability()   # 0.0 while the backend accepts everything

    A returned value can mean "refused" too (an HTTP 429 or 503)::

        rs.AdaptiveThrottle(result=lambda response: response.status_code in (429, 503))

    The permission protocol serves code that is not one call (the HTTP transport)::

        if not throttle.try_acquire():      # counted as a request; raises nothing
            raise throttle.rejection()      # or shed the request some other way
        try:
            response = send()
        except BaseException:
            throttle.release()              # cancelled: counts as nothing
            raise
        if response.status_code in (429, 503):
            throttle.on_rejected()
        else:
            throttle.on_accepted()
    """

    name: str = "adaptive_throttle"
    k: float = 2.0
    window: float = 120.0
    on: ExceptionMatcher = Exception
    result: Callable[[Any], bool] | None = None
    clock: Clock | None = None
    random: Callable[[], float] | None = None
    hooks: Sequence[Hook] = ()
    _clock: Clock = field(init=False, repr=False)
    _rand: Callable[[], float] = field(init=False, repr=False)
    _refused: Callable[[BaseException], bool] = field(init=False, repr=False)
    _rt: _Runtime = field(init=False, repr=False)

    def __post_init__(self) -> None:
        k = self.k
        if not (
            isinstance(k, (int, float)) and not isinstance(k, bool) and math.isfinite(k) and k >= 1
        ):
            raise ValueError(f"k must be a finite number >= 1, got {k!r}")
        check_positive("window", self.window)
        if self.result is not None and not callable(self.result):
            raise ValueError(f"result must be a predicate, got {self.result!r}")
        if self.random is not None and not callable(self.random):
            raise ValueError(f"random must be a callable returning [0, 1), got {self.random!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "_clock", resolve_clock(self.clock))
        object.__setattr__(self, "_rand", self.random or _random.random)
        object.__setattr__(self, "_refused", compile_matcher(self.on, "on"))
        object.__setattr__(self, "_rt", _Runtime(self.window))
        object.__setattr__(self, "hooks", tuple(self.hooks))

    def describe(self) -> str:
        return f"AdaptiveThrottle(name={self.name!r}, k={self.k}, window={self.window})"

    # -- reading ---------------------------------------------------------------------------------

    def _probability_locked(self, now: float) -> float:
        requests, refused, _ = self._rt.window.totals(now)
        accepts = requests - refused
        return max(0.0, (requests - self.k * accepts) / (requests + 1.0))

    def probability(self) -> float:
        """The probability that the next call is rejected locally, from the window as it is now.

        Example::

            throttle.probability()   # 40 / 101 after 100 requests with 30 accepts, k = 2
        """
        rt = self._rt
        with rt.lock:
            return self._probability_locked(self._clock.monotonic())

    def statistics(self) -> ThrottleStatistics:
        """A consistent snapshot of the window's requests and accepts and the probability.

        Example::

            stats = throttle.statistics()
            assert stats.requests >= stats.accepts
        """
        rt = self._rt
        with rt.lock:
            now = self._clock.monotonic()
            requests, refused, _ = rt.window.totals(now)
            return ThrottleStatistics(
                requests=requests,
                accepts=requests - refused,
                probability=self._probability_locked(now),
                throttled_total=rt.throttled,
            )

    def metrics(self) -> dict[str, float]:
        """The `statistics` as a dict (as `CircuitBreaker.metrics` gives its own).

        Example::

            for key, value in throttle.metrics().items():
                gauges[key].set(value)
        """
        stats = self.statistics()
        return {
            "requests": stats.requests,
            "accepts": stats.accepts,
            "probability": stats.probability,
            "throttled_total": stats.throttled_total,
        }

    # -- the permission protocol -------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Ask to send one request: True to go ahead (then report it), False when shed locally.

        A False answer is counted as a request that was not accepted, and raises nothing and
        emits nothing: use `rejection` for the error and the event.

        Example::

            if throttle.try_acquire():
                ...
        """
        return self._admit() is None

    def acquire(self) -> None:
        """Like `try_acquire`, but raise `ThrottledError` (and emit `CallRejected`) when shed.

        Example::

            throttle.acquire()
            ...  # then on_accepted() / on_rejected() / release()
        """
        p = self._admit()
        if p is not None:
            raise self.rejection(p)

    def rejection(self, probability: float | None = None) -> ThrottledError:
        """The `ThrottledError` for a shed call; emits `CallRejected` to the hooks.

        Example::

            if not throttle.try_acquire():
                raise throttle.rejection()
        """
        if probability is None:
            probability = self.probability()
        emit(self.hooks, CallRejected(self.name, "adaptive_throttle", "throttled"))
        return ThrottledError(
            f"adaptive throttle {self.name!r} shed the call locally: the backend has been "
            f"refusing requests (rejection probability {probability:.3f}, k={self.k})",
            name=self.name,
            probability=probability,
        )

    def on_accepted(self) -> None:
        """Report that the backend accepted a permitted request.

        Example::

            throttle.on_accepted()
        """
        rt = self._rt
        with rt.lock:
            rt.window.add_calls(self._clock.monotonic())

    def on_rejected(self) -> None:
        """Report that the backend refused a permitted request (an overload answer or error).

        Example::

            throttle.on_rejected()
        """
        rt = self._rt
        with rt.lock:
            rt.window.add(self._clock.monotonic(), 1.0, 1.0)

    def release(self) -> None:
        """Give back a permit whose request was never sent or was cancelled: counts as nothing.

        Example::

            throttle.release()
        """

    def on_success(self, duration: float) -> None:
        """The breaker's protocol, shared: the same as `on_accepted`.

        Example::

            throttle.on_success(0.012)
        """
        self.on_accepted()

    def on_failure(self, duration: float, exc: BaseException | None = None) -> None:
        """The breaker's protocol, shared: `on_rejected` when ``exc`` is None or matched by ``on``,
        `on_accepted` for another exception, nothing for cancellation.

        Example::

            throttle.on_failure(0.5, ConnectionError())
        """
        if exc is None or self._refused(exc):
            self.on_rejected()
        elif isinstance(exc, Exception):
            self.on_accepted()

    # -- deciding --------------------------------------------------------------------------------

    def _admit(self) -> float | None:
        """None when the call may go ahead; else the probability it was shed with (and counted)."""
        rt = self._rt
        with rt.lock:
            p = self._probability_locked(self._clock.monotonic())
        if p <= 0.0 or self._rand() >= p:
            return None
        with rt.lock:
            rt.window.add(self._clock.monotonic(), 1.0, 1.0)
            rt.throttled += 1
        return p

    def _record(self, accepted: bool) -> None:
        rt = self._rt
        with rt.lock:
            if accepted:
                rt.window.add_calls(self._clock.monotonic())
            else:
                rt.window.add(self._clock.monotonic(), 1.0, 1.0)

    # -- drivers ---------------------------------------------------------------------------------

    def _execute(self, thunk: Callable[[], T]) -> T:
        p = self._admit()
        if p is not None:
            raise self.rejection(p)
        try:
            result = thunk()
        except Exception as exc:
            self._record(not self._refused(exc))
            raise
        # BaseException (cancellation, KeyboardInterrupt) passes through and counts as nothing.
        try:
            self._record(self.result is None or not self.result(result))
        except BaseException:  # ``result=`` raised: nobody takes the result
            discard(result)
            raise
        return result

    async def _execute_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        p = self._admit()
        if p is not None:
            raise self.rejection(p)
        try:
            result = await thunk()
        except Exception as exc:
            self._record(not self._refused(exc))
            raise
        try:
            self._record(self.result is None or not self.result(result))
        except BaseException:  # ``result=`` raised: nobody takes the result
            await discard_shielded(result)
            raise
        return result
