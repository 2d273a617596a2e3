"""What the policies report: frozen event objects handed to hooks.

A hook is any callable taking one event. Hooks are given per policy (``hooks=``) or for the whole
process with `add_hook`; the logging and OpenTelemetry hooks in `resilient.telemetry` are two such.
Events are emitted only off the success path (a retry, a rejection, a state change...), so hooks cost
nothing while everything works. A hook that raises is logged and otherwise ignored: telemetry never
breaks a call.

Example::

    seen = []
    rs.add_hook(seen.append)
    rs.Retry(on=OSError, wait=0).call(flaky)
    assert isinstance(seen[0], rs.events.RetryScheduled)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

__all__ = [
    "CallRejected",
    "CircuitStateChanged",
    "Event",
    "FallbackUsed",
    "HedgeLaunched",
    "Hook",
    "RetryGaveUp",
    "RetryScheduled",
    "StoreRecovered",
    "StoreUnavailable",
    "TimedOut",
    "add_hook",
    "emit",
    "remove_hook",
]

_log = logging.getLogger("resilient")

BreakerState = Literal["closed", "open", "half_open"]
GiveUpReason = Literal["attempts", "deadline", "budget", "stop"]


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event: ``policy`` is the kind of policy, ``name`` the instance's name.

    Example::

        def hook(event: rs.events.Event) -> None:
            print(event.policy, event.kind, event.name)
    """

    kind: ClassVar[str] = "event"
    policy: ClassVar[str] = "policy"
    name: str


@dataclass(frozen=True, slots=True)
class RetryScheduled(Event):
    """Attempt ``attempt`` failed; the next starts after ``wait`` seconds.

    Example::

        if isinstance(event, rs.events.RetryScheduled):
            metrics.retries.inc(); log.info("retry %d in %.2f s", event.attempt, event.wait)
    """

    kind: ClassVar[str] = "retry_scheduled"
    policy: ClassVar[str] = "retry"
    attempt: int
    wait: float
    exception: BaseException | None = None
    result: object = None


@dataclass(frozen=True, slots=True)
class RetryGaveUp(Event):
    """Retrying stopped after ``attempts`` attempts because of ``reason``.

    Example::

        if isinstance(event, rs.events.RetryGaveUp) and event.reason == "budget":
            alert("retry budget exhausted")
    """

    kind: ClassVar[str] = "retry_gave_up"
    policy: ClassVar[str] = "retry"
    attempts: int
    reason: GiveUpReason
    exception: BaseException | None = None


@dataclass(frozen=True, slots=True)
class CircuitStateChanged(Event):
    """The breaker moved from ``old`` to ``new``; ``open_for`` is set when it opened.

    Example::

        if isinstance(event, rs.events.CircuitStateChanged) and event.new == "open":
            page(f"{event.name} opened for {event.open_for} s")
    """

    kind: ClassVar[str] = "circuit_state_changed"
    policy: ClassVar[str] = "circuit_breaker"
    old: BreakerState
    new: BreakerState
    open_for: float | None = None


@dataclass(frozen=True, slots=True)
class CallRejected(Event):
    """A policy refused a call before it started; ``rejected_by`` is the policy kind.

    Example::

        if isinstance(event, rs.events.CallRejected):
            shed[event.rejected_by] += 1
    """

    kind: ClassVar[str] = "call_rejected"
    rejected_by: str
    reason: str = ""

    @property
    def policy(self) -> str:  # type: ignore[override]
        """The kind of policy that refused (the same as ``rejected_by``)."""
        return self.rejected_by


@dataclass(frozen=True, slots=True)
class HedgeLaunched(Event):
    """Hedge number ``hedge`` (1 = the first extra attempt) started ``after`` seconds in.

    Example::

        if isinstance(event, rs.events.HedgeLaunched):
            hedges.inc()
    """

    kind: ClassVar[str] = "hedge_launched"
    policy: ClassVar[str] = "hedge"
    hedge: int
    after: float


@dataclass(frozen=True, slots=True)
class TimedOut(Event):
    """A call was cut (async) or found late (sync) after ``timeout`` seconds.

    Example::

        if isinstance(event, rs.events.TimedOut):
            log.warning("%s cut after %.3f s", event.name, event.timeout)
    """

    kind: ClassVar[str] = "timed_out"
    policy: ClassVar[str] = "timeout"
    timeout: float


@dataclass(frozen=True, slots=True)
class FallbackUsed(Event):
    """The fallback replaced a failure (``exception``) with its own answer.

    Example::

        if isinstance(event, rs.events.FallbackUsed):
            degraded.inc()
    """

    kind: ClassVar[str] = "fallback_used"
    policy: ClassVar[str] = "fallback"
    exception: BaseException | None = None


@dataclass(frozen=True, slots=True)
class StoreUnavailable(Event):
    """The store named ``name`` (``host:port/db``) failed with ``error`` (an exception type name);
    the breakers and budgets using it run on local state until it answers again.

    Example::

        if isinstance(event, rs.events.StoreUnavailable):
            alert(f"shared breaker state down: {event.name} ({event.error})")
    """

    kind: ClassVar[str] = "store_unavailable"
    policy: ClassVar[str] = "store"
    error: str


@dataclass(frozen=True, slots=True)
class StoreRecovered(Event):
    """The store named ``name`` answers again after ``down_for`` seconds; sharing resumed.

    Example::

        if isinstance(event, rs.events.StoreRecovered):
            log.info("shared state back after %.1f s", event.down_for)
    """

    kind: ClassVar[str] = "store_recovered"
    policy: ClassVar[str] = "store"
    down_for: float


class Hook(Protocol):
    """Anything called with each event: a function, a bound method, ``list.append``.

    Example::

        rs.Retry(on=OSError, hooks=[print])  # any callable taking an event
    """

    def __call__(self, event: Event, /) -> object: ...


_global_hooks: list[Hook] = []


def add_hook(hook: Hook) -> None:
    """Send every policy's events to ``hook`` as well as to the policy's own ``hooks=``.

    Example::

        rs.add_hook(rs.telemetry.LoggingHook())
    """
    if not callable(hook):
        raise TypeError(f"hook must be callable, got {hook!r}")
    _global_hooks.append(hook)


def remove_hook(hook: Hook) -> None:
    """Stop sending events to a hook added with `add_hook` (no error if it was not there).

    Example::

        rs.remove_hook(my_hook)
    """
    try:
        _global_hooks.remove(hook)
    except ValueError:
        pass


def emit(hooks: Sequence[Hook], event: Event) -> None:
    """Hand ``event`` to the policy's hooks, then to the global ones; a failing hook is logged.

    Example::

        emit(self.hooks, RetryScheduled(self.name, attempt, wait))  # inside a policy
    """
    for hook in (*hooks, *_global_hooks):
        try:
            hook(event)
        except Exception as exc:
            # Not _log.exception: the traceback could carry an exception message with credentials.
            _log.error(
                "resilient: event hook %r failed on %s: %s", hook, event.kind, type(exc).__name__
            )
