"""Hedged requests through `ResilientTransport`, against real replica servers on loopback.

Every race runs on asyncio, on trio (``Hedging(trio=True)``) and, where it applies, sync with
``Hedging(threads=True)``. A hedge goes to the same URL as its primary, so the inner transport
(`Scripted`) slows or fails chosen attempts by adding query controls to the n-th request it sends,
and tags every answer with that n. Hedging is about real time: waits here are real, small and
bounded, with wide margins (a delayed server answer is always several times the hedge delay).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import threading
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import anyio
import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

import resilient as rs
from resilient.balancing import LatencyWindow
from resilient.events import Event, HedgeLaunched
from resilient.http import Hedging, _transport
from resilient.testing import FakeClock, Fleet
from tests.http.conftest import wait_until, wait_until_async

pytestmark = pytest.mark.slow

Mode = Literal["asyncio", "trio", "sync"]

#: The three ways a race runs; the sync client runs in a thread under the asyncio test loop.
ALL_MODES = pytest.mark.parametrize(
    ("anyio_backend", "mode"),
    [("asyncio", "asyncio"), ("trio", "trio"), ("asyncio", "sync")],
    ids=["asyncio", "trio", "sync"],
)

#: Hedging on every client kind, so one config serves all three modes.
EVERYWHERE = {"threads": True, "trio": True}

#: Longest any single request may take before the test calls it hung.
HANG = 3.0


@dataclass(frozen=True)
class Fault:
    """What `Scripted` does to one request: server-side delay and status, client read timeout."""

    delay: float = 0.0
    status: int | None = None
    read_timeout: float | None = None


class Scripted(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Real loopback transports (sync and async) that slow or fail chosen attempts.

    The n-th request it is handed (from 0, in the order attempts reach it) gets ``script(n)``,
    or what `then` queued for it; its response carries ``X-Attempt: n``.

    Example::

        inner = Scripted(first(Fault(delay=0.5)))   # the primary is slow, its hedge is not
        inner.then(Fault(delay=0.5))                 # ... and so is the next request sent
    """

    def __init__(
        self,
        script: Callable[[int], Fault | None] | None = None,
        *,
        limits: httpx.Limits | None = None,
    ) -> None:
        # Plain http on loopback: verify=False only skips loading a CA bundle (~50 ms a test).
        extra: dict[str, Any] = {"verify": False}
        if limits is not None:
            extra["limits"] = limits
        self.sync = httpx.HTTPTransport(**extra)
        self.async_ = httpx.AsyncHTTPTransport(**extra)
        self.script = script
        self.sent = 0
        self.sent_at: list[float] = []  # time.perf_counter() when each request was handed over
        self.in_flight = 0
        self._queued: dict[int, Fault] = {}
        self._lock = threading.Lock()

    def then(self, *faults: Fault) -> int:
        """Apply ``faults`` to the next requests sent; returns the index of the first of them."""
        with self._lock:
            for i, fault in enumerate(faults):
                self._queued[self.sent + i] = fault
            return self.sent

    def _rewrite(self, request: httpx.Request) -> tuple[int, httpx.Request]:
        with self._lock:
            n = self.sent
            self.sent += 1
            self.sent_at.append(time.perf_counter())
            fault = self._queued.pop(n, None)
        if fault is None and self.script is not None:
            fault = self.script(n)
        if fault is None:
            return n, request
        params: dict[str, str] = {}
        if fault.delay:
            params["delay"] = str(fault.delay)
        if fault.status is not None:
            params["status"] = str(fault.status)
        extensions = dict(request.extensions)
        if fault.read_timeout is not None:
            extensions["timeout"] = {**extensions.get("timeout", {}), "read": fault.read_timeout}
        # A new request: the race clones hedges from the primary's request object.
        return n, httpx.Request(
            request.method,
            request.url.copy_merge_params(params),
            headers=request.headers,
            stream=request.stream,
            extensions=extensions,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        n, request = self._rewrite(request)
        with self._lock:
            self.in_flight += 1
        try:
            response = self.sync.handle_request(request)
        finally:
            with self._lock:
                self.in_flight -= 1
        response.headers["X-Attempt"] = str(n)
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        n, request = self._rewrite(request)
        response = await self.async_.handle_async_request(request)
        response.headers["X-Attempt"] = str(n)
        return response

    def close(self) -> None:
        self.sync.close()

    async def aclose(self) -> None:
        await self.async_.aclose()


def first(*faults: Fault) -> Callable[[int], Fault | None]:
    """A script: ``faults[n]`` for the first requests, nothing after."""
    return lambda n: faults[n] if n < len(faults) else None


class Events:
    """A hook that keeps every event."""

    def __init__(self) -> None:
        self.all: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.all.append(event)

    @property
    def hedges(self) -> list[HedgeLaunched]:
        return [e for e in self.all if isinstance(e, HedgeLaunched)]


class Harness:
    """One client of the given mode over a transport, driven from an async test.

    The sync client runs each request in a daemon thread, so a request that never returns fails
    its test after ``hang`` seconds instead of stalling the suite.
    """

    def __init__(self, mode: str, transport: rs.ResilientTransport, *, pool: float = 2.0) -> None:
        self.mode = mode
        timeout = httpx.Timeout(5.0, pool=pool)
        self.sync_client: httpx.Client | None = None
        self.async_client: httpx.AsyncClient | None = None
        if mode == "sync":
            self.sync_client = httpx.Client(transport=transport, timeout=timeout)
        else:
            self.async_client = httpx.AsyncClient(transport=transport, timeout=timeout)

    async def __aenter__(self) -> Harness:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.sync_client is not None:
            self.sync_client.close()
        if self.async_client is not None:
            await self.async_client.aclose()

    async def request(
        self, method: str, url: str, *, hang: float = HANG, **kwargs: Any
    ) -> httpx.Response:
        if self.async_client is not None:
            with anyio.fail_after(hang):
                return await self.async_client.request(method, url, **kwargs)
        client = self.sync_client
        assert client is not None
        box: list[httpx.Response | BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                box.append(client.request(method, url, **kwargs))
            except BaseException as exc:
                box.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, daemon=True).start()
        await wait_until_async(done.is_set, timeout=hang)
        outcome = box[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    def stream(self, n: int = 3) -> Iterator[bytes] | AsyncIterator[bytes]:
        """A streamed request body of the kind this client sends."""

        def chunks() -> Iterator[bytes]:
            yield from (b"x" * 1000 for _ in range(n))

        async def achunks() -> AsyncIterator[bytes]:
            for chunk in chunks():
                yield chunk

        return chunks() if self.mode == "sync" else achunks()


def make(
    inner: Scripted, hedge: Hedging | None, events: Events | None = None, **kwargs: Any
) -> rs.ResilientTransport:
    return rs.ResilientTransport(
        transport=inner,
        hedge=hedge,
        hooks=[events] if events is not None else (),
        **kwargs,
    )


def outcome_info(response: httpx.Response) -> dict[str, Any]:
    """What the transport says about how it got this response."""
    value = response.extensions["resilient"]
    assert isinstance(value, dict)
    return value


def attempt_of(response: httpx.Response) -> int:
    """Which request sent by `Scripted` this answer belongs to (0 = the first)."""
    return int(response.headers["X-Attempt"])


def metric_sums(reader: InMemoryMetricReader) -> dict[str, float]:
    sums: dict[str, float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if isinstance(point, NumberDataPoint):
                        sums[metric.name] = sums.get(metric.name, 0) + point.value
    return sums


def hedge_tasks() -> list[asyncio.Task[Any]]:
    """asyncio tasks still running a hedge attempt."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").endswith("._attempt_async")
    ]


async def assert_pool_free(h: Harness, url: str, n: int) -> None:
    """``n`` requests at once must each get a connection: none is held by a finished race."""
    outcomes: list[int | Exception] = []

    async def one() -> None:
        # Each holds its connection 0.3 s and waits at most 0.1 s for one: none may wait.
        try:
            response = await h.get(
                url + "?delay=0.3",
                timeout=httpx.Timeout(5.0, pool=0.1),
                extensions={"resilient": {"hedge": False, "retry": False}},  # not PoolTimeout
            )
        except httpx.TransportError as exc:
            outcomes.append(exc)
        else:
            outcomes.append(response.status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    assert outcomes == [200] * n


def half_open_breaker(probes: int = 2) -> rs.CircuitBreaker:
    """A breaker (on its own fake clock) that admits exactly ``probes`` calls at once."""
    clock = FakeClock()
    breaker = rs.CircuitBreaker(name="hedged", half_open_probes=probes, open_for=1.0, clock=clock)
    breaker.open()
    clock.advance(1.0)
    assert breaker.state == "half_open"
    return breaker


# --- configuration ----------------------------------------------------------------------------


def test_default_transport_hedges_on_the_learned_p95() -> None:
    transport = rs.ResilientTransport()
    assert transport.hedge == Hedging()
    assert transport.hedge.delay == "p95" and transport.hedge.max_hedges == 1
    assert not transport.hedge.threads and not transport.hedge.trio
    assert rs.ResilientTransport(hedge=None).hedge is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("delay", 0),
        ("delay", -0.1),
        ("delay", "fast"),
        ("delay", "p100"),
        ("delay", "p0"),
        ("delay", float("inf")),
        ("max_hedges", 0),
        ("min_delay", -0.001),
        ("min_samples", 0),
        ("max_workers", 1),
        ("tail_ratio", 0.5),
        ("tail_ratio", -1.0),
    ],
)
def test_hedging_rejects_invalid_settings(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        Hedging(**{field: value})


def _window(*groups: tuple[int, float]) -> LatencyWindow:
    window = LatencyWindow()
    for count, seconds in groups:
        for _ in range(count):
            window.add(seconds)
    return window


def test_learned_delay_is_the_percentile_when_the_tail_is_near_the_median() -> None:
    # 100 samples, 1..100 ms: p95 = ordered[95] = 96 ms, median 51 ms: 96 < 3 x 51.
    window = LatencyWindow()
    for ms in range(1, 101):
        window.add(ms / 1000)
    assert Hedging().learned_delay(window) == 0.096
    assert Hedging(delay="p50").learned_delay(window) == 0.051


def test_learned_delay_starts_early_when_the_slow_answers_are_a_mode_of_their_own() -> None:
    # The bench's tail: 95 % answer in 4 ms, 5 % in 64 ms. p95 = ordered[95] = 64 ms is the slow
    # mode itself; 3 x the median (12 ms) is later than p90 (4 ms): hedge at 12 ms.
    window = _window((95, 0.004), (5, 0.064))
    assert Hedging().learned_delay(window) == pytest.approx(0.012)
    # Off: the plain percentile.
    assert Hedging(tail_ratio=None).learned_delay(window) == 0.064
    # A wide fast mode: p90 is later than 3 x the median, so p90 it is (at most 2 x the hedges).
    wide = _window((60, 0.002), (30, 0.004), (5, 0.010), (5, 0.100))
    assert Hedging().learned_delay(wide) == 0.010  # p90 = ordered[90]; 3 x median = 6 ms < 10
    assert Hedging(tail_ratio=4.0).learned_delay(wide) == 0.010  # max(p90 10 ms, 4 x 2 ms)
    assert Hedging(tail_ratio=6.0).learned_delay(wide) == 0.012  # max(p90 10 ms, 6 x 2 ms)
    # Never later than the percentile itself, and never under min_delay.
    assert Hedging(tail_ratio=100.0).learned_delay(window) == 0.064
    fast = _window((100, 0.0001))
    assert Hedging().learned_delay(fast) == 0.002


def test_learned_delay_waits_for_min_samples_and_a_fixed_delay_is_itself() -> None:
    assert Hedging(min_samples=50).learned_delay(_window((49, 0.004))) is None
    assert Hedging(min_samples=50).learned_delay(_window((50, 0.004))) == 0.004
    assert Hedging(delay=0.05).learned_delay(LatencyWindow()) == 0.05


def test_latency_window_keeps_what_it_learned_up_to_date() -> None:
    seen: list[int] = []

    def learn(window: LatencyWindow) -> float | None:
        seen.append(len(window._samples))
        return window.quantile(0.5, min_samples=10)

    window = LatencyWindow(learn=learn)

    def learned() -> float | None:  # a call, so that mypy does not narrow it once for all
        return window.learned

    for _ in range(9):
        window.add(0.001)
    assert learned() is None  # asked after every sample until it knows
    window.add(0.001)
    assert learned() == 0.001 and seen == list(range(1, 11))
    for _ in range(127):
        window.add(0.009)
    assert learned() == 0.001 and len(seen) == 10  # not asked again before 128 samples
    window.add(0.009)
    assert learned() == 0.009 and seen[-1] == 138  # then from every sample, freshly sorted


def test_transport_rejects_a_hedge_that_is_not_hedging() -> None:
    with pytest.raises(ValueError, match="hedge"):
        rs.ResilientTransport(hedge=0.05)  # type: ignore[arg-type]


# --- the race -----------------------------------------------------------------------------------


@ALL_MODES
@pytest.mark.anyio
async def test_a_slow_primary_is_overtaken_by_its_hedge(fleet: Fleet, mode: Mode) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    events = Events()
    inner = Scripted(first(Fault(delay=0.5)))
    transport = make(inner, Hedging(delay=0.05, **EVERYWHERE), events, meter_provider=provider)
    try:
        async with Harness(mode, transport) as h:
            start = time.perf_counter()
            response = await h.get(fleet.urls[0] + "/items")
            elapsed = time.perf_counter() - start
        sums = metric_sums(reader)
    finally:
        provider.shutdown()
    assert response.status_code == 200
    assert attempt_of(response) == 1  # the hedge's answer
    assert outcome_info(response) == {"attempts": 1, "stale": False}  # one round, not a retry
    assert 0.05 <= elapsed < 0.4
    assert events.hedges == [HedgeLaunched("http", 1, 0.05)]
    assert sums["resilient.http.hedges"] == 1
    assert sums["resilient.http.attempts"] == 2
    assert fleet[0].counts().by_method == {"GET": 2}


@ALL_MODES
@pytest.mark.anyio
async def test_losers_give_their_connections_back(fleet: Fleet, mode: Mode) -> None:
    # Async losers are cancelled at once, so 4 connections carry 20 races one after another;
    # sync losers run to their end (0.3 s) and are closed then, so the pool must hold them all.
    url = fleet.urls[0] + "/items"
    n, connections = (8, 9) if mode == "sync" else (20, 4)
    inner = Scripted(
        lambda i: Fault(delay=0.3) if i % 2 == 0 and i < 2 * n else None,
        limits=httpx.Limits(max_connections=connections),
    )
    events = Events()
    # (No breaker: every other attempt is slow and loses its race, and a lost attempt counts
    # as a failure, so a breaker would rightly open half way through.)
    transport = make(inner, Hedging(delay=0.02, **EVERYWHERE), events, breaker=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with Harness(mode, transport, pool=0.5) as h:
            for i in range(n):
                start = time.perf_counter()
                response = await h.get(url)
                assert time.perf_counter() - start < 0.25
                assert attempt_of(response) == 2 * i + 1  # every race won by its hedge
            if mode == "sync":  # the losers' late answers arrive, and are closed at once
                await wait_until_async(lambda: inner.in_flight == 0, timeout=2.0)
                await anyio.sleep(0.05)
            await assert_pool_free(h, url, connections)
        del h, response
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert len(events.hedges) == n
    assert fleet[0].counts().total == 2 * n + connections


@ALL_MODES
@pytest.mark.anyio
async def test_a_fast_primary_launches_no_hedge(fleet: Fleet, mode: Mode) -> None:
    events = Events()
    inner = Scripted()
    transport = make(inner, Hedging(delay=0.25, **EVERYWHERE), events)
    async with Harness(mode, transport) as h:
        answered = [attempt_of(await h.get(fleet.urls[0] + "/items")) for _ in range(20)]
    assert answered == list(range(20))
    assert events.hedges == []
    assert fleet[0].counts().total == 20


@ALL_MODES
@pytest.mark.anyio
async def test_max_hedges_bounds_the_copies(fleet: Fleet, mode: Mode) -> None:
    events = Events()
    inner = Scripted(lambda n: Fault(delay=0.3 if n == 0 else 0.5))  # every copy is slow
    transport = make(inner, Hedging(delay=0.05, max_hedges=2, **EVERYWHERE), events)
    async with Harness(mode, transport) as h:
        start = time.perf_counter()
        response = await h.get(fleet.urls[0] + "/items")
        elapsed = time.perf_counter() - start
    assert response.status_code == 200
    assert attempt_of(response) == 0  # the primary answered first
    assert 0.3 <= elapsed < 0.6
    assert [e.hedge for e in events.hedges] == [1, 2]
    assert [e.after for e in events.hedges] == pytest.approx([0.05, 0.1])
    assert fleet[0].counts().total == 3


@ALL_MODES
@pytest.mark.anyio
async def test_the_second_hedge_answers_when_the_first_is_slow_too(
    fleet: Fleet, mode: Mode
) -> None:
    events = Events()
    inner = Scripted(first(Fault(delay=0.5), Fault(delay=0.5)))
    transport = make(inner, Hedging(delay=0.05, max_hedges=2, **EVERYWHERE), events)
    async with Harness(mode, transport) as h:
        start = time.perf_counter()
        response = await h.get(fleet.urls[0] + "/items")
        elapsed = time.perf_counter() - start
    assert attempt_of(response) == 2
    assert 0.1 <= elapsed < 0.4
    assert [e.hedge for e in events.hedges] == [1, 2]
    assert fleet[0].counts().total == 3


@ALL_MODES
@pytest.mark.anyio
async def test_the_next_hedge_waits_its_turn_after_an_attempt_failed(
    fleet: Fleet, mode: Mode, request: pytest.FixtureRequest
) -> None:
    events = Events()
    inner = Scripted(first(Fault(delay=0.13, status=503), Fault(delay=0.5)))
    transport = make(
        inner, Hedging(delay=0.1, max_hedges=2, **EVERYWHERE), events, wait=0.0, attempts=1
    )
    async with Harness(mode, transport) as h:
        response = await h.get(fleet.urls[0] + "/items")
    assert response.status_code == 200
    assert attempt_of(response) == 2
    assert [e.after for e in events.hedges] == pytest.approx([0.1, 0.2])
    # (A sync race's primary may start a little late in its pool thread: hence 0.07, not 0.1.)
    assert inner.sent_at[1] - inner.sent_at[0] >= 0.07
    assert inner.sent_at[2] - inner.sent_at[0] >= 0.17  # the primary's 503 came at 0.13
    assert fleet[0].counts().total == 3


def test_sync_a_full_pool_means_no_hedge_rather_than_a_queued_one(fleet: Fleet) -> None:
    # Losers run to their end in the pool; with no free worker a request is not hedged at all
    # (no event, no budget token) instead of queueing a hedge behind another request's loser.
    url = fleet.urls[0] + "/items"
    events = Events()
    inner = Scripted(lambda n: Fault(delay=0.6) if n in (0, 2) else None)
    transport = make(inner, Hedging(delay=0.05, threads=True, max_workers=2), events)
    with httpx.Client(transport=transport) as client:
        assert attempt_of(client.get(url)) == 1  # its loser keeps one of the 2 workers 0.6 s
        response = client.get(url)
    assert attempt_of(response) == 2  # the second request's own (slow) first attempt
    assert len(events.hedges) == 1  # only the first request was hedged


def connections(transport: httpx.BaseTransport | None) -> list[int]:
    """The ports of the connections an httpx pool holds."""
    assert isinstance(transport, httpx.HTTPTransport)
    return [c._origin.port or 0 for c in transport._pool.connections]  # type: ignore[attr-defined]


@pytest.mark.parametrize("threads", [False, True], ids=["read-cut", "threads"])
def test_sync_hedges_travel_on_a_pool_of_their_own(fleet: Fleet, threads: bool) -> None:
    # A hedge is sent because its request is late: in the requests' pool it would queue behind
    # them (for httpcore's pool lock, and for a connection when slow requests fill the pool).
    # Every answer here takes 0.15 s, so each request is hedged at 0.05 s. The first hedge to the
    # origin takes the requests' pool (the origin is not hedged often: a pool of its own would
    # only add a connection); from the second on, hedges go on the second pool. (Raced, the
    # first copy must win: by 300 ms, a margin a busy machine keeps.)
    fleet[0].set_faults(latency=0.6 if threads else 0.15)
    port = fleet[0].port
    delay = 0.3 if threads else 0.05
    transport = rs.ResilientTransport(hedge=Hedging(delay=delay, threads=threads), wait=0.0)
    with httpx.Client(transport=transport) as client:
        for _ in range(4):
            response = client.get(fleet.urls[0] + "/items")
            assert response.status_code == 200
            response.close()
        hedges = transport._sync_hedge_inner
        assert hedges is not None
        if threads:
            # The first copies win; each hedge loses, and its connection is closed with its
            # unread answer: the requests' pool keeps the winners' one connection.
            wait_until(
                lambda: connections(hedges) == [] and connections(transport._sync_inner) == [port]
            )
        else:
            # Each cut attempt's connection is closed; the hedges' pool keeps the one its three
            # hedges took in turn.
            assert connections(hedges) == [port]
            assert connections(transport._sync_inner) == []
    assert transport._sync_hedge_inner is None
    assert connections(hedges) == []  # closed with the transport
    assert fleet[0].counts().total == 8


def test_sync_hedges_to_an_origin_hedged_rarely_take_the_requests_pool(fleet: Fleet) -> None:
    # A hedge more than 5 s (httpx's keep-alive) after the origin's last would find no
    # connection kept in a pool of its own: it takes one of the requests' pool instead.
    fleet[0].set_faults(latency=0.15)
    clock = FakeClock()
    transport = rs.ResilientTransport(hedge=Hedging(delay=0.05), wait=0.0, clock=clock)
    with httpx.Client(transport=transport) as client:
        for _ in range(3):
            assert client.get(fleet.urls[0] + "/items").status_code == 200
            clock.advance(5.5)
        assert transport._sync_hedge_inner is None
        assert connections(transport._sync_inner) == [fleet[0].port]  # the last hedge's
    assert fleet[0].counts().total == 6


def test_a_closed_transport_builds_no_pool_for_a_late_hedge() -> None:
    # A `threads=True` race's late hedge may start after the transport closed: a pool built then
    # would never be closed.
    transport = rs.ResilientTransport(hedge=Hedging(delay=0.05), clock=FakeClock())
    request = httpx.Request("GET", "http://127.0.0.1:9/items")
    transport.close()
    for _ in range(2):  # the second, within 5 s of the first: the origin is hedged often
        transport._sync_hedge_transport(request)
    assert transport._sync_hedge_inner is None


def test_sync_hedges_take_the_callers_own_transport_when_it_gave_one(fleet: Fleet) -> None:
    fleet[0].set_faults(latency=0.15)
    inner = httpx.HTTPTransport()
    transport = rs.ResilientTransport(inner, hedge=Hedging(delay=0.05), wait=0.0)
    with httpx.Client(transport=transport) as client:
        for _ in range(3):
            assert client.get(fleet.urls[0] + "/items").status_code == 200
        assert connections(inner) == [fleet[0].port]  # the last hedge's; the cut ones closed
    assert transport._sync_hedge_inner is None
    assert fleet[0].counts().total == 6


# --- what is never hedged -----------------------------------------------------------------------


@ALL_MODES
@pytest.mark.anyio
@pytest.mark.parametrize(
    "case", ["post", "post_with_key", "streamed_put", "request_off", "transport_off"]
)
async def test_requests_that_are_not_hedged(fleet: Fleet, mode: Mode, case: str) -> None:
    events = Events()
    inner = Scripted(first(Fault(delay=0.15)))
    hedge = None if case == "transport_off" else Hedging(delay=0.02, **EVERYWHERE)
    transport = make(inner, hedge, events)
    url = fleet.urls[0] + "/items"
    async with Harness(mode, transport) as h:
        start = time.perf_counter()
        if case == "post":
            response = await h.request("POST", url, content=b"order")
        elif case == "post_with_key":
            # Its key makes a retry after a failure safe, not a copy while it still runs (a
            # server processing the key answers that copy 409 Conflict).
            response = await h.request(
                "POST", url, content=b"order", headers={"Idempotency-Key": "order-1"}
            )
        elif case == "streamed_put":
            response = await h.request("PUT", url, content=h.stream())
        elif case == "request_off":
            response = await h.get(url, extensions={"resilient": {"hedge": False}})
        else:
            response = await h.get(url)
        elapsed = time.perf_counter() - start
    assert response.status_code == 200
    assert attempt_of(response) == 0
    assert elapsed >= 0.15
    assert events.hedges == []
    assert fleet[0].counts().total == 1


@ALL_MODES
@pytest.mark.anyio
@pytest.mark.parametrize("case", ["post_marked_idempotent", "put_bytes"])
async def test_idempotent_requests_with_replayable_bodies_are_hedged(
    fleet: Fleet, mode: Mode, case: str
) -> None:
    events = Events()
    inner = Scripted(first(Fault(delay=0.5)))
    transport = make(inner, Hedging(delay=0.02, **EVERYWHERE), events)
    url = fleet.urls[0] + "/items"
    async with Harness(mode, transport) as h:
        if case == "post_marked_idempotent":  # the caller says a copy is safe
            response = await h.request(
                "POST", url, content=b"order", extensions={"resilient": {"idempotent": True}}
            )
        else:
            response = await h.request("PUT", url, content=b"x" * 3000)
    assert attempt_of(response) == 1
    assert response.json()["body_bytes"] == (5 if case == "post_marked_idempotent" else 3000)
    assert len(events.hedges) == 1
    assert fleet[0].counts().total == 2


@ALL_MODES
@pytest.mark.anyio
async def test_without_threads_or_trio_a_slow_first_attempt_is_abandoned_not_raced(
    fleet: Fleet, mode: Mode
) -> None:
    # asyncio races the copies for the price of a timer; a sync or trio client without
    # threads= / trio= cuts the first attempt's read timeout to the delay, then sends one copy.
    events = Events()
    # (The copy is much slower than the first attempt: raced, the first wins by 500 ms.)
    inner = Scripted(first(Fault(delay=0.15), Fault(delay=0.6)))
    transport = make(inner, Hedging(delay=0.05), events)
    async with Harness(mode, transport) as h:
        start = time.perf_counter()
        response = await h.get(fleet.urls[0] + "/items")
        elapsed = time.perf_counter() - start
    assert response.status_code == 200
    assert outcome_info(response)["attempts"] == 1
    assert events.hedges == [HedgeLaunched("http", 1, 0.05)]
    assert fleet[0].counts().total == 2
    if mode == "asyncio":
        assert attempt_of(response) == 0  # the slow primary still won the race
        assert 0.15 <= elapsed < 0.5
    else:
        assert attempt_of(response) == 1  # the primary was given up at 0.05 s
        assert elapsed >= 0.65


class SlowStart(Scripted):
    """`Scripted`, but request ``slow`` waits ``start`` seconds before it is sent: the time a busy
    client spends taking a connection from the pool and writing the request."""

    def __init__(self, script: Callable[[int], Fault | None], slow: int, start: float) -> None:
        super().__init__(script)
        self.slow, self.start = slow, start

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.sent == self.slow:
            time.sleep(self.start)
        return super().handle_request(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.sent == self.slow:
            await anyio.sleep(self.start)
        return await super().handle_async_request(request)


@ALL_MODES
@pytest.mark.anyio
@pytest.mark.parametrize("path", ["first request", "known host", "deadline"])
async def test_the_hedge_is_due_its_delay_after_the_attempt_began_not_after_it_was_sent(
    fleet: Fleet, mode: Mode, path: str
) -> None:
    # The delay is learned from whole attempts, so it counts from the attempt's start. httpcore
    # reads the read timeout only once the request is written: a cut fixed at the delay would
    # hedge an attempt that took 0.3 s to send at 0.9 s, after its own answer (0.85 s) came.
    slow = 0 if path == "first request" else 1
    inner = SlowStart(lambda n: Fault(delay=0.55) if n == slow else None, slow, start=0.3)
    events = Events()
    options: dict[str, Any] = {"deadline": 5.0} if path == "deadline" else {}
    transport = make(inner, Hedging(delay=0.6), events, **options)
    async with Harness(mode, transport) as h:
        if slow:
            assert attempt_of(await h.get(fleet.urls[0] + "/items")) == 0
        start = time.perf_counter()
        response = await h.get(fleet.urls[0] + "/items")
        elapsed = time.perf_counter() - start
    assert response.status_code == 200
    assert events.hedges == [HedgeLaunched("http", 1, 0.6)]
    assert attempt_of(response) == slow + 1  # the hedge answered first
    assert 0.6 <= elapsed < 0.82
    # The body got the request's own read timeout (with a deadline: the time left).
    assert 4.0 < response.request.extensions["timeout"]["read"] <= 5.0


@ALL_MODES
@pytest.mark.anyio
async def test_a_failed_request_gets_its_own_timeouts_back(mode: Mode) -> None:
    # The read cut is put on the request while an attempt runs; a request that fails must not
    # keep it (the caller may send the same request object again).
    transport = rs.ResilientTransport(hedge=Hedging(delay=0.5), wait=0.0)
    async with Harness(mode, transport) as h:
        for _ in range(2):  # a new host (the whole path), then a known one (the short path)
            with pytest.raises(httpx.ConnectError) as caught:
                await h.get("http://127.0.0.1:1/x")
            timeouts = caught.value.request.extensions["timeout"]
            assert type(timeouts) is dict and timeouts["read"] == 5.0


@ALL_MODES
@pytest.mark.anyio
@pytest.mark.parametrize("options", [{}, {"attempt_timeout": 1.0}, {"deadline": 2.0}])
async def test_a_fallback_and_the_caller_see_the_request_as_it_was_sent(
    mode: Mode, options: dict[str, Any]
) -> None:
    # Not the hedge's read cut nor the timeouts clipped to a deadline: the fallback is handed
    # the request with the timeouts it was sent with, and the caller gets them back.
    seen: list[Any] = []

    def fallback(request: httpx.Request, outcome: object) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, text="degraded")

    transport = rs.ResilientTransport(
        hedge=Hedging(delay=0.5), wait=0.0, fallback=fallback, **options
    )
    async with Harness(mode, transport) as h:
        for _ in range(2):  # a new host (the whole path), then a known one (the short path)
            response = await h.get("http://127.0.0.1:1/x")
            assert response.text == "degraded"
            timeouts = response.request.extensions["timeout"]
            assert type(timeouts) is dict and timeouts["read"] == 5.0
    assert [dict(t) for t in seen] == [{"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 2.0}] * 2


def test_a_read_cut_answers_the_time_left_until_its_hedge_is_due() -> None:
    clock = FakeClock()
    own: dict[str, float | None] = {"connect": 1.0, "read": 5.0}
    cut = _transport._ReadCut.make(own, 0.25, clock.monotonic, clock.monotonic())
    assert cut.get("read") == 0.25 and cut["read"] == 0.25  # a plain reader sees the delay
    assert cut.get("connect") == 1.0 and cut.get("pool") is None and cut.get("pool", 2) == 2
    clock.advance(0.1)
    assert cut.get("read") == pytest.approx(0.15)
    # Sent after half the delay: the replica still gets half the delay to answer (the pool
    # wait is not its fault, and an abandoned attempt counts against it).
    clock.advance(1.0)
    assert cut.get("read") == 0.125
    cut.restore(5.0)
    assert cut.get("read") == 5.0 == cut["read"]
    assert dict(cut) == own
    assert _transport._ReadCut.make(None, 0.1, clock.monotonic, 0.0) == {"read": 0.1}
    # A zero delay still waits 1 ms: a zero timeout would make the socket non-blocking.
    assert _transport._ReadCut.make(own, 0.0, clock.monotonic, 0.0).get("read") == 0.001


# --- the short path: a host already seen ---------------------------------------------------------
# Once a host is known, its requests start on the transport's short path; on asyncio their races
# are started late, by the host's hedge watch, and only for requests still running when due.


@ALL_MODES
@pytest.mark.anyio
async def test_on_a_known_host_a_slow_first_attempt_is_raced_or_abandoned(
    fleet: Fleet, mode: Mode
) -> None:
    events = Events()
    # (Raced, the hedge runs 350 ms before it loses, and the first copy wins by 350 ms: margins
    # a busy machine keeps.)
    inner = Scripted(lambda n: {1: Fault(delay=0.4), 2: Fault(delay=0.7)}.get(n))
    transport = make(inner, Hedging(delay=0.05), events)
    async with Harness(mode, transport) as h:
        assert attempt_of(await h.get(fleet.urls[0] + "/items")) == 0
        start = time.perf_counter()
        response = await h.get(fleet.urls[0] + "/items")
        elapsed = time.perf_counter() - start
    assert response.status_code == 200
    assert outcome_info(response) == {"attempts": 1, "stale": False}
    assert events.hedges == [HedgeLaunched("http", 1, 0.05)]
    assert fleet[0].counts().total == 3
    assert response.request.extensions["timeout"]["read"] == 5.0  # the cut is undone
    breaker = transport.breaker_for(httpx.URL(fleet.urls[0]))
    assert breaker is not None
    # A race's loser, like an attempt given up by the read cut, is a failure: the only evidence
    # against a replica that accepts and never answers.
    assert breaker.metrics()["failures"] == 1
    if mode == "asyncio":
        assert attempt_of(response) == 1  # the slow primary still won the race
        assert 0.4 <= elapsed < 0.65
    else:
        assert attempt_of(response) == 2  # the primary was given up at 0.05 s
        assert elapsed >= 0.75


@pytest.mark.anyio
async def test_on_a_known_host_the_callers_cancellation_cancels_every_attempt(
    fleet: Fleet, anyio_backend: str
) -> None:
    breaker = rs.CircuitBreaker(name="hedged", consecutive_failures=3, clock=FakeClock())
    events = Events()
    inner = Scripted(lambda n: Fault(delay=2.0) if n > 0 else None)
    transport = make(inner, Hedging(delay=0.05), events, breaker=breaker)
    async with Harness(anyio_backend, transport) as h:
        await h.get(fleet.urls[0] + "/items")
        with anyio.move_on_after(0.3) as scope:
            await h.get(fleet.urls[0] + "/items")
        assert scope.cancelled_caught
        if anyio_backend == "asyncio":
            await wait_until_async(lambda: not hedge_tasks(), timeout=0.5)
    assert len(events.hedges) == 1  # asyncio raced a copy; trio gave the first up for one
    assert fleet[0].counts().total == 3
    assert breaker.state == "closed"
    # The cancelled attempts count as nothing; trio's first, given up by the cut, as a failure.
    assert breaker.metrics()["calls"] == (1 if anyio_backend == "asyncio" else 2)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_the_hedge_watch_keeps_time_when_the_delay_shrinks(fleet: Fleet) -> None:
    # A request registered after another, with a shorter delay, is hedged at its own deadline,
    # not behind the earlier request's.
    events = Events()
    inner = Scripted(lambda n: Fault(delay=1.0) if n in (1, 2) else None)
    transport = make(inner, Hedging(delay=0.8), events)
    url = fleet.urls[0] + "/items"
    async with Harness("asyncio", transport) as h:
        await h.get(url)
        launched: dict[str, float] = {}

        async def get(name: str) -> None:
            start = time.perf_counter()
            await h.get(url)
            launched[name] = time.perf_counter() - start

        async with anyio.create_task_group() as tg:
            tg.start_soon(get, "long")  # its hedge is due at 0.8 s
            await anyio.sleep(0.01)
            transport._fixed_delay = 0.05  # as if the learned delay had shrunk
            start = time.perf_counter()
            tg.start_soon(get, "short")
            await wait_until_async(lambda: len(events.hedges) == 1, timeout=0.5)
            assert time.perf_counter() - start < 0.5  # not at 0.8 s
    assert [e.after for e in events.hedges] == [0.05, 0.8]
    assert launched["short"] < 0.5


@pytest.mark.parametrize(
    ("anyio_backend", "mode"), [("trio", "trio"), ("asyncio", "sync")], ids=["trio", "sync"]
)
@pytest.mark.parametrize("deadline", [None, 5.0], ids=["no-deadline", "deadline"])
@pytest.mark.anyio
async def test_an_attempt_given_up_by_the_read_cut_is_copied_even_with_no_budget_left(
    fleet: Fleet, mode: Mode, deadline: float | None
) -> None:
    # The cut gave the attempt up, not its own timeout: with no budget token left, failing the
    # request (as it once did) turned every answer slower than the p95 into a ReadTimeout while
    # the budget was spent (an outage), where asyncio's race simply waits for its first copy.
    # The copy goes all the same, and no read is cut for the next second.
    events = Events()
    inner = Scripted(lambda n: Fault(delay=0.3) if n > 0 else None)
    transport = make(
        inner,
        Hedging(delay=0.05),
        events,
        breaker=None,
        budget=rs.RetryBudget(ratio=0.01, min_per_second=0.01),  # never a whole token
        deadline=deadline,  # (a deadline takes another way to the cut: it must pause too)
    )
    async with Harness(mode, transport) as h:
        await h.get(fleet.urls[0] + "/items")
        response = await h.get(fleet.urls[0] + "/items")  # cut at 0.05 s, its copy answers
        assert response.status_code == 200 and attempt_of(response) == 2
        assert len(events.hedges) == 1
        response = await h.get(fleet.urls[0] + "/items")  # within the second: not cut
    assert response.status_code == 200 and attempt_of(response) == 3
    assert len(events.hedges) == 1
    assert fleet[0].counts().total == 4


def test_hedge_watches_let_finished_loops_go() -> None:
    # A host keeps a hedge watch per asyncio loop, in a weak dictionary: a watch must not keep
    # its loop alive (through the loop or a pending callback of its own). (A mock inner
    # transport: a real one's pooled connections belong to the loop that opened them.)
    transport = rs.ResilientTransport(
        httpx.MockTransport(lambda request: httpx.Response(200)), hedge=Hedging(delay=0.5)
    )
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):
                assert (await client.get("http://hedged.invalid/items")).status_code == 200

    for _ in range(3):
        asyncio.run(main())
    gc.collect()
    assert [ref() is None for ref in loops] == [True, True, True]


# --- the budget -----------------------------------------------------------------------------------


@ALL_MODES
@pytest.mark.anyio
async def test_the_retry_budget_caps_hedges(fleet: Fleet, mode: Mode) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    # ratio 0 and 0.2/s over 10 s on a clock that never moves: exactly two tokens, ever.
    budget = rs.RetryBudget(ratio=0.0, min_per_second=0.2, ttl=10.0, clock=FakeClock())
    events = Events()
    inner = Scripted(lambda n: Fault(delay=0.6) if n in (0, 2, 4) else None)
    transport = make(
        inner, Hedging(delay=0.03, **EVERYWHERE), events, budget=budget, meter_provider=provider
    )
    try:
        async with Harness(mode, transport) as h:
            url = fleet.urls[0] + "/items"
            times: list[float] = []
            answered: list[int] = []
            for _ in range(3):
                start = time.perf_counter()
                answered.append(attempt_of(await h.get(url)))
                times.append(time.perf_counter() - start)
        sums = metric_sums(reader)
    finally:
        provider.shutdown()
    assert answered == [1, 3, 4]  # two hedges won; the third request had to wait for its primary
    assert times[0] < 0.45 and times[1] < 0.45 and times[2] >= 0.6
    assert len(events.hedges) == 2
    assert sums["resilient.http.hedges"] == 2
    assert sums["resilient.http.retry_budget.exhausted"] == 1
    assert budget.balance() == 0
    assert fleet[0].counts().total == 5


@ALL_MODES
@pytest.mark.anyio
async def test_a_refused_second_hedge_still_returns_the_first_answer(
    fleet: Fleet, mode: Mode, request: pytest.FixtureRequest
) -> None:
    budget = rs.RetryBudget(ratio=0.0, min_per_second=0.1, ttl=10.0, clock=FakeClock())  # 1 token
    events = Events()
    # The hedge is slower still: the first copy wins by 500 ms, a margin a busy machine keeps.
    inner = Scripted(lambda n: Fault(delay=0.3 if n == 0 else 0.8))
    transport = make(inner, Hedging(delay=0.05, max_hedges=2, **EVERYWHERE), events, budget=budget)
    async with Harness(mode, transport) as h:
        start = time.perf_counter()
        response = await h.get(fleet.urls[0] + "/items")
        elapsed = time.perf_counter() - start
    assert response.status_code == 200
    assert attempt_of(response) == 0
    assert 0.3 <= elapsed < 0.6
    assert len(events.hedges) == 1
    assert fleet[0].counts().total == 2


@ALL_MODES
@pytest.mark.anyio
async def test_a_refused_hedge_then_a_failed_primary_returns_the_failure(
    fleet: Fleet, mode: Mode, request: pytest.FixtureRequest
) -> None:
    budget = rs.RetryBudget(ratio=0.0, min_per_second=0.05, ttl=10.0, clock=FakeClock())  # none
    events = Events()
    inner = Scripted(first(Fault(delay=0.15, status=503)))
    transport = make(inner, Hedging(delay=0.03, **EVERYWHERE), events, budget=budget, attempts=1)
    async with Harness(mode, transport) as h:
        response = await h.get(fleet.urls[0] + "/items", hang=1.0)
    assert response.status_code == 503
    assert events.hedges == []
    assert fleet[0].counts().total == 1


# --- the learned p95 ------------------------------------------------------------------------------


@ALL_MODES
@pytest.mark.anyio
async def test_p95_waits_for_min_samples_successes(fleet: Fleet, mode: Mode) -> None:
    events = Events()
    inner = Scripted()
    hedge = Hedging(delay="p95", min_samples=20, **EVERYWHERE)
    transport = make(inner, hedge, events, attempts=1, breaker=None)
    url = fleet.urls[0] + "/items"
    async with Harness(mode, transport) as h:
        for _ in range(10):  # failures teach nothing about latency
            assert (await h.get(url + "?status=503")).status_code == 503
        for _ in range(19):
            assert (await h.get(url)).status_code == 200
        start = time.perf_counter()
        await h.get(url + "?delay=0.2")  # 19 samples: not yet hedged
        elapsed = time.perf_counter() - start
    assert elapsed >= 0.2
    assert events.hedges == []
    assert fleet[0].counts().total == 30


@ALL_MODES
@pytest.mark.anyio
async def test_p95_hedges_a_slow_request_after_warm_up_on_that_host(
    fleet: Fleet, mode: Mode
) -> None:
    events = Events()
    inner = Scripted()
    hedge = Hedging(delay="p95", min_samples=20, **EVERYWHERE)
    transport = make(inner, hedge, events)
    fast, other = fleet.urls[0] + "/items", fleet.urls[1] + "/items"
    async with Harness(mode, transport) as h:
        for _ in range(60):  # enough for the p95 to be re-sorted past the first 20 samples
            await h.get(fast)
        warm_up_hedges = len(events.hedges)  # about 5 % of fast requests may be hedged too
        warm_up_total = fleet[0].counts().total

        start = time.perf_counter()
        await h.get(other + "?delay=0.2")  # replica 1 has no samples: not hedged
        assert time.perf_counter() - start >= 0.2
        assert len(events.hedges) == warm_up_hedges

        primary = inner.then(Fault(delay=0.5))
        start = time.perf_counter()
        response = await h.get(fast)
        elapsed = time.perf_counter() - start
    assert attempt_of(response) == primary + 1
    assert elapsed < 0.4
    launched = events.hedges[warm_up_hedges:]
    assert len(launched) == 1
    assert launched[0].hedge == 1
    assert hedge.min_delay <= launched[0].after < 0.05
    assert fleet[0].counts().total == warm_up_total + 2
    assert fleet[1].counts().total == 1


# --- failures during the race -----------------------------------------------------------------------


@ALL_MODES
@pytest.mark.anyio
async def test_a_fast_failing_primary_is_retried_not_hedged(fleet: Fleet, mode: Mode) -> None:
    events = Events()
    inner = Scripted(first(Fault(status=503)))
    transport = make(inner, Hedging(delay=0.5, **EVERYWHERE), events, wait=0.0)
    async with Harness(mode, transport) as h:
        start = time.perf_counter()
        response = await h.get(fleet.urls[0] + "/items")
        elapsed = time.perf_counter() - start
    assert response.status_code == 200
    assert attempt_of(response) == 1
    assert outcome_info(response)["attempts"] == 2
    assert elapsed < 0.45
    assert events.hedges == []
    assert fleet[0].counts().by_status == {503: 1, 200: 1}


@ALL_MODES
@pytest.mark.anyio
@pytest.mark.parametrize("primary", ["read_timeout", "status_503"])
async def test_a_primary_failing_while_its_hedge_runs_lets_the_hedge_answer(
    fleet: Fleet, mode: Mode, primary: str, request: pytest.FixtureRequest
) -> None:
    events = Events()
    fault = (
        Fault(delay=1.0, read_timeout=0.15)
        if primary == "read_timeout"
        else Fault(delay=0.15, status=503)
    )
    inner = Scripted(first(fault, Fault(delay=0.35)))
    transport = make(inner, Hedging(delay=0.05, **EVERYWHERE), events, wait=0.0)
    async with Harness(mode, transport) as h:
        start = time.perf_counter()
        response = await h.get(fleet.urls[0] + "/items")
        elapsed = time.perf_counter() - start
    assert response.status_code == 200
    assert attempt_of(response) == 1  # the hedge, not a retry
    assert outcome_info(response)["attempts"] == 1
    assert 0.35 <= elapsed < 0.8
    assert len(events.hedges) == 1
    assert fleet[0].counts().total == 2


@ALL_MODES
@pytest.mark.anyio
async def test_a_discarded_failed_answer_gives_its_connection_back(
    fleet: Fleet, mode: Mode, request: pytest.FixtureRequest
) -> None:
    url = fleet.urls[0] + "/items"
    inner = Scripted(
        first(Fault(delay=0.1, status=503), Fault(delay=0.3)),
        limits=httpx.Limits(max_connections=2),
    )
    transport = make(inner, Hedging(delay=0.05, **EVERYWHERE), wait=0.0)
    async with Harness(mode, transport, pool=0.5) as h:
        assert (await h.get(url)).status_code == 200
        await assert_pool_free(h, url, 2)


# --- cancellation -----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("state", ["closed", "half_open"])
async def test_the_callers_cancellation_cancels_every_attempt(
    fleet: Fleet, anyio_backend: str, state: str
) -> None:
    if state == "half_open":
        breaker = half_open_breaker(probes=2)  # the primary and its hedge are both probes
    else:
        breaker = rs.CircuitBreaker(name="hedged", consecutive_failures=1, clock=FakeClock())
    events = Events()
    inner = Scripted(lambda n: Fault(delay=2.0))
    transport = make(inner, Hedging(delay=0.05, trio=True), events, breaker=breaker)
    async with Harness(anyio_backend, transport) as h:
        start = time.perf_counter()
        with anyio.move_on_after(0.3) as scope:
            await h.get(fleet.urls[0] + "/items")
        elapsed = time.perf_counter() - start
        assert scope.cancelled_caught
        assert elapsed < 1.0
        if anyio_backend == "asyncio":  # cancelled hedges end within moments, not at 2 s
            await wait_until_async(lambda: not hedge_tasks(), timeout=0.5)
    assert len(events.hedges) == 1
    assert fleet[0].counts().total == 2
    assert breaker.metrics()["probes_in_flight"] == 0
    assert breaker.state == state
    if state == "closed":  # a cancelled attempt counts as nothing
        assert breaker.metrics()["calls"] == 0


@pytest.mark.anyio
async def test_the_callers_cancellation_after_the_primary_failed_cancels_the_hedge(
    fleet: Fleet, anyio_backend: str, request: pytest.FixtureRequest
) -> None:
    breaker = half_open_breaker(probes=2)
    inner = Scripted(first(Fault(delay=1.0, read_timeout=0.1), Fault(delay=1.5)))
    transport = make(inner, Hedging(delay=0.05, trio=True), breaker=breaker)
    async with Harness(anyio_backend, transport) as h:
        with anyio.move_on_after(0.3) as scope:
            await h.get(fleet.urls[0] + "/items")
        assert scope.cancelled_caught
        try:
            if anyio_backend == "asyncio":
                await wait_until_async(lambda: not hedge_tasks(), timeout=0.5)
            assert breaker.metrics()["probes_in_flight"] == 0
        finally:
            if anyio_backend == "asyncio":  # the bug's leftovers must not run into later tests
                for task in hedge_tasks():
                    task.cancel()
    assert fleet[0].counts().total == 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
@pytest.mark.skipif(sys.version_info < (3, 11), reason="cancellation counts are Python 3.11+")
async def test_asyncio_a_winning_hedge_leaves_no_cancellation_behind(fleet: Fleet) -> None:
    inner = Scripted(lambda n: Fault(delay=0.5) if n % 2 == 0 else None)
    transport = make(inner, Hedging(delay=0.03))
    task = asyncio.current_task()
    assert task is not None
    async with Harness("asyncio", transport) as h:
        with anyio.move_on_after(5.0) as scope:  # an enclosing scope must not see the race's cancel
            response = await h.get(fleet.urls[0] + "/items")
        assert not scope.cancelled_caught
        assert attempt_of(response) == 1
        if sys.version_info >= (3, 11):
            assert task.cancelling() == 0
        await asyncio.sleep(0.01)  # no cancellation pending either
        response = await h.get(fleet.urls[0] + "/items")
        assert attempt_of(response) == 3
        if sys.version_info >= (3, 11):
            assert task.cancelling() == 0
        await wait_until_async(lambda: not hedge_tasks(), timeout=0.5)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_race_without_a_winner_leaves_no_lost_mark_on_the_next_round(
    anyio_backend: str, fleet: Fleet
) -> None:
    # Round 1: the first copy and its hedge both answer 503 (no winner), so the request is
    # retried. Round 2 is cancelled by the caller at 0.95 s, with both of its copies running for
    # longer than the hedge delay. Those copies lost no race: given back, not counted as
    # failures (a mark left set by round 1 counted them).
    fleet[0].set_faults(error_rate=1.0, latency=0.5)
    breaker = rs.CircuitBreaker(name="host", consecutive_failures=100, min_calls=1000)
    t = rs.ResilientTransport(
        hedge=Hedging(delay=0.05), breaker=breaker, wait=0.0, deadline=10.0, attempts=3
    )
    async with httpx.AsyncClient(transport=t, timeout=5.0) as client:
        with anyio.move_on_after(0.95):
            await client.get(f"{fleet.urls[0]}/x")
    assert fleet[0].counts().total == 4  # two copies in each round
    assert breaker.metrics()["failures"] == 2  # round 1's two 503s, nothing of round 2


@pytest.mark.anyio
async def test_a_caller_cancelled_while_its_race_waits_for_a_hedge_leaves_no_connection_held(
    fleet: Fleet, anyio_backend: str
) -> None:
    # The first copy answers 503 at 0.1 s while its hedge (sent at 0.05 s) still runs; the caller
    # gives up at 0.3 s, while the race waits for the hedge. Nobody takes that 503 any more:
    # unclosed, it held one of the pool's two connections for good, and two such requests
    # left every later one waiting for a connection (PoolTimeout).
    url = fleet.urls[0] + "/items"
    inner = Scripted(
        lambda n: Fault(delay=0.1, status=503) if n % 2 == 0 else Fault(delay=5.0),
        limits=httpx.Limits(max_connections=2),
    )
    transport = make(inner, Hedging(delay=0.05, trio=True), attempts=1, breaker=None)
    async with Harness(anyio_backend, transport, pool=0.5) as h:
        for _ in range(2):
            with anyio.move_on_after(0.3) as scope:
                await h.get(url)
            assert scope.cancelled_caught
        await anyio.sleep(0.05)  # (asyncio closes them in tasks of their own)
        response = await h.get(
            url, extensions={"resilient": {"hedge": False}}, timeout=httpx.Timeout(5.0, pool=0.5)
        )
    assert response.status_code in (200, 503)  # it got a connection


class Recording(Scripted):
    """`Scripted`, noting which request's context each attempt was sent in."""

    def __init__(self, script: Callable[[int], Fault | None]) -> None:
        super().__init__(script)
        self.contexts: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.contexts.append((request.url.path, WHO.get()))
        return await super().handle_async_request(request)


WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="-")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_asyncio_hedges_run_in_their_own_requests_context(fleet: Fleet) -> None:
    # The short path watches hedgeable requests and races one when its hedge is due; the race
    # was made in the context of whichever request had scheduled the watch's wake-up, so B's
    # hedge saw A's context variables (a tenant, a log id, the current span).
    inner = Recording(lambda n: Fault(delay=0.3) if n in (1, 2) else None)
    transport = make(inner, Hedging(delay=0.05))
    base = fleet.urls[0]

    async def one(client: httpx.AsyncClient, name: str, pause: float) -> None:
        await anyio.sleep(pause)
        WHO.set(name)
        assert (await client.get(f"{base}/{name}")).status_code == 200

    async with httpx.AsyncClient(transport=transport) as client:
        await client.get(base + "/warm")  # the host is known: the short path from here
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, client, "A", 0.0)
            tg.start_soon(one, client, "B", 0.02)
    hedged = [c for c in inner.contexts if c[0] != "/warm"]
    assert len(hedged) == 4  # a first copy and a hedge each
    assert all(path == "/" + who for path, who in hedged), hedged


@ALL_MODES
@pytest.mark.anyio
async def test_a_race_whose_first_copy_raised_answers_with_its_hedges_answer(
    fleet: Fleet, mode: Mode
) -> None:
    # The first copy times out at 0.1 s; its hedge (0.05 s) answered 503 before that. With no
    # attempt left, the request gets the hedge's 503 (an answer beats an error) on every
    # runtime: asyncio closed it and raised the timeout.
    inner = Scripted(first(Fault(delay=1.0, read_timeout=0.1), Fault(status=503)))
    transport = make(inner, Hedging(delay=0.05, **EVERYWHERE), attempts=1, breaker=None)
    async with Harness(mode, transport) as h:
        response = await h.get(fleet.urls[0] + "/items")
    assert response.status_code == 503
    assert attempt_of(response) == 1


def test_an_attempt_timeout_shorter_than_two_delays_does_not_turn_hedging_off(
    fleet: Fleet,
) -> None:
    # A copy gets an attempt timeout of its own: only the time left before the deadline decides
    # whether a cut pays. (Comparing the attempt timeout turned hedging off here.)
    # (The copy has 250 ms to spare, a margin a busy machine keeps.)
    fleet[0].set_faults(latency=0.7)
    transport = rs.ResilientTransport(
        deadline=5.0, attempt_timeout=0.95, hedge=Hedging(delay=0.5), breaker=None
    )
    with httpx.Client(transport=transport) as client:
        assert client.get(fleet.urls[0] + "/items").status_code == 200
    assert fleet[0].counts().total == 2  # cut at 0.5 s, and copied
