"""Time comes in from outside: every policy that uses time takes a ``clock=``."""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import anyio

__all__ = ["Clock", "SystemClock", "system_clock"]


@runtime_checkable
class Clock(Protocol):
    """What policies need of time: a monotonic reading and two ways to sleep.

    Example::

        class MyClock:
            def monotonic(self) -> float: ...
            def sleep(self, seconds: float) -> None: ...
            async def sleep_async(self, seconds: float) -> None: ...

        rs.Retry(on=OSError, clock=MyClock())
    """

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``."""
        ...

    async def sleep_async(self, seconds: float) -> None:
        """Sleep in the running event loop (asyncio or trio) for ``seconds``."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.sleep`` and ``anyio.sleep``.

    Example::

        rs.Retry(on=OSError, clock=rs.SystemClock())  # the same as leaving clock= out
    """

    __slots__ = ()

    # Bound to the C functions directly: these are on hot paths.
    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)

    async def sleep_async(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


system_clock = SystemClock()
