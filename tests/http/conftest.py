"""Fixtures and helpers for the `ResilientTransport` tests: real replica servers on loopback.

One `Fleet` of two replicas serves the whole ``tests/http`` package (starting processes is the
slow part); the function-scoped ``fleet`` fixture brings every replica back to a clean state —
running, listening, no faults, zero counts — before each test.

Test modules import the helpers below from ``tests.http.conftest``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import anyio.to_thread
import httpx
import pytest

from resilient.testing import FakeClock, Fleet

FLEET_SEED = 20_241_126


class HookedClock(FakeClock):
    """A `FakeClock` that runs ``actions[n]`` right after its n-th sleep (counted from 0).

    The action runs in the sleeping thread (sync) or in a worker thread (async), so a blocking
    fleet knob such as ``replica.restart`` never stalls the event loop.

    Example::

        clock = HookedClock({0: fleet[0].restart})  # the first retry wait brings replica 0 back
    """

    def __init__(self, actions: dict[int, Callable[[], object]] | None = None) -> None:
        super().__init__()
        self.actions = dict(actions or {})

    def _due(self) -> Callable[[], object] | None:
        return self.actions.pop(len(self.sleeps) - 1, None)

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        action = self._due()
        if action is not None:
            action()

    async def sleep_async(self, seconds: float) -> None:
        await super().sleep_async(seconds)
        action = self._due()
        if action is not None:
            await anyio.to_thread.run_sync(action)


class Recorder:
    """What an inner transport was asked to send, attempt by attempt."""

    def __init__(self) -> None:
        self.timeouts: list[dict[str, float | None]] = []
        self.headers: list[httpx.Headers] = []

    @property
    def sent(self) -> int:
        return len(self.timeouts)

    def record(self, request: httpx.Request) -> None:
        self.timeouts.append(dict(request.extensions.get("timeout", {})))
        self.headers.append(request.headers.copy())


class RecordingTransport(httpx.BaseTransport):
    """A real `httpx.HTTPTransport` that records every attempt it is handed.

    Example::

        inner = RecordingTransport()
        rs.ResilientTransport(transport=inner)
        ...
        assert inner.recorder.sent == 3
    """

    def __init__(self, inner: httpx.BaseTransport | None = None) -> None:
        self.inner = inner if inner is not None else httpx.HTTPTransport()
        self.recorder = Recorder()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.recorder.record(request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` in real time (bounded) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.005)


async def wait_until_async(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """`wait_until` for async tests (asyncio or trio)."""
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await anyio.sleep(0.005)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture(scope="package")
def fleet_processes() -> Iterator[Fleet]:
    """Two replica processes for the whole package."""
    with Fleet(2, seed=FLEET_SEED) as fleet:
        yield fleet


@pytest.fixture
def fleet(fleet_processes: Fleet) -> Fleet:
    """The package's fleet, every replica running, listening, fault-free and with zero counts."""
    for replica in fleet_processes:
        if replica.state == "frozen":
            replica.thaw()
        elif replica.state != "running":
            replica.restart()
        replica.go_up()
        replica.set_faults()
        replica.reset_counts()
    return fleet_processes


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
