"""`FakeClock` sleepers woken by `advance` from the test's own thread or from another."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest
import trio

from resilient.testing import FakeClock


def _sleep_in_a_loop_thread(clock: FakeClock, backend: str, seconds: float) -> threading.Event:
    """An async sleeper in an event loop of its own, in a thread; the event is set once it woke."""
    woke = threading.Event()

    async def sleeper() -> None:
        await clock.sleep_async(seconds)
        woke.set()

    def run() -> None:
        if backend == "asyncio":
            asyncio.run(sleeper())
        else:
            trio.run(sleeper)

    threading.Thread(target=run, daemon=True).start()
    return woke


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_advance_from_another_thread_wakes_an_async_sleeper(backend: str) -> None:
    # anyio.Event is not thread-safe: set from the advancing thread, the loop never woke.
    clock = FakeClock(autojump=False)
    woke = _sleep_in_a_loop_thread(clock, backend, 5.0)
    for _ in range(500):  # until it sleeps
        if clock._async_waiters:
            break
        threading.Event().wait(0.01)
    assert clock._async_waiters
    clock.advance(4.0)
    assert not woke.wait(0.2)  # not due yet
    clock.advance(1.0)
    assert woke.wait(5.0)


@pytest.mark.anyio
async def test_advance_from_the_sleepers_own_loop_wakes_it() -> None:
    clock = FakeClock(autojump=False)
    woke = anyio.Event()

    async def sleeper() -> None:
        await clock.sleep_async(2.0)
        woke.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        await anyio.wait_all_tasks_blocked()
        clock.advance(2.0)
        with anyio.fail_after(5.0):
            await woke.wait()
    assert clock.sleeps == [2.0]
