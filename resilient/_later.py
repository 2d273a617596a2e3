"""Round trips to a store that an async request's sync bookkeeping asks for, made after it.

The transport records a request's outcomes in sync helpers shared with the sync client. With a
store (`resilient.stores.RedisStore`) each would be a blocking round trip on the event loop's
thread: ~0.1 ms on loopback, the store's whole timeout when Redis stalls. Inside an async
request those helpers hand their round trips to the request's `Later` instead, and the
transport awaits them when the request ends, shielded from cancellation, so the store still
hears every outcome and the loop runs meanwhile.

Written here rather than with a task group: a transport owns no task group, and a round trip
left running after its request would outlive the client that made it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token

import anyio

__all__ = ["Later", "pending"]

_log = logging.getLogger("resilient")

#: Set once any breaker or budget is bound to a store: until then the transport skips all this.
IN_USE = False


class Later:
    """The round trips one async request deferred, in the order they were asked for."""

    __slots__ = ("done", "open", "trips")

    def __init__(self) -> None:
        self.open = True
        self.done = 0
        self.trips: list[Callable[[], Awaitable[object]]] = []

    def add(self, trip: Callable[[], Awaitable[object]]) -> None:
        self.trips.append(trip)

    async def flush(self) -> None:
        """Make the round trips asked for so far (and any added meanwhile, by a hedge ending).

        Shielded: they are off the request's books, and the store must hear them. One that
        raises (a listener of the breaker's, say) is logged, and the others still go."""
        with anyio.CancelScope(shield=True):
            while self.done < len(self.trips):
                trip = self.trips[self.done]
                self.done += 1
                try:
                    await trip()
                except Exception:
                    _log.exception("resilient: a deferred round trip to the store raised")

    async def settle(self) -> None:
        """`flush`, at the request's end: round trips asked for after this block."""
        try:
            await self.flush()
        finally:
            self.open = False


_CURRENT: ContextVar[Later | None] = ContextVar("resilient_store_later", default=None)


def pending() -> Later | None:
    """The running async request's `Later`, if it still takes round trips; else None (block)."""
    later = _CURRENT.get()
    return later if later is not None and later.open else None


async def flush_pending() -> None:
    """Between a request's attempts: the store hears its outcomes before the next one (its
    breaker may have opened; the budget gets its deposits before a retry withdraws)."""
    later = _CURRENT.get()
    if later is not None and later.open and later.done < len(later.trips):
        await later.flush()


def begin() -> tuple[Later, Token[Later | None]] | None:
    """A `Later` for the async request starting now; None if one is running (a nested request).
    A finished request's `Later`, inherited by a task it started, does not count."""
    if pending() is not None:
        return None
    later = Later()
    return later, _CURRENT.set(later)


def end(token: Token[Later | None]) -> None:
    _CURRENT.reset(token)
