"""Degraded answers: `StaleIfError` and callable fallbacks, through `ResilientTransport`.

The replica fleet cannot send custom ``Cache-Control`` headers, so the header rules (window
override, ``no-store``) are checked through the transport over an `httpx.MockTransport` origin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

import resilient as rs
from resilient.http import STALE_HEADER, StaleIfError
from resilient.testing import FakeClock, Fleet

pytestmark = pytest.mark.slow

Outage = Callable[[Fleet], None]


def go_down(fleet: Fleet) -> None:
    fleet[0].go_down()  # connections refused


def fail_everything(fleet: Fleet) -> None:
    fleet[0].set_faults(error_rate=1.0)  # every answer a 503


OUTAGES = pytest.mark.parametrize("outage", [go_down, fail_everything], ids=["refused", "503"])


def info(response: httpx.Response) -> dict[str, Any]:
    value = response.extensions["resilient"]
    assert isinstance(value, dict)
    return value


# --- through the replica fleet ----------------------------------------------------------------


@OUTAGES
def test_stale_answer_when_every_attempt_fails(
    fleet: Fleet, clock: FakeClock, outage: Outage
) -> None:
    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=cache)
    url = fleet.urls[0] + "/catalog?page=1"
    with httpx.Client(transport=transport) as client:
        fresh = client.get(url)
        assert fresh.status_code == 200
        assert info(fresh) == {"attempts": 1, "stale": False}
        assert STALE_HEADER not in fresh.headers
        assert len(cache) == 1
        outage(fleet)
        clock.advance(42.0)
        stale = client.get(url)
    assert stale.status_code == 200
    assert stale.json() == fresh.json()
    assert stale.headers[STALE_HEADER] == "42"  # the answer's age in whole seconds
    assert stale.headers["X-Replica"] == "0"  # the stored headers come back too
    assert info(stale) == {"attempts": 3, "stale": True}  # after the real attempts


@pytest.mark.anyio
@OUTAGES
async def test_stale_answer_when_every_attempt_fails_async(
    fleet: Fleet, clock: FakeClock, outage: Outage
) -> None:
    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=cache)
    url = fleet.urls[0] + "/catalog?page=1"
    async with httpx.AsyncClient(transport=transport) as client:
        fresh = await client.get(url)
        assert fresh.status_code == 200
        assert info(fresh)["stale"] is False
        outage(fleet)
        clock.advance(7.0)
        stale = await client.get(url)
    assert stale.status_code == 200
    assert stale.json() == fresh.json()
    assert stale.headers[STALE_HEADER] == "7"
    assert info(stale)["stale"] is True


def test_a_service_is_answered_stale_under_its_own_url(fleet: Fleet, clock: FakeClock) -> None:
    # The answer came from one replica; the failures from both. It is kept, and looked up, under
    # the service's URL: keyed by the replica that served it (or the last one tried), a service
    # was never answered stale.
    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(
        clock=clock, wait=0.0, fallback=cache, services={"catalog": fleet.urls}
    )
    url = "http://catalog/items?page=2"
    with httpx.Client(transport=transport) as client:
        fresh = client.get(url)
        for replica in fleet:
            replica.set_faults(error_rate=1.0)
        stale = client.get(url)
    assert fresh.status_code == 200 and info(fresh)["stale"] is False
    assert list(cache._entries) == [url]
    assert stale.status_code == 200 and info(stale)["stale"] is True
    assert stale.json() == fresh.json()


@pytest.mark.anyio
async def test_a_service_is_answered_stale_under_its_own_url_async(
    fleet: Fleet, clock: FakeClock
) -> None:
    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(
        clock=clock, wait=0.0, fallback=cache, services={"catalog": fleet.urls}
    )
    url = "http://catalog/items?page=2"
    async with httpx.AsyncClient(transport=transport) as client:
        fresh = await client.get(url)
        for replica in fleet:
            replica.set_faults(error_rate=1.0)
        stale = await client.get(url)
    assert list(cache._entries) == [url]
    assert stale.status_code == 200 and info(stale)["stale"] is True
    assert stale.json() == fresh.json()


def test_the_origin_answer_wins_while_it_is_good(fleet: Fleet, clock: FakeClock) -> None:
    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(clock=clock, fallback=cache)
    with httpx.Client(transport=transport) as client:
        client.get(fleet.urls[0] + "/catalog")
        again = client.get(fleet.urls[0] + "/catalog")
    assert info(again)["stale"] is False
    assert STALE_HEADER not in again.headers
    assert fleet[0].counts().total == 2  # not a cache in front of the origin


def test_stale_window_expires(fleet: Fleet, clock: FakeClock) -> None:
    cache = StaleIfError(clock=clock, stale_for=60.0)
    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=cache)
    url = fleet.urls[0] + "/catalog"
    with httpx.Client(transport=transport) as client:
        client.get(url)
        fleet[0].set_faults(error_rate=1.0)
        clock.advance(59.0)
        assert info(client.get(url))["stale"] is True
        clock.advance(2.0)
        late = client.get(url)
    assert late.status_code == 503
    assert info(late)["stale"] is False


def test_a_different_url_is_not_answered_from_another(fleet: Fleet, clock: FakeClock) -> None:
    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=cache)
    with httpx.Client(transport=transport) as client:
        client.get(fleet.urls[0] + "/catalog?page=1")
        fleet[0].set_faults(error_rate=1.0)
        other = client.get(fleet.urls[0] + "/catalog?page=2")
    assert other.status_code == 503
    assert info(other)["stale"] is False


def test_a_client_error_is_not_replaced(fleet: Fleet, clock: FakeClock) -> None:
    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(clock=clock, fallback=cache)
    with httpx.Client(transport=transport) as client:
        client.get(fleet.urls[0] + "/catalog")
        missing = client.get(fleet.urls[0] + "/catalog?status=404")
        client.get(fleet.urls[0] + "/catalog?status=404")
    assert missing.status_code == 404  # the origin answered: a 404 is not an outage
    assert info(missing)["stale"] is False


def test_only_fully_read_answers_are_kept(fleet: Fleet, clock: FakeClock) -> None:
    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=cache)
    url = fleet.urls[0] + "/big?body_bytes=200000"
    with httpx.Client(transport=transport) as client:
        with client.stream("GET", url) as response:
            next(response.iter_raw(1024))  # read a little, then abandon the body
        assert len(cache) == 0
        with client.stream("GET", url) as response:
            assert sum(len(c) for c in response.iter_bytes()) == 200_000
        assert len(cache) == 1
        fleet[0].go_down()
        stale = client.get(url)
    assert info(stale)["stale"] is True
    assert len(stale.content) == 200_000


def test_large_bodies_are_not_kept(fleet: Fleet, clock: FakeClock) -> None:
    cache = StaleIfError(clock=clock, max_body_bytes=1000)
    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=cache)
    with httpx.Client(transport=transport) as client:
        client.get(fleet.urls[0] + "/small?body_bytes=1000")
        client.get(fleet.urls[0] + "/large?body_bytes=1001")
    assert len(cache) == 1


def test_least_recently_stored_entries_go_first(fleet: Fleet, clock: FakeClock) -> None:
    cache = StaleIfError(clock=clock, max_entries=2)
    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=cache)
    with httpx.Client(transport=transport) as client:
        for name in ("a", "b", "c"):
            client.get(f"{fleet.urls[0]}/{name}")
        assert len(cache) == 2
        fleet[0].set_faults(error_rate=1.0)
        assert client.get(fleet.urls[0] + "/a").status_code == 503
        assert info(client.get(fleet.urls[0] + "/b"))["stale"] is True
        assert info(client.get(fleet.urls[0] + "/c"))["stale"] is True


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_only_gets_are_answered_stale(fleet: Fleet, clock: FakeClock, method: str) -> None:
    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=cache)
    url = fleet.urls[0] + "/orders"
    with httpx.Client(transport=transport) as client:
        assert client.request(method, url).status_code == 200
        assert len(cache) == 0  # not kept
        assert client.get(url).status_code == 200
        assert len(cache) == 1  # the GET
        assert client.request(method, url).status_code == 200
        # ...dropped: the URL's state changed, and the old answer no longer stands for it
        assert len(cache) == 0
        fleet[0].set_faults(error_rate=1.0)
        failed = client.request(method, url)
        gone = client.get(url)
    assert failed.status_code == 503
    assert gone.status_code == 503
    assert info(failed)["stale"] is False


def test_a_post_is_never_answered_stale_even_when_refused(fleet: Fleet, clock: FakeClock) -> None:
    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=cache)
    url = fleet.urls[0] + "/orders"
    with httpx.Client(transport=transport) as client:
        client.get(url)
        fleet[0].go_down()
        with pytest.raises(httpx.ConnectError):
            client.post(url, json={"item": 1})
        assert info(client.get(url))["stale"] is True


def test_an_open_breaker_is_answered_stale(fleet: Fleet, clock: FakeClock) -> None:
    breaker = rs.CircuitBreaker(name="catalog", consecutive_failures=1, clock=clock)
    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(clock=clock, attempts=1, breaker=breaker, fallback=cache)
    url = fleet.urls[0] + "/catalog"
    with httpx.Client(transport=transport) as client:
        client.get(url)
        fleet[0].set_faults(error_rate=1.0)
        client.get(url)  # a 503, answered stale; it opens the breaker
        assert breaker.state == "open"
        stale = client.get(url)
    assert info(stale)["stale"] is True
    assert fleet[0].counts().total == 2


# --- callable fallbacks -----------------------------------------------------------------------


def test_callable_fallback_answers_when_every_attempt_fails(fleet: Fleet, clock: FakeClock) -> None:
    seen: list[BaseException | httpx.Response] = []

    def fallback(
        request: httpx.Request, outcome: BaseException | httpx.Response
    ) -> httpx.Response | None:
        seen.append(outcome)
        return httpx.Response(200, json={"fallback": request.url.path}, request=request)

    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=fallback)
    with httpx.Client(transport=transport) as client:
        assert client.get(fleet.urls[0] + "/ok").json()["replica"] == 0
        assert client.get(fleet.urls[0] + "/missing?status=404").status_code == 404
        assert seen == []  # neither a success nor a client error is a failure
        failed = client.get(fleet.urls[0] + "/down?status=503")
        fleet[0].go_down()
        refused = client.get(fleet.urls[0] + "/refused")
    assert failed.json() == {"fallback": "/down"}
    assert info(failed)["stale"] is True
    assert refused.json() == {"fallback": "/refused"}
    assert info(refused)["stale"] is True
    first, second = seen
    assert isinstance(first, httpx.Response) and first.status_code == 503
    assert isinstance(second, httpx.ConnectError)


@pytest.mark.anyio
async def test_callable_fallback_answers_when_every_attempt_fails_async(
    fleet: Fleet, clock: FakeClock
) -> None:
    def fallback(
        request: httpx.Request, outcome: BaseException | httpx.Response
    ) -> httpx.Response | None:
        return httpx.Response(200, json={"fallback": True}, request=request)

    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=fallback)
    fleet[0].go_down()
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get(fleet.urls[0] + "/x")
    assert response.json() == {"fallback": True}
    assert info(response)["stale"] is True


def test_callable_fallback_returning_none_keeps_the_failure(fleet: Fleet, clock: FakeClock) -> None:
    def fallback(
        request: httpx.Request, outcome: BaseException | httpx.Response
    ) -> httpx.Response | None:
        return None

    transport = rs.ResilientTransport(clock=clock, wait=0.0, fallback=fallback)
    with httpx.Client(transport=transport) as client:
        failed = client.get(fleet.urls[0] + "/x?status=503")
        fleet[0].go_down()
        with pytest.raises(httpx.ConnectError):
            client.get(fleet.urls[0] + "/x")
    assert failed.status_code == 503
    assert info(failed) == {"attempts": 3, "stale": False}


# --- Cache-Control, over a mock origin --------------------------------------------------------


class Origin:
    """A mock origin: healthy answers 200 with the given headers; failing answers 503.

    Bodies are unread streams, as a network transport returns them (``content=`` would make
    httpx read the body inside ``Response()``).
    """

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.headers = headers or {}
        self.failing = False
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.failing:
            return httpx.Response(503)
        body = f"fresh {request.url.path}".encode()
        return httpx.Response(200, headers=self.headers, stream=httpx.ByteStream(body))


def serve(origin: Origin, cache: StaleIfError, clock: FakeClock) -> httpx.Client:
    transport = rs.ResilientTransport(
        httpx.MockTransport(origin), clock=clock, wait=0.0, breaker=None, fallback=cache
    )
    return httpx.Client(transport=transport)


def test_stale_if_error_directive_overrides_the_default_window(clock: FakeClock) -> None:
    origin = Origin({"Cache-Control": "max-age=0, stale-if-error=10"})
    with serve(origin, StaleIfError(clock=clock, stale_for=300.0), clock) as client:
        client.get("http://origin/a")
        origin.failing = True
        clock.advance(9.5)
        assert client.get("http://origin/a").text == "fresh /a"
        clock.advance(1.0)
        assert client.get("http://origin/a").status_code == 503


def test_stale_if_error_directive_may_lengthen_the_window(clock: FakeClock) -> None:
    origin = Origin({"Cache-Control": 'stale-if-error="600"'})
    with serve(origin, StaleIfError(clock=clock, stale_for=60.0), clock) as client:
        client.get("http://origin/a")
        origin.failing = True
        clock.advance(500.0)
        response = client.get("http://origin/a")
    assert response.text == "fresh /a"
    assert response.headers[STALE_HEADER] == "500"


def test_the_default_window_applies_without_a_directive(clock: FakeClock) -> None:
    origin = Origin({"Cache-Control": "max-age=60"})
    with serve(origin, StaleIfError(clock=clock, stale_for=30.0), clock) as client:
        client.get("http://origin/a")
        origin.failing = True
        clock.advance(29.0)
        assert client.get("http://origin/a").status_code == 200
        clock.advance(2.0)
        assert client.get("http://origin/a").status_code == 503


@pytest.mark.parametrize(
    "cache_control",
    [
        "no-store",
        "max-age=60, no-store",
        "NO-STORE",
        "private",
        "private, max-age=5",
        'private="Set-Cookie", max-age=60',  # private with fields: a shared cache keeps none
        # Not to be served stale without the server's leave (RFC 9111 §4.2.4):
        "no-cache",
        "max-age=60, must-revalidate",
        "proxy-revalidate",
    ],
)
def test_no_store_and_private_answers_are_not_kept(clock: FakeClock, cache_control: str) -> None:
    origin = Origin({"Cache-Control": cache_control})
    cache = StaleIfError(clock=clock)
    with serve(origin, cache, clock) as client:
        client.get("http://origin/a")
        assert len(cache) == 0
        origin.failing = True
        assert client.get("http://origin/a").status_code == 503


def test_an_answer_to_a_url_with_credentials_is_not_kept(clock: FakeClock) -> None:
    # httpx turns URL userinfo into a Basic Authorization header: a per-user answer
    origin = Origin()
    cache = StaleIfError(clock=clock)
    with serve(origin, cache, clock) as client:
        client.get("http://alice:s3cret@origin/a")
        assert len(cache) == 0
        origin.failing = True
        assert client.get("http://origin/a").status_code == 503


def after_an_outage(
    clock: FakeClock, origin: Origin, url: str, first: dict[str, str], *then: dict[str, str]
) -> list[httpx.Response]:
    """GET ``url`` with the headers ``first`` while the origin is up, then once with each of
    ``then`` once it fails: the answers the cache gave."""
    with serve(origin, StaleIfError(clock=clock), clock) as client:
        client.get(url, headers=first)
        origin.failing = True
        return [client.get(url, headers=headers) for headers in then]


def test_an_authorized_answer_is_not_served_to_another_user(clock: FakeClock) -> None:
    (bob,) = after_an_outage(
        clock,
        Origin(),
        "http://origin/me",
        {"Authorization": "Bearer alice"},
        {"Authorization": "Bearer bob"},
    )
    assert bob.status_code == 503


def test_an_answer_with_a_cookie_is_not_served_to_another_user(clock: FakeClock) -> None:
    origin = Origin()
    cache = StaleIfError(clock=clock)
    with serve(origin, cache, clock) as client:
        client.get("http://origin/cart", headers={"Cookie": "session=alice"})
        assert len(cache) == 0
        origin.failing = True
        assert client.get("http://origin/cart").status_code == 503


def test_a_public_answer_to_an_authorized_request_is_kept(clock: FakeClock) -> None:
    origin = Origin({"Cache-Control": "public, max-age=60"})
    with serve(origin, StaleIfError(clock=clock), clock) as client:
        client.get("http://origin/news", headers={"Authorization": "Bearer alice"})
        origin.failing = True
        response = client.get("http://origin/news", headers={"Authorization": "Bearer bob"})
    assert response.status_code == 200
    assert info(response)["stale"] is True


def test_an_answer_read_by_the_inner_transport_is_kept(clock: FakeClock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="fresh")

    cache = StaleIfError(clock=clock)
    transport = rs.ResilientTransport(
        httpx.MockTransport(handler), clock=clock, breaker=None, fallback=cache
    )
    with httpx.Client(transport=transport) as client:
        assert client.get("http://origin/a").text == "fresh"
    assert len(cache) == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_entries": 0}, "max_entries"),
        ({"max_body_bytes": -1}, "max_body_bytes"),
        ({"stale_for": 0.0}, "stale_for"),
        ({"stale_for": float("inf")}, "stale_for"),
    ],
)
def test_stale_if_error_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        StaleIfError(**kwargs)


def test_a_must_revalidate_answer_is_served_stale_where_the_server_allows_it(
    clock: FakeClock,
) -> None:
    origin = Origin({"Cache-Control": "must-revalidate, stale-if-error=60"})
    with serve(origin, StaleIfError(clock=clock), clock) as client:
        client.get("http://origin/a")
        origin.failing = True
        assert info(client.get("http://origin/a"))["stale"] is True


def test_an_answer_is_served_only_to_requests_with_the_headers_it_varies_on(
    clock: FakeClock,
) -> None:
    alice_key, bob_key = {"X-Api-Key": "alice"}, {"X-Api-Key": "bob"}
    bob, alice = after_an_outage(
        clock,
        Origin({"Vary": "Accept-Language, X-Api-Key"}),
        "http://origin/account",
        alice_key,
        bob_key,
        alice_key,
    )
    assert bob.status_code == 503  # alice's answer is not bob's
    assert info(alice)["stale"] is True


def test_an_answer_that_varies_on_everything_is_not_kept(clock: FakeClock) -> None:
    origin = Origin({"Vary": "*"})
    cache = StaleIfError(clock=clock)
    with serve(origin, cache, clock) as client:
        client.get("http://origin/a")
    assert len(cache) == 0


def test_virtual_hosts_on_one_address_do_not_share_answers(clock: FakeClock) -> None:
    tenant_a, tenant_b = {"Host": "tenant-a.example"}, {"Host": "tenant-b.example"}
    b, a = after_an_outage(clock, Origin(), "http://10.0.0.7/page", tenant_a, tenant_b, tenant_a)
    assert b.status_code == 503
    assert info(a)["stale"] is True


def test_a_set_cookie_is_never_replayed(clock: FakeClock) -> None:
    # One caller's session must not land in another client's cookie jar.
    origin = Origin({"Set-Cookie": "session=FIRST-CALLER; Path=/", "X-Kept": "yes"})
    with serve(origin, StaleIfError(clock=clock), clock) as first:
        first.get("http://origin/welcome")
        origin.failing = True
        stale = first.get("http://origin/welcome")
    assert info(stale)["stale"] is True
    assert "set-cookie" not in stale.headers
    assert stale.headers["X-Kept"] == "yes"


def test_a_request_that_asks_for_no_store_leaves_its_answer_out(clock: FakeClock) -> None:
    origin = Origin()
    cache = StaleIfError(clock=clock)
    with serve(origin, cache, clock) as client:
        client.get("http://origin/a", headers={"Cache-Control": "no-store"})
    assert len(cache) == 0
