"""`ResilientTransport` against real replica servers on loopback, sync and on asyncio and trio.

Waits go through a `FakeClock` (recorded in ``clock.sleeps``, never slept); the few tests about
real time (read timeouts, deadlines) use small bounded waits with wide margins.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import resilient as rs
from resilient.http import Classifier
from resilient.http import _transport as _transport_module
from resilient.testing import FakeClock, Fleet
from tests.http.conftest import (
    HookedClock,
    RecordingTransport,
    wait_until,
    wait_until_async,
)

pytestmark = pytest.mark.slow


def info(response: httpx.Response) -> dict[str, Any]:
    """What the transport says about how it got this response."""
    value = response.extensions["resilient"]
    assert isinstance(value, dict)
    return value


def notes(exc: BaseException) -> str:
    return "\n".join(getattr(exc, "__notes__", []))


def chunks(n: int = 3, size: int = 10_000) -> Iterator[bytes]:
    for _ in range(n):
        yield b"x" * size


async def achunks(n: int = 3, size: int = 10_000) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield b"x" * size


# --- retried statuses -------------------------------------------------------------------------


def test_get_answered_503_then_200_is_retried(fleet: Fleet) -> None:
    fleet[0].set_faults(error_rate=1.0)
    clock = HookedClock({0: fleet[0].set_faults})  # the server recovers during the first wait
    transport = rs.ResilientTransport(clock=clock, random=lambda: 0.5)
    with httpx.Client(transport=transport) as client:
        response = client.get(fleet.urls[0] + "/items")
    assert response.status_code == 200
    assert info(response) == {"attempts": 2, "stale": False}
    assert clock.sleeps == [pytest.approx(0.05)]  # full jitter: 0.5 × 100 ms
    counts = fleet[0].counts()
    assert counts.by_method == {"GET": 2}
    assert counts.by_status == {503: 1, 200: 1}


@pytest.mark.anyio
async def test_get_answered_503_then_200_is_retried_async(fleet: Fleet) -> None:
    fleet[0].set_faults(error_rate=1.0)
    clock = HookedClock({0: fleet[0].set_faults})
    transport = rs.ResilientTransport(clock=clock, random=lambda: 0.5)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get(fleet.urls[0] + "/items")
    assert response.status_code == 200
    assert info(response) == {"attempts": 2, "stale": False}
    assert clock.sleeps == [pytest.approx(0.05)]
    counts = fleet[0].counts()
    assert counts.by_method == {"GET": 2}
    assert counts.by_status == {503: 1, 200: 1}


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_are_retried_until_attempts_run_out(
    fleet: Fleet, clock: FakeClock, status: int
) -> None:
    transport = rs.ResilientTransport(clock=clock, wait=0.0)
    with httpx.Client(transport=transport) as client:
        response = client.get(fleet.urls[0] + "/x", params={"status": status})
    assert response.status_code == status  # the last answer is returned, not raised
    assert info(response)["attempts"] == 3
    assert clock.sleeps == [0.0, 0.0]
    assert fleet[0].counts().by_status == {status: 3}


@pytest.mark.parametrize("status", [200, 400, 404, 409, 500, 501])
def test_other_statuses_are_not_retried(fleet: Fleet, clock: FakeClock, status: int) -> None:
    transport = rs.ResilientTransport(clock=clock, wait=0.0)
    with httpx.Client(transport=transport) as client:
        response = client.get(fleet.urls[0] + "/x", params={"status": status})
    assert response.status_code == status
    assert info(response)["attempts"] == 1
    assert clock.sleeps == []
    assert fleet[0].counts().by_status == {status: 1}


def test_retry_statuses_are_configurable(fleet: Fleet, clock: FakeClock) -> None:
    classifier = Classifier(retry_statuses=frozenset({500}))
    transport = rs.ResilientTransport(clock=clock, wait=0.0, classifier=classifier)
    with httpx.Client(transport=transport) as client:
        assert info(client.get(fleet.urls[0] + "/x?status=500"))["attempts"] == 3
        assert info(client.get(fleet.urls[0] + "/x?status=503"))["attempts"] == 1
    assert fleet[0].counts().by_status == {500: 3, 503: 1}


def test_post_answered_503_is_not_retried(fleet: Fleet, clock: FakeClock) -> None:
    transport = rs.ResilientTransport(clock=clock, wait=0.0)
    with httpx.Client(transport=transport) as client:
        response = client.post(fleet.urls[0] + "/orders?status=503", json={"item": 1})
        keyed = client.post(
            fleet.urls[0] + "/orders?status=503",
            json={"item": 2},
            headers={"Idempotency-Key": "order-2"},
        )
    assert info(response)["attempts"] == 1
    assert info(keyed)["attempts"] == 3
    assert fleet[0].counts().by_method == {"POST": 4}
    assert fleet[0].counts().by_key == {"order-2": 3}


# --- POST: not sent vs. maybe processed -----------------------------------------------------------


def test_post_after_connection_refused_is_retried_and_arrives_once(fleet: Fleet) -> None:
    fleet[0].kill()
    clock = HookedClock({0: fleet[0].restart})  # back up during the first retry wait
    transport = rs.ResilientTransport(clock=clock)
    with httpx.Client(transport=transport) as client:
        response = client.post(
            fleet.urls[0] + "/orders", json={"item": 1}, headers={"X-Request-Id": "order-1"}
        )
    assert response.status_code == 200
    assert response.json()["method"] == "POST"
    assert info(response)["attempts"] == 2
    assert len(clock.sleeps) == 1
    counts = fleet[0].counts()
    assert counts.by_method == {"POST": 1}
    assert counts.by_key == {"order-1": 1}


@pytest.mark.anyio
async def test_post_after_connection_refused_is_retried_and_arrives_once_async(
    fleet: Fleet,
) -> None:
    fleet[0].kill()
    clock = HookedClock({0: fleet[0].restart})
    transport = rs.ResilientTransport(clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post(
            fleet.urls[0] + "/orders", json={"item": 1}, headers={"X-Request-Id": "order-1"}
        )
    assert response.status_code == 200
    assert info(response)["attempts"] == 2
    counts = fleet[0].counts()
    assert counts.by_method == {"POST": 1}
    assert counts.by_key == {"order-1": 1}


def test_post_after_read_timeout_is_not_retried(fleet: Fleet, clock: FakeClock) -> None:
    transport = rs.ResilientTransport(clock=clock)
    timeout = httpx.Timeout(5.0, read=0.2)
    with (
        httpx.Client(transport=transport, timeout=timeout) as client,
        pytest.raises(httpx.ReadTimeout) as caught,
    ):
        client.post(fleet.urls[0] + "/orders?delay=1", json={}, headers={"X-Request-Id": "order-2"})
    assert fleet[0].counts().by_key == {"order-2": 1}
    assert clock.sleeps == []
    assert "not retried" in notes(caught.value)
    assert "Idempotency-Key" in notes(caught.value)


def test_post_with_idempotency_key_is_retried_after_read_timeout(
    fleet: Fleet, clock: FakeClock
) -> None:
    transport = rs.ResilientTransport(clock=clock, attempts=3)
    timeout = httpx.Timeout(5.0, read=0.2)
    with (
        httpx.Client(transport=transport, timeout=timeout) as client,
        pytest.raises(httpx.ReadTimeout) as caught,
    ):
        client.post(
            fleet.urls[0] + "/orders?delay=1", json={}, headers={"Idempotency-Key": "order-3"}
        )
    assert fleet[0].counts().by_key == {"order-3": 3}
    assert len(clock.sleeps) == 2
    assert "gave up after 3 attempt(s)" in notes(caught.value)


# --- streamed request bodies -------------------------------------------------------------------


def test_streamed_put_answered_503_is_not_resent(fleet: Fleet, clock: FakeClock) -> None:
    transport = rs.ResilientTransport(clock=clock, wait=0.0)
    with httpx.Client(transport=transport) as client:
        streamed = client.put(fleet.urls[0] + "/blob?status=503", content=chunks())
        replayable = client.put(fleet.urls[0] + "/blob?status=503", content=b"x" * 30_000)
    assert streamed.status_code == 503
    assert info(streamed)["attempts"] == 1
    assert streamed.json()["body_bytes"] == 30_000
    assert info(replayable)["attempts"] == 3  # the same PUT with a bytes body is retried
    counts = fleet[0].counts()
    assert counts.by_method == {"PUT": 4}
    assert counts.truncated_bodies == 0


@pytest.mark.anyio
async def test_streamed_put_answered_503_is_not_resent_async(
    fleet: Fleet, clock: FakeClock
) -> None:
    transport = rs.ResilientTransport(clock=clock, wait=0.0)
    async with httpx.AsyncClient(transport=transport) as client:
        streamed = await client.put(fleet.urls[0] + "/blob?status=503", content=achunks())
    assert streamed.status_code == 503
    assert info(streamed)["attempts"] == 1
    assert streamed.json()["body_bytes"] == 30_000
    counts = fleet[0].counts()
    assert counts.by_method == {"PUT": 1}
    assert counts.truncated_bodies == 0


def test_streamed_put_after_read_timeout_is_not_resent(fleet: Fleet, clock: FakeClock) -> None:
    # a PUT may be retried after a timeout, but not once its one-shot body has gone out
    transport = rs.ResilientTransport(clock=clock)
    timeout = httpx.Timeout(5.0, read=0.2)
    with (
        httpx.Client(transport=transport, timeout=timeout) as client,
        pytest.raises(httpx.ReadTimeout) as caught,
    ):
        client.put(fleet.urls[0] + "/blob?delay=1", content=chunks())
    assert "streamed request body was already" in notes(caught.value)
    assert clock.sleeps == []
    counts = fleet[0].counts()
    assert counts.by_method == {"PUT": 1}
    assert counts.truncated_bodies == 0


def test_streamed_put_after_connection_refused_is_retried_and_arrives_whole(
    fleet: Fleet,
) -> None:
    fleet[0].kill()
    clock = HookedClock({0: fleet[0].restart})
    transport = rs.ResilientTransport(clock=clock)
    with httpx.Client(transport=transport) as client:
        response = client.put(fleet.urls[0] + "/blob", content=chunks())
    assert response.status_code == 200
    assert info(response)["attempts"] == 2
    assert response.json()["body_bytes"] == 30_000
    counts = fleet[0].counts()
    assert counts.by_method == {"PUT": 1}
    assert counts.truncated_bodies == 0


@pytest.mark.anyio
async def test_streamed_put_after_connection_refused_is_retried_and_arrives_whole_async(
    fleet: Fleet,
) -> None:
    fleet[0].kill()
    clock = HookedClock({0: fleet[0].restart})
    transport = rs.ResilientTransport(clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.put(fleet.urls[0] + "/blob", content=achunks())
    assert response.status_code == 200
    assert info(response)["attempts"] == 2
    assert response.json()["body_bytes"] == 30_000
    counts = fleet[0].counts()
    assert counts.by_method == {"PUT": 1}
    assert counts.truncated_bodies == 0


# --- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_are_waited(fleet: Fleet, clock: FakeClock, status: int) -> None:
    transport = rs.ResilientTransport(clock=clock, attempts=2, wait=0.25)
    with httpx.Client(transport=transport) as client:
        response = client.get(fleet.urls[0] + "/x", params={"status": status, "retry_after": "1.5"})
    assert info(response)["attempts"] == 2
    assert clock.sleeps == [1.5]
    assert fleet[0].counts().total == 2


def test_retry_after_http_date_is_waited(fleet: Fleet, clock: FakeClock) -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=3)
    date = email.utils.format_datetime(when, usegmt=True)  # whole seconds: 2 < wait <= 3
    transport = rs.ResilientTransport(clock=clock, attempts=2, wait=0.25)
    with httpx.Client(transport=transport) as client:
        client.get(fleet.urls[0] + "/x", params={"status": 503, "retry_after": date})
    assert len(clock.sleeps) == 1
    assert 1.5 <= clock.sleeps[0] <= 3.5


def test_retry_after_beyond_the_deadline_returns_the_answer_at_once(
    fleet: Fleet, clock: FakeClock
) -> None:
    transport = rs.ResilientTransport(clock=clock, deadline=5.0)
    with httpx.Client(transport=transport) as client:
        response = client.get(fleet.urls[0] + "/x", params={"status": 503, "retry_after": "3600"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3600"
    assert info(response)["attempts"] == 1
    assert clock.sleeps == []
    assert fleet[0].counts().total == 1


@pytest.mark.parametrize("value", ["-1", "-0.5", "soon", "1.5s", "nan", "inf", ""])
def test_invalid_retry_after_falls_back_to_backoff(
    fleet: Fleet, clock: FakeClock, value: str
) -> None:
    transport = rs.ResilientTransport(clock=clock, attempts=2, wait=0.25)
    with httpx.Client(transport=transport) as client:
        client.get(fleet.urls[0] + "/x", params={"status": 503, "retry_after": value})
    assert clock.sleeps == [0.25]


def test_retry_after_is_capped_by_max_retry_after(fleet: Fleet) -> None:
    url = fleet.urls[0] + "/x?status=503&retry_after=100"
    default_clock, capped_clock = FakeClock(), FakeClock()
    default = rs.ResilientTransport(clock=default_clock, attempts=2)
    capped = rs.ResilientTransport(
        clock=capped_clock, attempts=2, classifier=Classifier(max_retry_after=2.0)
    )
    with httpx.Client(transport=default) as client:
        client.get(url)
    with httpx.Client(transport=capped) as client:
        client.get(url)
    assert default_clock.sleeps == [30.0]
    assert capped_clock.sleeps == [2.0]


def test_retry_after_on_other_statuses_is_ignored(fleet: Fleet, clock: FakeClock) -> None:
    transport = rs.ResilientTransport(clock=clock, attempts=2, wait=0.25)
    with httpx.Client(transport=transport) as client:
        client.get(fleet.urls[0] + "/x", params={"status": 502, "retry_after": "1.5"})
    assert clock.sleeps == [0.25]


# --- discarded responses are closed -----------------------------------------------------------


def test_discarded_responses_are_closed(fleet: Fleet) -> None:
    # Every retry discards a 503; were one left open, a pool of 10 connections would run dry
    # after 10 of them and the next request would fail with PoolTimeout.
    fleet[0].set_faults(error_rate=0.5)
    transport = rs.ResilientTransport(
        transport=httpx.HTTPTransport(limits=httpx.Limits(max_connections=10)),
        attempts=10,
        wait=0.0,
        budget=None,
        breaker=None,  # half the answers fail: a breaker would open and hide the pool
        hedge=None,  # exact counts below: no speculative copies
        clock=FakeClock(),
    )
    statuses: Counter[int] = Counter()
    attempts = 0
    with httpx.Client(transport=transport, timeout=httpx.Timeout(5.0, pool=1.0)) as client:
        for _ in range(1000):
            response = client.get(fleet.urls[0] + "/x")
            statuses[response.status_code] += 1
            attempts += info(response)["attempts"]
    counts = fleet[0].counts()
    assert counts.total == attempts
    assert counts.by_status.get(503, 0) >= 300  # hundreds of discarded answers
    assert set(statuses) <= {200, 503}
    assert statuses[200] >= 990


@pytest.mark.anyio
async def test_discarded_responses_are_closed_async(fleet: Fleet) -> None:
    fleet[0].set_faults(error_rate=0.5)
    transport = rs.ResilientTransport(
        transport=httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=10)),
        attempts=10,
        wait=0.0,
        budget=None,
        breaker=None,
        clock=FakeClock(),
    )
    statuses: Counter[int] = Counter()
    attempts = 0
    async with httpx.AsyncClient(
        transport=transport, timeout=httpx.Timeout(5.0, pool=1.0)
    ) as client:
        for _ in range(300):
            response = await client.get(fleet.urls[0] + "/x")
            statuses[response.status_code] += 1
            attempts += info(response)["attempts"]
    counts = fleet[0].counts()
    assert counts.total >= attempts  # hedges, if any, add to what the server saw
    assert counts.by_status.get(503, 0) >= 90
    assert set(statuses) <= {200, 503}
    assert statuses[200] >= 295


# --- the short path: requests to a host already seen --------------------------------------------
#
# Once a host is known, an ordinary request (no options, a bytes body, a closed breaker, no
# bulkhead, deadline or telemetry) makes its first attempt on a short path and hands anything but
# a good answer to the whole path. Most tests above send their first request to a fresh
# transport; these send one good request first, so the hand-over itself is what they test.


class Spy:
    """Counts the requests that take the whole path (`ResilientTransport._handle`)."""

    def __init__(self, transport: rs.ResilientTransport, monkeypatch: pytest.MonkeyPatch) -> None:
        self.whole = 0
        for name in ("_handle", "_handle_async"):
            original = getattr(transport, name)
            if name == "_handle":

                def sync(request: httpx.Request, original: Any = original) -> httpx.Response:
                    self.whole += 1
                    return original(request)  # type: ignore[no-any-return]

                monkeypatch.setattr(transport, name, sync)
            else:

                async def async_(
                    request: httpx.Request, original: Any = original
                ) -> httpx.Response:
                    self.whole += 1
                    return await original(request)  # type: ignore[no-any-return]

                monkeypatch.setattr(transport, name, async_)


def test_requests_to_a_known_host_take_the_short_path(
    fleet: Fleet, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = rs.ResilientTransport(clock=clock, hedge=rs.http.Hedging(delay=0.5))
    spy = Spy(transport, monkeypatch)
    url = fleet.urls[0] + "/items"
    with httpx.Client(transport=transport, timeout=httpx.Timeout(5.0)) as client:
        first = client.get(url)
        assert spy.whole == 1  # a new host: the whole path
        responses = [client.get(url) for _ in range(3)] + [client.post(url, content=b"x")]
        assert spy.whole == 1
        for response in responses:
            assert response.status_code == 200
            assert info(response) == {"attempts": 1, "stale": False}
            # The hedge's read cut (0.5 s) is undone before the body is read.
            assert response.request.extensions["timeout"]["read"] == 5.0
        breaker = transport.breaker_for(httpx.URL(url))
        assert breaker is not None
        assert breaker.metrics()["calls"] == 5  # the short path reports to the breaker
        # What the short path leaves out sends a request the whole way:
        client.get(url, extensions={"resilient": {"attempts": 2}})
        client.put(url, content=iter([b"streamed"]))
        rs.Timeout(5.0, clock=clock)(lambda: client.get(url))()  # an ambient deadline
        assert spy.whole == 4
        breaker.open()
        with pytest.raises(rs.CircuitOpenError):
            client.get(url)
        assert spy.whole == 5
    assert first.status_code == 200
    assert fleet[0].counts().total == 8


@pytest.mark.anyio
async def test_async_requests_to_a_known_host_take_the_short_path(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = rs.ResilientTransport(hedge=rs.http.Hedging(delay=0.5))
    spy = Spy(transport, monkeypatch)
    url = fleet.urls[0] + "/items"
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0)) as client:
        await client.get(url)
        responses = [await client.get(url) for _ in range(3)]
        assert spy.whole == 1
        for response in responses:
            assert info(response) == {"attempts": 1, "stale": False}
            assert response.request.extensions["timeout"]["read"] == 5.0
        await client.get(url, extensions={"resilient": {"hedge": False}})
        assert spy.whole == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bulkhead": rs.Bulkhead(max_concurrent=4)},
        {"deadline": 5.0},
        {"attempt_timeout": 5.0},
        {"hedge": rs.http.Hedging(threads=True)},
        {"fallback": rs.http.StaleIfError()},
    ],
    ids=["bulkhead", "deadline", "attempt_timeout", "threads", "stale_if_error"],
)
def test_transports_configured_beyond_the_short_path_take_the_whole_path(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any]
) -> None:
    transport = rs.ResilientTransport(**kwargs)
    spy = Spy(transport, monkeypatch)
    with httpx.Client(transport=transport) as client:
        for _ in range(3):
            assert client.get(fleet.urls[0] + "/items").status_code == 200
    assert spy.whole == 3


def test_known_host_get_answered_503_then_200_is_retried(fleet: Fleet) -> None:
    clock = HookedClock({0: fleet[0].set_faults})  # the server recovers during the first wait
    transport = rs.ResilientTransport(clock=clock, random=lambda: 0.5)
    with httpx.Client(transport=transport) as client:
        assert client.get(fleet.urls[0] + "/items").status_code == 200
        fleet[0].set_faults(error_rate=1.0)
        response = client.get(fleet.urls[0] + "/items")
    assert response.status_code == 200
    assert info(response) == {"attempts": 2, "stale": False}
    assert clock.sleeps == [pytest.approx(0.05)]
    assert fleet[0].counts().by_status == {200: 2, 503: 1}


@pytest.mark.anyio
async def test_known_host_get_answered_503_then_200_is_retried_async(fleet: Fleet) -> None:
    clock = HookedClock({0: fleet[0].set_faults})
    transport = rs.ResilientTransport(clock=clock, random=lambda: 0.5)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(fleet.urls[0] + "/items")).status_code == 200
        fleet[0].set_faults(error_rate=1.0)
        response = await client.get(fleet.urls[0] + "/items")
    assert response.status_code == 200
    assert info(response) == {"attempts": 2, "stale": False}
    assert fleet[0].counts().by_status == {200: 2, 503: 1}


def test_known_host_post_after_connection_refused_is_retried_and_arrives_once(
    fleet: Fleet,
) -> None:
    clock = HookedClock({0: fleet[0].restart})  # back up during the first retry wait
    transport = rs.ResilientTransport(clock=clock)
    with httpx.Client(transport=transport) as client:
        assert client.get(fleet.urls[0] + "/items").status_code == 200
        fleet[0].kill()
        response = client.post(
            fleet.urls[0] + "/orders", json={"item": 1}, headers={"X-Request-Id": "order-1"}
        )
    assert response.status_code == 200
    assert info(response)["attempts"] == 2
    assert fleet[0].counts().by_key == {"order-1": 1}


@pytest.mark.anyio
async def test_known_host_post_after_connection_refused_is_retried_and_arrives_once_async(
    fleet: Fleet,
) -> None:
    clock = HookedClock({0: fleet[0].restart})
    transport = rs.ResilientTransport(clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(fleet.urls[0] + "/items")).status_code == 200
        fleet[0].kill()
        response = await client.post(
            fleet.urls[0] + "/orders", json={"item": 1}, headers={"X-Request-Id": "order-1"}
        )
    assert response.status_code == 200
    assert info(response)["attempts"] == 2
    assert fleet[0].counts().by_key == {"order-1": 1}


def test_known_host_errors_of_later_attempts_do_not_chain_the_first(fleet: Fleet) -> None:
    transport = rs.ResilientTransport(clock=FakeClock())
    with httpx.Client(transport=transport) as client:
        assert client.get(fleet.urls[0] + "/items").status_code == 200
        fleet[0].kill()
        with pytest.raises(httpx.ConnectError) as caught:
            client.get(fleet.urls[0] + "/items")
    assert "gave up after 3 attempt(s)" in notes(caught.value)
    chain = []  # as on the whole path: not "during handling of" an earlier attempt's error
    context = caught.value.__context__
    while context is not None:
        chain.append(context)
        context = context.__context__
    assert not [c for c in chain if isinstance(c, httpx.TransportError)]


def test_known_host_post_after_read_timeout_is_not_retried(fleet: Fleet, clock: FakeClock) -> None:
    transport = rs.ResilientTransport(clock=clock)
    timeout = httpx.Timeout(5.0, read=0.2)
    with httpx.Client(transport=transport, timeout=timeout) as client:
        assert client.get(fleet.urls[0] + "/items").status_code == 200
        with pytest.raises(httpx.ReadTimeout) as caught:
            client.post(
                fleet.urls[0] + "/orders?delay=1", json={}, headers={"X-Request-Id": "order-2"}
            )
    assert fleet[0].counts().by_key == {"order-2": 1}
    assert clock.sleeps == []
    assert "Idempotency-Key" in notes(caught.value)


@pytest.mark.anyio
async def test_known_host_cancelled_request_gives_its_breaker_permit_back(fleet: Fleet) -> None:
    breaker = rs.CircuitBreaker(name="short", consecutive_failures=1, clock=FakeClock())
    transport = rs.ResilientTransport(breaker=breaker, hedge=None)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(fleet.urls[0] + "/items")).status_code == 200
        with anyio.move_on_after(0.2) as scope:
            await client.get(fleet.urls[0] + "/items?delay=2")
        assert scope.cancelled_caught
        assert breaker.state == "closed"
        assert breaker.metrics()["calls"] == 1  # the cancelled attempt counts as nothing
        assert (await client.get(fleet.urls[0] + "/items")).status_code == 200


def test_an_empty_idempotency_key_does_not_make_a_post_retryable(
    fleet: Fleet, clock: FakeClock
) -> None:
    transport = rs.ResilientTransport(clock=clock, breaker=None)
    with httpx.Client(transport=transport) as client:
        response = client.post(
            fleet.urls[0] + "/orders?status=503", json={}, headers={"Idempotency-Key": ""}
        )
    assert response.status_code == 503
    assert fleet[0].counts().total == 1  # not sent again: a blank key names no operation


@pytest.mark.parametrize("name", ["idempotent", "retry", "hedge"])
def test_a_per_request_switch_must_be_a_bool(fleet: Fleet, name: str) -> None:
    # "false" is a non-empty string: read with bool(), it turned retries of a POST on.
    transport = rs.ResilientTransport(breaker=None)
    with (
        httpx.Client(transport=transport) as client,
        pytest.raises(ValueError, match=rf"\['{name}'\] must be True or False, got 'false'"),
    ):
        client.post(fleet.urls[0] + "/orders", extensions={"resilient": {name: "false"}})
    assert fleet[0].counts().total == 0


# --- circuit breaker --------------------------------------------------------------------------


def state(transport: rs.ResilientTransport, url: httpx.URL | str) -> str:
    breaker = transport.breaker_for(httpx.URL(url))
    assert breaker is not None
    return breaker.state


def test_breaker_opens_on_failed_answers_then_fails_fast(fleet: Fleet, clock: FakeClock) -> None:
    transport = rs.ResilientTransport(clock=clock, attempts=1)
    url = httpx.URL(fleet.urls[0] + "/x?status=503")
    with httpx.Client(transport=transport) as client:
        for _ in range(19):  # the default breaker judges only from min_calls=20 on
            assert client.get(url).status_code == 503
        assert state(transport, url) == "closed"
        assert client.get(url).status_code == 503
        assert state(transport, url) == "open"
        with pytest.raises(rs.CircuitOpenError):
            client.get(url)
        with pytest.raises(rs.CircuitOpenError):
            client.get(fleet.urls[0] + "/elsewhere")  # one breaker per host, not per URL
        assert client.get(fleet.urls[1] + "/x").status_code == 200  # another host
    assert fleet[0].counts().total == 20  # nothing reached the server once open
    assert state(transport, fleet.urls[1]) == "closed"
    assert transport.breaker_for(httpx.URL(fleet.urls[1])) is not transport.breaker_for(url)


@pytest.mark.anyio
async def test_breaker_opens_on_failed_answers_then_fails_fast_async(
    fleet: Fleet, clock: FakeClock
) -> None:
    transport = rs.ResilientTransport(clock=clock, attempts=1)
    url = httpx.URL(fleet.urls[0] + "/x?status=503")
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(20):
            assert (await client.get(url)).status_code == 503
        breaker = transport.breaker_for(url)
        assert breaker is not None and breaker.state == "open"
        with pytest.raises(rs.CircuitOpenError):
            await client.get(url)
    assert fleet[0].counts().total == 20


@pytest.mark.parametrize("status", [400, 404])
def test_client_errors_never_open_the_breaker(fleet: Fleet, clock: FakeClock, status: int) -> None:
    transport = rs.ResilientTransport(clock=clock, attempts=1)
    url = httpx.URL(fleet.urls[0] + f"/x?status={status}")
    with httpx.Client(transport=transport) as client:
        for _ in range(40):
            assert client.get(url).status_code == status
    breaker = transport.breaker_for(url)
    assert breaker is not None and breaker.state == "closed"
    assert fleet[0].counts().total == 40


def test_every_attempt_feeds_the_breaker_and_an_open_breaker_stops_retries(
    fleet: Fleet, clock: FakeClock
) -> None:
    def factory(host: str) -> rs.CircuitBreaker:
        return rs.CircuitBreaker(name=host, consecutive_failures=2, min_calls=100, clock=clock)

    transport = rs.ResilientTransport(clock=clock, attempts=5, wait=0.0, breaker=factory)
    with httpx.Client(transport=transport) as client:
        response = client.get(fleet.urls[0] + "/x?status=503")
        assert response.status_code == 503
        assert info(response)["attempts"] == 2  # the second failure opened it: no third try
        with pytest.raises(rs.CircuitOpenError):
            client.get(fleet.urls[0] + "/x")
    assert fleet[0].counts().total == 2


def test_connection_failures_open_the_breaker(fleet: Fleet, clock: FakeClock) -> None:
    def factory(host: str) -> rs.CircuitBreaker:
        return rs.CircuitBreaker(name=host, consecutive_failures=3, min_calls=100, clock=clock)

    fleet[0].go_down()
    transport = rs.ResilientTransport(clock=clock, attempts=3, wait=0.0, breaker=factory)
    with httpx.Client(transport=transport) as client:
        with pytest.raises(httpx.ConnectError):
            client.get(fleet.urls[0] + "/x")
        breaker = transport.breaker_for(httpx.URL(fleet.urls[0]))
        assert breaker is not None and breaker.state == "open"
        fleet[0].go_up()
        with pytest.raises(rs.CircuitOpenError):
            client.get(fleet.urls[0] + "/x")
    assert fleet[0].counts().total == 0


# --- deadlines --------------------------------------------------------------------------------


def test_deadline_clips_the_attempt_in_real_time(fleet: Fleet) -> None:
    transport = rs.ResilientTransport(deadline=0.5)  # the real clock: this is about real time
    with httpx.Client(transport=transport, timeout=10.0) as client:
        started = time.monotonic()
        with pytest.raises(httpx.TimeoutException) as caught:
            client.get(fleet.urls[0] + "/slow?delay=2")
        elapsed = time.monotonic() - started
    assert 0.3 < elapsed < 2.0  # the server answers after 2 s: only the deadline can end it sooner
    assert "deadline" in notes(caught.value)
    assert fleet[0].counts().total == 1


@pytest.mark.anyio
async def test_deadline_clips_the_attempt_in_real_time_async(fleet: Fleet) -> None:
    transport = rs.ResilientTransport(deadline=0.5)
    async with httpx.AsyncClient(transport=transport, timeout=10.0) as client:
        started = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            await client.get(fleet.urls[0] + "/slow?delay=2")
        elapsed = time.monotonic() - started
    assert 0.3 < elapsed < 2.0
    assert fleet[0].counts().total == 1


def test_each_attempt_timeout_is_clipped_to_the_time_left(fleet: Fleet, clock: FakeClock) -> None:
    inner = RecordingTransport()
    transport = rs.ResilientTransport(inner, clock=clock, deadline=1.0, wait=0.25)
    with httpx.Client(transport=transport, timeout=httpx.Timeout(10.0, read=0.6)) as client:
        response = client.get(fleet.urls[0] + "/x?status=503")
    assert info(response)["attempts"] == 3
    timeouts = inner.recorder.timeouts
    assert [t["connect"] for t in timeouts] == [1.0, 0.75, 0.5]
    assert [t["pool"] for t in timeouts] == [1.0, 0.75, 0.5]
    assert [t["write"] for t in timeouts] == [1.0, 0.75, 0.5]
    assert [t["read"] for t in timeouts] == [0.6, 0.6, 0.5]  # a shorter client timeout is kept


def test_attempt_timeout_caps_each_attempt(fleet: Fleet, clock: FakeClock) -> None:
    inner = RecordingTransport()
    transport = rs.ResilientTransport(inner, clock=clock, attempt_timeout=0.3, wait=0.0)
    with httpx.Client(transport=transport, timeout=10.0) as client:
        client.get(fleet.urls[0] + "/x?status=503")
    assert inner.recorder.timeouts == [dict.fromkeys(("connect", "read", "write", "pool"), 0.3)] * 3


def test_timeouts_untouched_without_deadline(fleet: Fleet, clock: FakeClock) -> None:
    inner = RecordingTransport()
    transport = rs.ResilientTransport(inner, clock=clock)
    with httpx.Client(transport=transport, timeout=httpx.Timeout(7.0, read=3.0)) as client:
        client.get(fleet.urls[0] + "/x")
    assert inner.recorder.timeouts == [{"connect": 7.0, "read": 3.0, "write": 7.0, "pool": 7.0}]


def test_per_request_deadline_overrides_the_transport(fleet: Fleet, clock: FakeClock) -> None:
    inner = RecordingTransport()
    transport = rs.ResilientTransport(inner, clock=clock, attempts=2)  # no deadline of its own
    url = fleet.urls[0] + "/x?status=503&retry_after=1.5"
    with httpx.Client(transport=transport, timeout=10.0) as client:
        short = client.get(url, extensions={"resilient": {"deadline": 0.3}})
        assert short.status_code == 503
        assert info(short)["attempts"] == 1
        assert clock.sleeps == []  # 1.5 s of Retry-After cannot fit in 0.3 s
        assert inner.recorder.timeouts[0]["read"] == pytest.approx(0.3)
        unbounded = client.get(url)
        assert info(unbounded)["attempts"] == 2
        assert clock.sleeps == [1.5]


def test_per_request_deadline_none_lifts_the_transport_deadline(
    fleet: Fleet, clock: FakeClock
) -> None:
    transport = rs.ResilientTransport(clock=clock, attempts=2, deadline=0.3)
    url = fleet.urls[0] + "/x?status=503&retry_after=1.5"
    with httpx.Client(transport=transport) as client:
        assert info(client.get(url))["attempts"] == 1
        lifted = client.get(url, extensions={"resilient": {"deadline": None}})
    assert info(lifted)["attempts"] == 2
    assert clock.sleeps == [1.5]


def test_deadline_header_says_the_time_left(fleet: Fleet) -> None:
    fleet[0].set_faults(error_rate=1.0)  # the first answer fails: the header is sent twice
    clock = HookedClock({0: fleet[0].set_faults})
    inner = RecordingTransport()
    transport = rs.ResilientTransport(
        inner, clock=clock, deadline=5.0, wait=0.25, deadline_header="X-Request-Deadline"
    )
    with httpx.Client(transport=transport) as client:
        response = client.get(fleet.urls[0] + "/echo-headers")
    assert response.status_code == 200
    assert response.json()["x-request-deadline"] == "4.750"
    assert [h["X-Request-Deadline"] for h in inner.recorder.headers] == ["5.000", "4.750"]


def test_no_deadline_header_without_a_deadline(fleet: Fleet, clock: FakeClock) -> None:
    transport = rs.ResilientTransport(clock=clock, deadline_header="X-Request-Deadline")
    with httpx.Client(transport=transport) as client:
        echoed = client.get(fleet.urls[0] + "/echo-headers").json()
    assert "x-request-deadline" not in echoed


# --- per-request overrides --------------------------------------------------------------------


def test_attempts_and_retry_overrides(fleet: Fleet, clock: FakeClock) -> None:
    transport = rs.ResilientTransport(clock=clock, wait=0.0, attempts=3)
    url = fleet.urls[0] + "/x?status=503"
    with httpx.Client(transport=transport) as client:
        assert info(client.get(url, extensions={"resilient": {"attempts": 1}}))["attempts"] == 1
        assert info(client.get(url, extensions={"resilient": {"attempts": 5}}))["attempts"] == 5
        assert info(client.get(url, extensions={"resilient": {"retry": False}}))["attempts"] == 1
        assert info(client.get(url))["attempts"] == 3
    assert fleet[0].counts().total == 10


def test_idempotent_override(fleet: Fleet, clock: FakeClock) -> None:
    transport = rs.ResilientTransport(clock=clock, wait=0.0)
    url = fleet.urls[0] + "/x?status=503"
    with httpx.Client(transport=transport) as client:
        post = client.post(url, json={}, extensions={"resilient": {"idempotent": True}})
        get = client.get(url, extensions={"resilient": {"idempotent": False}})
    assert info(post)["attempts"] == 3
    assert info(get)["attempts"] == 1
    assert fleet[0].counts().by_method == {"POST": 3, "GET": 1}


def test_unknown_override_keys_raise_naming_them(fleet: Fleet, clock: FakeClock) -> None:
    transport = rs.ResilientTransport(clock=clock)
    options = {"atempts": 2, "dedline": 1}
    with (
        httpx.Client(transport=transport) as client,
        pytest.raises(ValueError, match="atempts") as caught,
    ):
        client.get(fleet.urls[0] + "/x", extensions={"resilient": options})
    assert "dedline" in str(caught.value)
    assert fleet[0].counts().total == 0


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"attempts": 0}, "attempts"),
        ({"attempts": 1.5}, "attempts"),
        ({"attempts": True}, "attempts"),
        ({"deadline": -1.0}, "deadline"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": float("nan")}, "deadline"),
    ],
)
def test_invalid_override_values_raise(
    fleet: Fleet, clock: FakeClock, options: dict[str, object], key: str
) -> None:
    transport = rs.ResilientTransport(clock=clock)
    with httpx.Client(transport=transport) as client, pytest.raises(ValueError, match=key):
        client.get(fleet.urls[0] + "/x", extensions={"resilient": options})
    assert fleet[0].counts().total == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"attempts": 0}, "attempts"),
        ({"deadline": 0.0}, "deadline"),
        ({"deadline": -1.0}, "deadline"),
        ({"attempt_timeout": 0.0}, "attempt_timeout"),
        ({"wait": -0.1}, "wait"),
        ({"budget": 0.2}, "budget"),
        ({"bulkhead": 10}, "bulkhead"),
        ({"breaker": "payments"}, "breaker"),
        ({"fallback": "stale"}, "fallback"),
        ({"transport": "http://x"}, "transport"),
    ],
)
def test_transport_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        rs.ResilientTransport(**kwargs)


# --- retry budget -----------------------------------------------------------------------------


def test_retry_budget_stops_retries_once_spent(fleet: Fleet, clock: FakeClock) -> None:
    fleet[0].go_down()
    inner = RecordingTransport()
    budget = rs.RetryBudget(ratio=0.0, min_per_second=0.3, ttl=10.0, clock=clock)  # 3 retries
    transport = rs.ResilientTransport(
        inner, attempts=3, wait=0.0, budget=budget, breaker=None, clock=clock
    )
    errors: list[httpx.ConnectError] = []
    with httpx.Client(transport=transport) as client:
        for _ in range(10):
            with pytest.raises(httpx.ConnectError) as caught:
                client.get(fleet.urls[0] + "/x")
            errors.append(caught.value)
    assert inner.recorder.sent == 10 + 3  # without the budget: 30
    assert "gave up after 3 attempt(s): attempts exhausted" in notes(errors[0])
    assert "retry budget exhausted" in notes(errors[-1])


def test_retry_budget_ratio_caps_retries_to_a_share_of_requests(
    fleet: Fleet, clock: FakeClock
) -> None:
    fleet[0].go_down()
    inner = RecordingTransport()
    budget = rs.RetryBudget(ratio=0.1, min_per_second=0.01, ttl=10.0, clock=clock)
    transport = rs.ResilientTransport(
        inner, attempts=3, wait=0.0, budget=budget, breaker=None, clock=clock
    )
    with httpx.Client(transport=transport) as client:
        for _ in range(40):
            with pytest.raises(httpx.ConnectError):
                client.get(fleet.urls[0] + "/x")
    # 40 requests earn ~4 retries (+0.1 of floor); with no budget there would be 120 attempts
    assert 41 <= inner.recorder.sent <= 45


# --- the final response -----------------------------------------------------------------------


def test_final_response_after_a_retry_stays_streamable(fleet: Fleet) -> None:
    fleet[0].set_faults(error_rate=1.0)
    clock = HookedClock({0: fleet[0].set_faults})
    transport = rs.ResilientTransport(clock=clock)
    url = fleet.urls[0] + "/big?body_bytes=300000"
    with httpx.Client(transport=transport) as client, client.stream("GET", url) as response:
        assert response.status_code == 200
        assert info(response)["attempts"] == 2
        assert not response.is_stream_consumed
        received = sum(len(chunk) for chunk in response.iter_bytes())
    assert received == 300_000


@pytest.mark.anyio
async def test_final_response_after_a_retry_stays_streamable_async(fleet: Fleet) -> None:
    fleet[0].set_faults(error_rate=1.0)
    clock = HookedClock({0: fleet[0].set_faults})
    transport = rs.ResilientTransport(clock=clock)
    url = fleet.urls[0] + "/big?body_bytes=300000"
    async with (
        httpx.AsyncClient(transport=transport) as client,
        client.stream("GET", url) as response,
    ):
        assert response.status_code == 200
        assert info(response)["attempts"] == 2
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
    assert received == 300_000


# --- bulkhead ---------------------------------------------------------------------------------


def test_bulkhead_rejects_calls_beyond_max_concurrent(fleet: Fleet, clock: FakeClock) -> None:
    bulkhead = rs.Bulkhead(max_concurrent=2)  # no queue: the third caller is turned away
    transport = rs.ResilientTransport(clock=clock, bulkhead=bulkhead)
    statuses: list[int] = []
    failures: list[BaseException] = []
    with httpx.Client(transport=transport, timeout=10.0) as client:
        client.get(fleet.urls[0] + "/health")  # builds the inner transport before the threads
        fleet[0].freeze()  # requests are accepted and never answered until thawed

        def call() -> None:
            try:
                statuses.append(client.get(fleet.urls[0] + "/slow").status_code)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=call) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_until(lambda: bulkhead.statistics().in_use == 2)
        for _ in range(3):
            with pytest.raises(rs.BulkheadFullError):
                client.get(fleet.urls[0] + "/rejected")
        fleet[0].thaw()
        for thread in threads:
            thread.join(timeout=10.0)
        assert client.get(fleet.urls[0] + "/after").status_code == 200  # permits came back
    assert failures == []
    assert statuses == [200, 200]
    stats = bulkhead.statistics()
    assert stats.rejected_total == 3
    assert stats.in_use == 0
    assert fleet[0].counts().by_method == {"GET": 3}


@pytest.mark.anyio
async def test_bulkhead_rejects_calls_beyond_max_concurrent_async(
    fleet: Fleet, clock: FakeClock
) -> None:
    bulkhead = rs.Bulkhead(max_concurrent=2)
    transport = rs.ResilientTransport(clock=clock, bulkhead=bulkhead)
    statuses: list[int] = []
    fleet[0].freeze()
    async with httpx.AsyncClient(transport=transport, timeout=10.0) as client:

        async def call() -> None:
            statuses.append((await client.get(fleet.urls[0] + "/slow")).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            tg.start_soon(call)
            await wait_until_async(lambda: bulkhead.statistics().in_use == 2)
            for _ in range(3):
                with pytest.raises(rs.BulkheadFullError):
                    await client.get(fleet.urls[0] + "/rejected")
            await anyio.to_thread.run_sync(fleet[0].thaw)
    assert statuses == [200, 200]
    assert bulkhead.statistics().rejected_total == 3
    assert bulkhead.statistics().in_use == 0
    assert fleet[0].counts().total == 2


def test_an_adaptive_bulkhead_learns_from_the_answers(fleet: Fleet, clock: FakeClock) -> None:
    bulkhead = rs.Bulkhead(max_concurrent=rs.AIMDLimit(initial=2, min_limit=1, max_limit=10))
    transport = rs.ResilientTransport(clock=clock, bulkhead=bulkhead, attempts=1)

    def limit() -> int:
        return bulkhead.statistics().max_concurrent

    url = fleet.urls[0]
    with httpx.Client(transport=transport, timeout=10.0) as client:
        assert client.get(url + "/a").status_code == 200
        assert limit() == 3  # 1 of 2 permits in use when it ended: in use, so +1
        fleet[0].set_faults(error_rate=1.0)
        assert client.get(url + "/b").status_code == 503
        assert limit() == 2  # the server shed load: floor(3 x 0.9)
        fleet[0].set_faults()
        fleet[0].freeze()
        try:
            with pytest.raises(httpx.ReadTimeout):
                client.get(url + "/c", timeout=httpx.Timeout(10.0, read=0.2))
        finally:
            fleet[0].thaw()
        assert limit() == 1  # an httpx timeout is a drop too: floor(2 x 0.9)
        with client.stream("GET", url + "/d") as response:
            assert bulkhead.statistics().in_use == 1  # held while the body is open
            response.read()
    assert bulkhead.statistics().in_use == 0
    assert limit() == 2  # 1 of 1 in use: +1


def test_concurrent_first_requests_share_one_default_inner_transport(
    fleet: Fleet, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[httpx.HTTPTransport] = []

    class SlowToBuild(httpx.HTTPTransport):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)
            time.sleep(0.05)  # building one loads CA certificates: the race window, widened

    transport = rs.ResilientTransport(clock=clock)
    statuses: list[int] = []
    barrier = threading.Barrier(4)
    with httpx.Client(transport=transport) as client:
        monkeypatch.setattr(httpx, "HTTPTransport", SlowToBuild)

        def call() -> None:
            barrier.wait()
            statuses.append(client.get(fleet.urls[0] + "/x").status_code)

        threads = [threading.Thread(target=call) for _ in range(4)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=10.0)
        finally:
            for inner in created:
                inner.close()  # the dropped ones too: no unclosed socket leaks into later tests
    assert statuses == [200] * 4
    assert len(created) == 1


def test_bulkhead_permit_is_held_while_a_streamed_response_is_open(
    fleet: Fleet, clock: FakeClock
) -> None:
    bulkhead = rs.Bulkhead(max_concurrent=1)
    transport = rs.ResilientTransport(clock=clock, bulkhead=bulkhead)
    url = fleet.urls[0] + "/big?body_bytes=100000"
    with httpx.Client(transport=transport) as client:
        with client.stream("GET", url) as response:
            assert response.status_code == 200
            assert bulkhead.statistics().in_use == 1  # the download is still work in progress
            with pytest.raises(rs.BulkheadFullError):
                client.get(fleet.urls[0] + "/x")
        assert bulkhead.statistics().in_use == 0  # closed unread: the permit is back
        assert client.get(fleet.urls[0] + "/x").status_code == 200
    assert bulkhead.statistics().in_use == 0
    assert fleet[0].counts().total == 2


@pytest.mark.anyio
async def test_bulkhead_permit_is_held_while_a_streamed_response_is_open_async(
    fleet: Fleet, clock: FakeClock
) -> None:
    bulkhead = rs.Bulkhead(max_concurrent=1)
    transport = rs.ResilientTransport(clock=clock, bulkhead=bulkhead)
    url = fleet.urls[0] + "/big?body_bytes=100000"
    async with httpx.AsyncClient(transport=transport) as client:
        async with client.stream("GET", url) as response:
            assert bulkhead.statistics().in_use == 1
            with pytest.raises(rs.BulkheadFullError):
                await client.get(fleet.urls[0] + "/x")
            assert len(await response.aread()) == 100_000
        assert bulkhead.statistics().in_use == 0
        assert (await client.get(fleet.urls[0] + "/x")).status_code == 200
    assert bulkhead.statistics().in_use == 0


def test_bulkhead_permit_comes_back_when_every_attempt_fails(
    fleet: Fleet, clock: FakeClock
) -> None:
    bulkhead = rs.Bulkhead(max_concurrent=1)
    transport = rs.ResilientTransport(clock=clock, bulkhead=bulkhead, breaker=None)
    fleet[0].go_down()
    with httpx.Client(transport=transport) as client:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                client.get(fleet.urls[0] + "/x")
            assert bulkhead.statistics().in_use == 0
    assert bulkhead.statistics().rejected_total == 0


# --- telemetry --------------------------------------------------------------------------------


def tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def exported_text(spans: tuple[ReadableSpan, ...]) -> str:
    """Everything a span exporter would ship: names, attributes, events, statuses."""
    return "\n".join(span.to_json() for span in spans)


def test_one_client_span_per_attempt(fleet: Fleet, clock: FakeClock) -> None:
    provider, exporter = tracing()
    transport = rs.ResilientTransport(clock=clock, wait=0.0, tracer_provider=provider)
    with httpx.Client(transport=transport) as client:
        client.get(fleet.urls[0] + "/x?status=503")
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["GET"] * 3
    for span in spans:
        attrs = attributes(span)
        assert span.kind is SpanKind.CLIENT
        assert attrs["http.request.method"] == "GET"
        assert attrs["server.address"] == "127.0.0.1"
        assert attrs["server.port"] == fleet[0].port
        assert attrs["url.full"] == fleet.urls[0] + "/x?status=503"
        assert attrs["http.response.status_code"] == 503
        assert attrs["error.type"] == "503"
        assert span.status.status_code is StatusCode.ERROR
    assert [attributes(span).get("http.request.resend_count") for span in spans] == [None, 1, 2]


def test_spans_of_successes_and_connection_failures(fleet: Fleet, clock: FakeClock) -> None:
    provider, exporter = tracing()
    transport = rs.ResilientTransport(
        clock=clock, wait=0.0, attempts=2, breaker=None, tracer_provider=provider
    )
    fleet[1].go_down()
    with httpx.Client(transport=transport) as client:
        client.post(fleet.urls[0] + "/orders", json={})
        with pytest.raises(httpx.ConnectError):
            client.get(fleet.urls[1] + "/x")
    ok, *refused = exporter.get_finished_spans()
    assert ok.name == "POST"
    assert attributes(ok)["http.response.status_code"] == 200
    assert "error.type" not in attributes(ok)
    assert ok.status.status_code is not StatusCode.ERROR
    assert len(refused) == 2
    for span in refused:
        assert attributes(span)["error.type"] == "ConnectError"
        assert "http.response.status_code" not in attributes(span)
        assert span.status.status_code is StatusCode.ERROR
    assert [attributes(span).get("http.request.resend_count") for span in refused] == [None, 1]


def test_each_attempt_propagates_its_own_span(fleet: Fleet) -> None:
    provider, exporter = tracing()
    fleet[0].set_faults(error_rate=1.0)
    clock = HookedClock({0: fleet[0].set_faults})
    transport = rs.ResilientTransport(clock=clock, tracer_provider=provider)
    with httpx.Client(transport=transport) as client:
        echoed = client.get(fleet.urls[0] + "/echo-headers").json()
    first, second = exporter.get_finished_spans()
    context = second.get_span_context()
    assert context is not None
    assert echoed["traceparent"].split("-")[1:3] == [
        f"{context.trace_id:032x}",
        f"{context.span_id:016x}",
    ]
    assert first.get_span_context() != context


def test_credentials_never_reach_spans_or_logs(
    fleet: Fleet, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    provider, exporter = tracing()
    transport = rs.ResilientTransport(
        clock=clock,
        wait=0.0,
        attempts=2,
        tracer_provider=provider,
        hooks=[rs.telemetry.LoggingHook()],
    )
    port0, port1 = fleet[0].port, fleet[1].port
    fleet[1].go_down()
    caplog.set_level(logging.DEBUG)
    with httpx.Client(transport=transport) as client:
        # userinfo becomes a Basic Authorization header; the Bearer one goes out as given
        client.get(f"http://user:pa55@127.0.0.1:{port0}/x?token=t0k&page=2&status=503")
        client.get(
            f"http://127.0.0.1:{port0}/x?token=t0k&page=2&status=503",
            headers={"Authorization": "Bearer sekrit"},
        )
        with pytest.raises(httpx.ConnectError):
            client.get(
                f"http://user:pa55@127.0.0.1:{port1}/x?token=t0k&page=2",
                headers={"Cookie": "session=c00kie"},
            )
    spans = exporter.get_finished_spans()
    assert len(spans) == 6
    assert all("page=2" in attributes(span)["url.full"] for span in spans)
    exported = exported_text(spans)
    own_logs = [r for r in caplog.records if r.name.startswith("resilient")]
    assert own_logs  # the hook logged the retries and the give-ups
    logged = "\n".join(f"{r.getMessage()} {vars(r)!r}" for r in own_logs)
    basic = base64.b64encode(b"user:pa55").decode()
    for secret in ("sekrit", "pa55", "t0k", "user:", "c00kie", basic):
        assert secret not in exported
        assert secret not in logged


def test_a_token_h11_refuses_never_reaches_the_logs(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    # A token read from a file with its newline: h11 refuses it, naming the value, not the
    # header ("Illegal header value b'Bearer ...\\n'"), and the hooks log that message.
    hook = rs.telemetry.LoggingHook()
    retry = rs.Retry(on=httpx.HTTPError, attempts=2, wait=0.0, hooks=[hook])
    caplog.set_level(logging.DEBUG)
    with (
        httpx.Client(transport=rs.ResilientTransport(hooks=[hook])) as client,
        pytest.raises(httpx.LocalProtocolError),
    ):
        retry.call(lambda: client.get(fleet.urls[0] + "/x", headers={"X-Token": "t0k3n\n"}))
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("resilient"))
    assert "Illegal header value" in logged  # the retry and the give-up were logged...
    assert "t0k3n" not in logged  # ...without the token


def test_url_full_drops_the_fragment(fleet: Fleet, clock: FakeClock) -> None:
    provider, exporter = tracing()
    transport = rs.ResilientTransport(clock=clock, tracer_provider=provider)
    with httpx.Client(transport=transport) as client:
        client.get(f"{fleet.urls[0]}/cb?page=2#access_token=fr4g")
    (span,) = exporter.get_finished_spans()
    assert attributes(span)["url.full"] == f"{fleet.urls[0]}/cb?page=2"


def test_url_full_redacts_every_secret_looking_query_parameter(
    fleet: Fleet, clock: FakeClock
) -> None:
    provider, exporter = tracing()
    transport = rs.ResilientTransport(clock=clock, tracer_provider=provider)
    query = "refresh_token=r3fr3sh&X-Amz-Security-Token=s3ss10n&private_token=pr1v&page=2"
    with httpx.Client(transport=transport) as client:
        client.get(f"{fleet.urls[0]}/x?{query}")
    (span,) = exporter.get_finished_spans()
    url = attributes(span)["url.full"]
    assert "page=2" in url
    for secret in ("r3fr3sh", "s3ss10n", "pr1v"):
        assert secret not in url


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


def test_attempt_and_retry_counters(fleet: Fleet) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    fleet[0].set_faults(error_rate=1.0)
    clock = HookedClock({1: fleet[0].set_faults})  # two 503s, then 200
    transport = rs.ResilientTransport(clock=clock, meter_provider=provider)
    try:
        with httpx.Client(transport=transport) as client:
            assert info(client.get(fleet.urls[0] + "/x"))["attempts"] == 3
            client.get(fleet.urls[0] + "/y")
        sums = metric_sums(reader)
    finally:
        provider.shutdown()
    assert sums["resilient.http.attempts"] == 4
    assert sums["resilient.http.retries"] == 2


def test_default_inner_transports_share_one_tls_context_made_before_any_request() -> None:
    # Loading the CA bundle takes ~20-30 ms: not on a first request, and once per process.
    first, second = rs.ResilientTransport(), rs.ResilientTransport()
    assert first._ssl is not None and first._ssl is second._ssl
    assert first._sync_transport()._pool._ssl_context is first._ssl  # type: ignore[attr-defined]
    assert second._async_transport()._pool._ssl_context is first._ssl  # type: ignore[attr-defined]
    assert rs.ResilientTransport(httpx.HTTPTransport())._ssl is None  # the user's own: untouched


def test_a_meter_provider_installed_later_is_counted() -> None:
    # With no provider, attempts are not counted (the API's proxy counter would do nothing);
    # one installed globally afterwards is seen at once. A process of its own: the global
    # provider can be set only once.
    script = textwrap.dedent(
        """
        import httpx
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        import resilient as rs

        mock = httpx.MockTransport(lambda request: httpx.Response(200))
        client = httpx.Client(transport=rs.ResilientTransport(mock))
        client.get("http://example.invalid/before")
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        client.get("http://example.invalid/a")
        client.get("http://example.invalid/b")
        total = 0
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == "resilient.http.attempts":
                        total += sum(point.value for point in metric.data.data_points)
        print(total)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "2"


# --- configuration errors at use --------------------------------------------------------------


def test_sync_inner_transport_refuses_async_clients(fleet: Fleet) -> None:
    transport = rs.ResilientTransport(httpx.HTTPTransport())

    async def use() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(fleet.urls[0] + "/x")

    with pytest.raises(TypeError, match="sync"):
        anyio.run(use)
    assert fleet[0].counts().total == 0


def test_a_sync_request_refused_without_io_yields_the_gil_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A thread failing fast in a loop would otherwise hold the GIL for whole switch intervals.
    yields: list[int] = []
    monkeypatch.setattr(_transport_module, "_yield_gil", lambda: yields.append(1))
    mock = httpx.MockTransport(lambda request: httpx.Response(200))
    host = rs.CircuitBreaker(name="host", clock=FakeClock())
    host.open()
    service = rs.CircuitBreaker(name="service", clock=FakeClock())
    service.open()
    transport = rs.ResilientTransport(
        mock,
        breaker=host,
        services={
            "orders": rs.balancing.Service(
                discovery=rs.discovery.Static(["http://127.0.0.1:9"]), service_breaker=service
            )
        },
    )
    with httpx.Client(transport=transport) as client:
        with pytest.raises(rs.CircuitOpenError, match="host"):
            client.get("http://a.invalid/")
        assert yields == [1]
        with pytest.raises(rs.CircuitOpenError, match="service"):
            client.get("http://orders/")
        assert yields == [1, 1]
        host.reset()
        assert client.get("http://a.invalid/").status_code == 200
    assert yields == [1, 1]  # not on a request that did I/O


# --- a review of the sync paths -------------------------------------------------------------------


def test_a_retry_after_date_past_any_calendar_is_ignored(fleet: Fleet) -> None:
    # datetime raised OverflowError past year 9999: it reached the caller, the 503 was lost, and
    # its connection stayed checked out of the pool.
    url = fleet.urls[0] + "/x?status=503&retry_after=Mon, 01 Jan 99999999999 00:00:00 GMT"
    transport = rs.ResilientTransport(attempts=2, wait=0.0, breaker=None)
    with httpx.Client(transport=transport) as client:
        response = client.get(url)
    assert response.status_code == 503
    assert fleet[0].counts().total == 2  # retried with the ordinary backoff


def test_a_stale_answer_gives_the_bulkhead_permit_back_when_closed(
    fleet: Fleet, clock: FakeClock
) -> None:
    # An answer built in memory (a stale copy) is closed as it is made: its close() never
    # reached the permit-holding body, and the permit came back only with the garbage collector.
    bulkhead = rs.Bulkhead(max_concurrent=1)
    transport = rs.ResilientTransport(
        clock=clock, wait=0.0, bulkhead=bulkhead, fallback=rs.http.StaleIfError(clock=clock)
    )
    kept: list[httpx.Response] = []
    with httpx.Client(transport=transport) as client:
        kept.append(client.get(fleet.urls[0] + "/x"))
        fleet[0].set_faults(error_rate=1.0)
        for _ in range(3):  # each one holds its response: a held permit would refuse the next
            stale = client.get(fleet.urls[0] + "/x")
            assert stale.extensions["resilient"]["stale"] is True
            kept.append(stale)
    assert bulkhead.statistics().in_use == 0


def test_no_read_is_cut_when_a_copy_would_have_less_time_than_the_attempt(fleet: Fleet) -> None:
    # 0.5 s answers, a 0.85 s deadline, hedges at 0.45 s: a copy at 0.45 s could not answer in
    # time, so the attempt is let run (it once was given up, and the request failed).
    fleet[0].set_faults(latency=0.5)
    transport = rs.ResilientTransport(deadline=0.85, hedge=rs.http.Hedging(delay=0.45))
    with httpx.Client(transport=transport) as client:
        assert client.get(fleet.urls[0] + "/x").status_code == 200
    assert fleet[0].counts().total == 1


def test_a_breaker_opening_during_the_wait_returns_the_answer_not_a_rejection(fleet: Fleet) -> None:
    # A PUT answered 503 waits for its retry; meanwhile another request's 503 opens the breaker.
    # The PUT was sent and answered: CircuitOpenError (a RejectedError: "nothing was sent")
    # replaced its answer.
    clock = FakeClock(autojump=False)
    breaker = rs.CircuitBreaker(name="h", consecutive_failures=2, clock=clock)
    transport = rs.ResilientTransport(breaker=breaker, wait=1.0, clock=clock)
    url = fleet.urls[0] + "/x?status=503"
    with httpx.Client(transport=transport) as client:
        outcome: list[httpx.Response | BaseException] = []

        def put() -> None:
            try:
                outcome.append(client.put(url, content=b"v"))
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=put)
        worker.start()
        wait_until(lambda: clock.sleeps == [1.0])  # the PUT's 503 came; it waits
        assert client.get(url).status_code == 503  # the second failure in a row: open
        assert breaker.state == "open"
        clock.advance(1.0)
        worker.join(5.0)
    answer = outcome[0]
    assert isinstance(answer, httpx.Response) and answer.status_code == 503
    assert answer.json()["method"] == "PUT" and answer.elapsed.total_seconds() >= 0  # a whole one
    assert fleet[0].counts().by_method == {"PUT": 1, "GET": 1}
