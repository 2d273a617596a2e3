"""ResilientTransport with breakers and budgets on a real Redis: shared across transports, and
an async client's round trips to the store never block its event loop."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pybreaker
import pytest

import resilient as rs
from resilient import _later
from resilient.stores import RedisStore
from resilient.testing import Fleet
from tests.stores.conftest import RedisServer, loop_ticks
from tests.stores.test_redis_store import is_available


@pytest.fixture(scope="module")
def fleet_process() -> Iterator[Fleet]:
    with Fleet(1, seed=11) as fleet:
        yield fleet


@pytest.fixture
def fleet(fleet_process: Fleet) -> Fleet:
    """The replica, fault-free, its counts zero."""
    fleet_process[0].set_faults()
    fleet_process[0].reset_counts()
    return fleet_process


def test_transports_of_two_processes_share_one_breaker(
    redis_server: RedisServer, prefix: str, fleet: Fleet
) -> None:
    # Two transports stand for two processes: each has its own store client and breaker, and
    # the failures one sees open the breaker the other checks.
    def transport() -> rs.ResilientTransport:
        store = RedisStore(redis_server.url, prefix=prefix, socket_timeout=1.0)
        breaker = rs.CircuitBreaker(
            name="orders", consecutive_failures=3, open_for=30.0, store=store
        )
        return rs.ResilientTransport(breaker=breaker, wait=0.0, hedge=None, attempts=1)

    fleet[0].set_faults(error_rate=1.0)
    with httpx.Client(transport=transport()) as one, httpx.Client(transport=transport()) as two:
        for _ in range(3):
            assert one.get(f"{fleet.urls[0]}/x").status_code == 503
        fleet[0].set_faults()
        with pytest.raises(rs.CircuitOpenError):
            two.get(f"{fleet.urls[0]}/x")
    assert fleet[0].counts().total == 3


@pytest.mark.anyio
async def test_an_async_client_s_outcomes_reach_the_store(
    anyio_backend: str, redis_server: RedisServer, prefix: str, fleet: Fleet
) -> None:
    # Deferred to the end of each request, the round trips still happen: a sync transport with
    # its own store client sees the breaker the async client's failures opened.
    stores = [RedisStore(redis_server.url, prefix=prefix, socket_timeout=1.0) for _ in range(2)]
    one, two = (
        rs.ResilientTransport(
            breaker=rs.CircuitBreaker(
                name="orders", consecutive_failures=3, open_for=30.0, store=store
            ),
            wait=0.0,
            hedge=None,
            attempts=1,
        )
        for store in stores
    )
    fleet[0].set_faults(error_rate=1.0)
    try:
        async with httpx.AsyncClient(transport=one) as client:
            for _ in range(3):
                assert (await client.get(f"{fleet.urls[0]}/x")).status_code == 503
    finally:
        fleet[0].set_faults()
        await stores[0].aclose()
    with httpx.Client(transport=two) as client, pytest.raises(rs.CircuitOpenError):
        client.get(f"{fleet.urls[0]}/x")


@pytest.mark.anyio
async def test_an_async_client_does_not_block_its_loop_on_the_store(
    anyio_backend: str, own_redis: RedisServer, prefix: str, fleet: Fleet
) -> None:
    # With Redis stopped, each round trip waits out the store's 0.3 s timeout. An async client's
    # outcomes and deposits reach the store after the request, awaited: the loop keeps running.
    store = RedisStore(own_redis.url, prefix=prefix, socket_timeout=0.3)
    breaker = rs.CircuitBreaker(name="loop", store=store)
    budget = rs.RetryBudget(name="loop", store=store)
    t = rs.ResilientTransport(breaker=breaker, budget=budget, hedge=None)
    async with httpx.AsyncClient(transport=t) as client:
        assert (await client.get(f"{fleet.urls[0]}/x")).status_code == 200
        assert is_available(store)
        with own_redis.stopped():
            async with loop_ticks() as ticks:
                started = time.monotonic()
                response = await client.get(f"{fleet.urls[0]}/x")
                waited = time.monotonic() - started
    assert response.status_code == 200
    assert waited >= 0.3  # the request did wait for the store (its outcome is recorded)...
    assert ticks[0] >= 10  # ...while the loop kept running
    assert not is_available(store)  # and the breaker went on with its local state
    await store.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("round_trip", ["host breaker", "service breaker", "retry budget"])
async def test_an_async_client_takes_its_permits_without_blocking_its_loop(
    anyio_backend: str, own_redis: RedisServer, prefix: str, fleet: Fleet, round_trip: str
) -> None:
    # The round trips an attempt must wait for (a breaker's stale state refreshed before it, a
    # budget's token taken before a retry) wait out the stopped Redis's 0.3 s timeout: the
    # request waits, the loop runs. (Deposits are not flushed: those are the round trips.)
    store = RedisStore(
        own_redis.url,
        prefix=prefix,
        socket_timeout=0.3,
        staleness=0.0,  # every call refreshes a closed breaker's state
        flush_calls=10_000,
        flush_interval=3600,
    )
    options: dict[str, Any] = {"breaker": None, "hedge": None, "wait": 0.0}
    url = f"{fleet.urls[0]}/x"
    if round_trip == "host breaker":
        options["breaker"] = rs.CircuitBreaker(name="loop", store=store)
    elif round_trip == "service breaker":
        service = rs.balancing.Service(
            discovery=rs.discovery.Static(fleet.urls),
            service_breaker=rs.CircuitBreaker(name="loop", store=store),
        )
        options["services"] = {"orders": service}
        url = "http://orders/x"
    else:
        options["budget"] = rs.RetryBudget(name="loop", store=store)
        options["attempts"] = 2
        url += "?status=503"
    t = rs.ResilientTransport(**options)
    async with httpx.AsyncClient(transport=t) as client:
        with own_redis.stopped():
            async with loop_ticks() as ticks:
                response = await client.get(url)
    assert response.status_code == (503 if round_trip == "retry budget" else 200)
    assert fleet[0].counts().total == (2 if round_trip == "retry budget" else 1)
    assert not is_available(store)  # the round trip was made, and timed out
    assert ticks[0] >= 10  # while the loop kept running
    await store.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_a_trio_race_decided_while_its_hedge_token_is_asked_sends_no_hedge(
    anyio_backend: str, own_redis: RedisServer, prefix: str, fleet: Fleet
) -> None:
    # The first copy answers at 0.1 s while the hedge's token (due at 0.05 s) is asked of a
    # stalled Redis until its 0.3 s timeout: no hedge is announced, counted or sent after that.
    store = RedisStore(
        own_redis.url, prefix=prefix, socket_timeout=0.3, flush_calls=10_000, flush_interval=3600
    )
    launched: list[object] = []
    t = rs.ResilientTransport(
        budget=rs.RetryBudget(name="race", store=store),
        breaker=None,
        hedge=rs.http.Hedging(delay=0.05, trio=True),
        hooks=[lambda e: launched.append(e) if isinstance(e, rs.events.HedgeLaunched) else None],
    )
    async with httpx.AsyncClient(transport=t) as client:
        with own_redis.stopped():
            response = await client.get(f"{fleet.urls[0]}/x?delay=0.1")
    assert response.status_code == 200
    assert launched == []
    assert fleet[0].counts().total == 1
    await store.aclose()


@pytest.mark.anyio
async def test_the_store_hears_each_attempt_before_the_next(
    anyio_backend: str, redis_server: RedisServer, prefix: str, fleet: Fleet
) -> None:
    # Outcomes wait for the end of an attempt, not of the request: the breaker opens after its
    # third failure in a row and the fourth and fifth attempts are refused, as without a store.
    store = RedisStore(redis_server.url, prefix=prefix, socket_timeout=1.0)
    breaker = rs.CircuitBreaker(name="orders", consecutive_failures=3, open_for=30.0, store=store)
    t = rs.ResilientTransport(breaker=breaker, wait=0.0, hedge=None, attempts=5)
    fleet[0].set_faults(error_rate=1.0)
    try:
        async with httpx.AsyncClient(transport=t) as client:
            response = await client.get(f"{fleet.urls[0]}/x")
    finally:
        fleet[0].set_faults()
        await store.aclose()
    assert response.status_code == 503
    assert fleet[0].counts().total == 3
    assert breaker.state == "open"


@pytest.mark.anyio
async def test_a_listener_that_raises_does_not_lose_the_response(
    anyio_backend: str,
    redis_server: RedisServer,
    prefix: str,
    fleet: Fleet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Raising(pybreaker.CircuitBreakerListener):
        def success(self, cb: object) -> None:
            raise RuntimeError("a listener's bug")

    store = RedisStore(redis_server.url, prefix=prefix, socket_timeout=1.0)
    breaker = rs.CircuitBreaker(name="orders", store=store, listeners=[Raising()])
    t = rs.ResilientTransport(breaker=breaker, hedge=None)
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get(f"{fleet.urls[0]}/x")
    await store.aclose()
    assert response.status_code == 200
    assert "deferred round trip to the store raised" in caplog.text


@pytest.mark.anyio
async def test_deferred_round_trips_all_run_in_order_though_one_raises(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[int] = []

    async def trip(n: int) -> None:
        ran.append(n)
        if n == 2:
            raise RuntimeError("no")

    started = _later.begin()
    assert started is not None
    later, token = started
    assert _later.begin() is None  # a nested request uses the outer one's
    assert _later.pending() is later
    later.add(functools.partial(trip, 1))
    later.add(functools.partial(trip, 2))
    await _later.flush_pending()  # between attempts
    later.add(functools.partial(trip, 3))
    _later.end(token)
    with anyio.CancelScope() as scope:
        scope.cancel()  # the request was cancelled: its round trips still go
        await later.settle()
    assert ran == [1, 2, 3]
    assert "deferred round trip to the store raised" in caplog.text
    token = _later._CURRENT.set(later)  # a task that inherited a finished request's context
    try:
        assert _later.pending() is None  # blocks rather than adding to a settled Later
        assert _later.begin() is not None  # and its own request gets a Later of its own
    finally:
        _later._CURRENT.reset(token)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_hedge_defers_to_its_own_request(
    anyio_backend: str, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hedges start from the loop's shared timer, whose callback runs in the context of the task
    # that last scheduled it: each must still take its own request's context (its `Later`).
    monkeypatch.setattr(_later, "IN_USE", True)
    seen: list[tuple[str, int]] = []
    attempt = rs.ResilientTransport._attempt_async

    async def recording(self: Any, request: httpx.Request, *args: Any) -> httpx.Response:
        seen.append((request.headers["x-request-id"], id(_later.pending())))
        return await attempt(self, request, *args)

    monkeypatch.setattr(rs.ResilientTransport, "_attempt_async", recording)
    fleet[0].set_faults(latency=0.2)
    t = rs.ResilientTransport(hedge=rs.http.Hedging(delay=0.05), breaker=None, deadline=5.0)
    async with httpx.AsyncClient(transport=t) as client:

        async def get(name: str, after: float) -> None:
            await anyio.sleep(after)
            await client.get(f"{fleet.urls[0]}/x", headers={"x-request-id": name})

        async with anyio.create_task_group() as tg:
            tg.start_soon(get, "a", 0.0)
            tg.start_soon(get, "b", 0.01)
    laters: dict[str, set[int]] = {}
    for name, later in seen:
        laters.setdefault(name, set()).add(later)
    assert [name for name, _ in seen].count("a") == 2  # the attempt and its hedge
    assert [name for name, _ in seen].count("b") == 2
    assert len(laters["a"]) == len(laters["b"]) == 1  # each request's attempts: one Later
    assert laters["a"] != laters["b"]
