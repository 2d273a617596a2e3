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

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from typing import TypeVar

import anyio

__all__ = ["Later", "pending", "shielded"]

T = TypeVar("T")

_get_running_loop = asyncio.events._get_running_loop  # None outside asyncio (e.g. under trio)


async def shielded(trip: Callable[[], Awaitable[T]]) -> T:
    """``await trip()`` to its end, whatever cancels the caller meanwhile; a cancellation that
    came then is raised once it is over.

    anyio's shield stops anyio's and trio's cancellation, not asyncio's own ``task.cancel()``
    (``asyncio.timeout``, ``wait_for``, a ``TaskGroup``): under asyncio the trip runs as a task
    of its own, awaited through ``asyncio.shield`` until it is over. A store's round trips are
    bounded by its socket timeout, so the wait is too.

    Example::

        reply = await shielded(lambda: store_handle.call_async("release", claim))
    """
    with anyio.CancelScope(shield=True):
        if _get_running_loop() is None:
            return await trip()
        task = asyncio.ensure_future(trip())
        cancelled: asyncio.CancelledError | None = None
        while True:
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if task.cancelled():  # the trip itself was cancelled (its loop is closing)
                    raise
                cancelled = exc  # ours: the trip runs on; wait for it again
                continue
            except BaseException:
                if cancelled is not None:
                    raise cancelled from None
                raise
            break
        if cancelled is not None:
            raise cancelled
        return result
    raise AssertionError("unreachable")  # pragma: no cover - the shield swallows nothing


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
        cancelled: asyncio.CancelledError | None = None
        while self.done < len(self.trips):  # (each trip shielded; nothing else awaited)
            trip = self.trips[self.done]
            self.done += 1
            try:
                await shielded(trip)
            except asyncio.CancelledError as exc:  # asyncio's own: the others still go
                cancelled = exc
            except Exception:
                _log.exception("resilient: a deferred round trip to the store raised")
        if cancelled is not None:
            raise cancelled

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


def defer(trip: Callable[[], Awaitable[object]]) -> bool:
    """Hand ``trip`` to the running async request's `Later`; False if there is none (the
    caller makes its round trip itself, blocking).

    Example::

        if not defer(functools.partial(handle.call_async, "release", claim)):
            handle.call("release", claim)
    """
    later = pending()
    if later is None:
        return False
    later.add(trip)
    return True


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
