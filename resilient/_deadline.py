"""The ambient deadline: an absolute time, on a given clock, that nested policies must respect.

`Timeout` and `Retry(deadline=...)` set it for the code they run; `Retry` never sleeps past it, and an
inner `Timeout` or the HTTP transport clips itself to what is left. A context variable carries it, so
it follows the call through threads started with ``contextvars.copy_context`` and through tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from resilient._clock import Clock

__all__ = ["deadline_scope", "time_left"]

_DEADLINE: ContextVar[tuple[Clock, float] | None] = ContextVar("resilient_deadline", default=None)


def time_left() -> float | None:
    """Seconds left before the innermost ambient deadline, or None when there is none.

    Example::

        with rs.Timeout(2.0)._sync_scope():
            assert time_left() <= 2.0
    """
    current = _DEADLINE.get()
    if current is None:
        return None
    clock, at = current
    return at - clock.monotonic()


@contextmanager
def deadline_scope(clock: Clock, seconds: float) -> Iterator[float]:
    """Run the block under a deadline ``seconds`` from now, or the enclosing one if that is sooner.

    Yields the seconds actually allowed.
    """
    now = clock.monotonic()
    at = now + seconds
    current = _DEADLINE.get()
    if current is not None:
        outer_clock, outer_at = current
        left = outer_at - outer_clock.monotonic()
        if left < seconds:
            at = now + left
    token = _DEADLINE.set((clock, at))
    try:
        yield at - now
    finally:
        _DEADLINE.reset(token)
