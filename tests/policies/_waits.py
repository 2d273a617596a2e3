"""Bounded waits shared by the policy tests: threads poll in real time, tasks yield."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio.lowlevel


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll from a thread until ``predicate()`` holds (bounded)."""
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the event loop until ``predicate()`` holds (bounded)."""
    for _ in range(10_000):
        if predicate():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition not reached")
