from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import anyio
import anyio.lowlevel

__all__ = ["FakeClock"]


class FakeClock:
    """A clock for tests: time moves only when you say so, and nothing really sleeps.

    With ``autojump=True`` (the default) every ``sleep`` moves the clock forward by its duration at
    once, so a retry loop with waits of seconds finishes in microseconds. With ``autojump=False`` a
    sleeper waits until the test calls ``advance``. ``sleeps`` records every sleep asked for.

    Example::

        clock = rs.testing.FakeClock()
        retry = rs.Retry(on=OSError, attempts=3, wait=0.5, clock=clock)
        with pytest.raises(OSError):
            retry.call(always_fails)
        assert clock.sleeps == [0.5, 0.5] and clock.monotonic() == 1.0
    """

    def __init__(self, start: float = 0.0, *, autojump: bool = True) -> None:
        self._now = float(start)
        self.autojump = autojump
        self.sleeps: list[float] = []
        self._cond = threading.Condition()
        #: (when, the sleeper's event, its thread, how to set the event from another thread)
        self._async_waiters: list[tuple[float, anyio.Event, int, Callable[[], None]]] = []

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r}, autojump={self.autojump!r})"

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward and wake every sleeper whose time has come."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        with self._cond:
            self._now += seconds
            self._cond.notify_all()
            due = [w for w in self._async_waiters if w[0] <= self._now]
            self._async_waiters = [w for w in self._async_waiters if w[0] > self._now]
        here = threading.get_ident()
        for _, event, thread, set_from_elsewhere in due:
            if thread == here:
                event.set()
            else:  # an event loop's event, set in its own thread (anyio.Event is not thread-safe)
                set_from_elsewhere()

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.autojump:
            self.advance(max(seconds, 0.0))
            return
        with self._cond:
            wake_at = self._now + seconds
            while self._now < wake_at:
                self._cond.wait()

    async def sleep_async(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.autojump:
            self.advance(max(seconds, 0.0))
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        set_from_elsewhere = _threadsafe(event)
        with self._cond:
            wake_at = self._now + seconds
            if wake_at <= self._now:
                event.set()
            else:
                waiter = (wake_at, event, threading.get_ident(), set_from_elsewhere)
                self._async_waiters.append(waiter)
        await event.wait()


def _threadsafe(event: anyio.Event) -> Callable[[], None]:
    """A function any thread may call to set ``event`` in the event loop it belongs to."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: trio, the other backend anyio runs on
        import trio

        token = trio.lowlevel.current_trio_token()
        return lambda: token.run_sync_soon(event.set)

    def set_soon() -> None:
        loop.call_soon_threadsafe(event.set)

    return set_soon
