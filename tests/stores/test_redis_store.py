"""RedisStore with breakers and budgets: round trips, fallback when Redis fails, secrets, async."""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, cast
from urllib.parse import urlsplit

import anyio
import pybreaker
import pytest
import redis

import resilient as rs
from resilient.events import (
    CircuitStateChanged,
    Event,
    HedgeLaunched,
    StoreRecovered,
    StoreUnavailable,
)
from resilient.stores import RedisStore
from resilient.stores._redis import BreakerReply
from resilient.testing import FakeClock
from tests.stores.conftest import RedisServer, loop_ticks

PASSWORD = "s3cr3t-Pa55word"


def is_available(store: RedisStore) -> bool:
    return store.available


def fail() -> None:
    raise OSError("backend down")


def _count_round_trips(store: RedisStore) -> list[str]:
    """Every script the store runs (a sync round trip each) is appended to the list returned."""
    seen: list[str] = []
    for name, script in list(store._scripts.items()):

        def counting(*args: Any, _script: Any = script, _name: str = name, **kw: Any) -> Any:
            seen.append(_name)
            return _script(*args, **kw)

        store._scripts[name] = counting
    return seen


# -- the URL, secrets, validation ------------------------------------------------------------------


def test_repr_and_str_mask_the_password() -> None:
    store = RedisStore(f"redis://app:{PASSWORD}@cache.internal:6379/2")
    assert repr(store) == "RedisStore('redis://app:***@cache.internal:6379/2')"
    assert str(store) == repr(store)
    assert store.label == "cache.internal:6379/2"
    assert not store.tls
    assert repr(RedisStore("redis://127.0.0.1:7000")) == "RedisStore('redis://127.0.0.1:7000/0')"


def test_a_rediss_url_connects_with_tls() -> None:
    store = RedisStore(f"rediss://:{PASSWORD}@cache.internal:6380/1", ssl_cert_reqs="required")
    pool = store._client.connection_pool
    assert store.tls
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    assert pool.connection_kwargs["socket_timeout"] == 0.05
    assert repr(store) == "RedisStore('rediss://:***@cache.internal:6380/1')"


def test_a_bad_url_is_refused_without_showing_the_password() -> None:
    with pytest.raises(ValueError, match="url") as info:
        RedisStore(f"http://:{PASSWORD}@cache.internal:6379/0")
    assert PASSWORD not in str(info.value)
    assert "***" in str(info.value)
    # A URL object rather than a str: its repr would show the password.
    with pytest.raises(ValueError, match="url") as info:
        RedisStore(urlsplit(f"redis://:{PASSWORD}@cache.internal:6379/0"))  # type: ignore[arg-type]
    assert PASSWORD not in str(info.value)
    # redis-py also takes the password as a query option; a bad db beside it must not show it.
    with pytest.raises(ValueError, match="url") as info:
        RedisStore(f"redis://cache.internal:6379?password={PASSWORD}&db=x")
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("socket_timeout", 0),
        ("retry_interval", -1.0),
        ("flush_calls", 0),
        ("key_ttl", float("inf")),
    ],
)
def test_store_settings_are_validated(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        RedisStore("redis://127.0.0.1:6379/0", **cast(dict[str, Any], {field: value}))


def test_store_must_be_a_store() -> None:
    with pytest.raises(ValueError, match="store must be a RedisStore, got 'redis://x'"):
        rs.CircuitBreaker(store="redis://x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="store must be a RedisStore"):
        rs.RetryBudget(store=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pybreaker"):
        rs.CircuitBreaker.from_pybreaker(
            pybreaker.CircuitBreaker(), store=RedisStore("redis://127.0.0.1:1/0")
        )


def test_a_breaker_without_a_store_keeps_its_fast_path() -> None:
    assert rs.CircuitBreaker()._plain
    assert not rs.CircuitBreaker(store=RedisStore("redis://127.0.0.1:1/0"))._plain


# -- sharing ---------------------------------------------------------------------------------------------


@pytest.fixture
def store(redis_server: RedisServer, prefix: str) -> RedisStore:
    return RedisStore(redis_server.url, prefix=prefix, socket_timeout=1.0)


def test_a_closed_call_costs_one_round_trip_and_a_refused_one_none(store: RedisStore) -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(name="rt", min_calls=5, open_for=10.0, store=store, clock=clock)
    trips = _count_round_trips(store)
    breaker.call(lambda: None)
    assert trips == ["breaker", "breaker"]  # the first call also fetches the state
    for _ in range(9):
        breaker.call(lambda: None)
    assert len(trips) == 11  # then one per call: recording its outcome
    clock.advance(store.staleness + 0.1)  # idle past the staleness bound: refresh first
    breaker.call(lambda: None)
    assert len(trips) == 13
    breaker.open()
    del trips[:]
    for _ in range(5):
        with pytest.raises(rs.CircuitOpenError):
            breaker.call(lambda: None)
        clock.advance(1.0)  # the cache grows old; a refusal still does not ask
    assert trips == []  # open: refused from the cache


def test_breakers_of_one_name_share_state_and_announce_what_they_see(store: RedisStore) -> None:
    seen: list[Event] = []
    one = rs.CircuitBreaker(name="shared", min_calls=4, open_for=20.0, store=store)
    two = rs.CircuitBreaker(
        name="shared", min_calls=4, open_for=20.0, store=store, hooks=[seen.append]
    )
    other = rs.CircuitBreaker(name="other", min_calls=4, store=store)
    for breaker in (one, two, one, two):  # 4 failures between them: open
        with pytest.raises(OSError):
            breaker.call(fail)
    assert two.state == "open"
    # `one` last heard "closed": its next call goes through and learns "open" from the reply
    assert one.call(lambda: "late") == "late"
    with pytest.raises(rs.CircuitOpenError) as info:
        one.call(lambda: None)
    assert info.value.retry_after is not None and 19.0 < info.value.retry_after <= 20.0
    assert other.call(lambda: "fine") == "fine"
    assert [e for e in seen if isinstance(e, CircuitStateChanged)] == [
        CircuitStateChanged("shared", "closed", "open", 20.0)
    ]
    two.reset()  # an operator's reset closes it for everyone (seen once the cache is stale)
    one._shared.synced_at = float("-inf")  # type: ignore[union-attr]
    assert one.state == "closed"


def test_a_late_reply_does_not_undo_a_newer_one(store: RedisStore) -> None:
    # Replies can arrive out of order (threads race from the round trip to the lock): an older
    # generation's state must not overwrite what a newer reply said.
    seen: list[Event] = []
    breaker = rs.CircuitBreaker(
        name="late", min_calls=2, open_for=20.0, store=store, hooks=[seen.append]
    )
    for _ in range(2):
        with pytest.raises(OSError):
            breaker.call(fail)
    assert breaker.state == "open"
    shared = breaker._shared
    assert shared is not None
    newest = shared.generation
    breaker._shared_adopt(BreakerReply(0, newest - 1, 0.0, 0.0, True))  # "closed", older
    assert breaker.state == "open" and shared.generation == newest
    assert [e.new for e in seen if isinstance(e, CircuitStateChanged)] == ["open"]


def test_a_flushed_script_cache_is_reloaded(store: RedisStore) -> None:
    breaker = rs.CircuitBreaker(name="noscript", min_calls=2, store=store)
    breaker.call(lambda: None)
    store._client.script_flush()  # what a restarted or failed-over Redis looks like
    with pytest.raises(OSError):
        breaker.call(fail)  # S F: 1 of 2 failed, through a reloaded script
    assert store.available and store.errors == 0
    assert store._client.hget(f"{store.prefix}cb:{{noscript}}", "state") == b"1"


def test_open_until_is_read_on_the_local_clock(store: RedisStore) -> None:
    """Redis's time is converted: a breaker whose clock reads 1,000,000 still waits open_for."""
    far = FakeClock(1_000_000.0)
    opener = rs.CircuitBreaker(name="clock", open_for=30.0, store=store, clock=FakeClock())
    opener.open()
    reader = rs.CircuitBreaker(name="clock", open_for=30.0, store=store, clock=far)
    assert reader.state == "open"
    retry_after = reader.retry_after()
    assert retry_after is not None and 29.0 < retry_after <= 30.0
    far.advance(29.5)
    with pytest.raises(rs.CircuitOpenError):
        reader.call(lambda: None)
    far.advance(1.0)  # locally past open-until, but Redis has not got there: still open
    with pytest.raises(rs.CircuitOpenError):
        reader.call(lambda: None)


def test_permission_protocol_claims_a_fleet_wide_probe(store: RedisStore) -> None:
    one = rs.CircuitBreaker(name="probe", open_for=0.05, store=store)
    two = rs.CircuitBreaker(name="probe", open_for=0.05, store=store)
    one.open()
    time.sleep(0.06)
    assert one.try_acquire()
    assert not two.try_acquire()  # one probe in the whole fleet
    one.release()  # given back
    assert two.try_acquire()
    two.on_success(0.01)
    assert two.state == "closed"
    assert one.try_acquire()  # half-open in its cache: asks, and hears "closed"
    assert one.state == "closed"
    one.on_success(0.01)


@pytest.mark.anyio
async def test_a_cancelled_async_probe_gives_its_claim_back(
    anyio_backend: str, store: RedisStore
) -> None:
    one = rs.CircuitBreaker(name="cancelled", open_for=0.05, store=store)
    two = rs.CircuitBreaker(name="cancelled", open_for=0.05, store=store)
    one.open()
    await anyio.sleep(0.06)
    probing = anyio.Event()

    async def hangs() -> None:
        probing.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(one.call_async, hangs)
        await probing.wait()
        assert not two.try_acquire()  # the fleet's one probe is out
        tg.cancel_scope.cancel()
    assert two.try_acquire()  # given back to the store by the cancelled call
    two.on_success(0.01)
    assert two.state == "closed"
    await store.aclose()


@pytest.mark.anyio
async def test_an_async_probe_whose_result_predicate_raises_gives_its_claim_back(
    anyio_backend: str, store: RedisStore
) -> None:
    def broken(value: object) -> bool:
        raise RuntimeError("predicate bug")

    one = rs.CircuitBreaker(name="predicate", open_for=0.05, store=store, result=broken)
    two = rs.CircuitBreaker(name="predicate", open_for=0.05, store=store)
    one.open()
    await anyio.sleep(0.06)

    async def answers() -> str:
        return "ok"

    with pytest.raises(RuntimeError, match="predicate bug"):
        await one.call_async(answers)
    assert two.try_acquire()  # the fleet's one probe was given back
    two.on_success(0.01)
    await store.aclose()


def test_deposits_are_sent_in_batches(store: RedisStore) -> None:
    clock = FakeClock()
    sender = rs.RetryBudget(
        name="batch", ratio=0.5, min_per_second=0.1, ttl=10.0, store=store, clock=clock
    )
    reader = rs.RetryBudget(
        name="batch", ratio=0.5, min_per_second=0.1, ttl=10.0, store=store, clock=clock
    )
    trips = _count_round_trips(store)
    for _ in range(store.flush_calls - 1):
        sender.deposit()
    assert trips == []
    assert reader.balance() == pytest.approx(1.0)  # only the reserve
    sender.deposit()  # the 100th: sent
    assert reader.balance() == pytest.approx(1.0 + 0.5 * store.flush_calls)
    sender.deposit()
    clock.advance(store.flush_interval)
    sender.deposit()  # a second later: sent
    assert reader.balance() == pytest.approx(2.0 + 0.5 * store.flush_calls)


# -- when Redis fails ------------------------------------------------------------------------------------


def _store_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "resilient.stores" and r.levelno == logging.WARNING
    ]


def test_killed_redis_falls_back_to_local_state_and_sharing_resumes(
    own_redis: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    events: list[Event] = []
    store = RedisStore(
        own_redis.url, prefix=prefix, clock=clock, hooks=[events.append], socket_timeout=0.5
    )
    breaker = rs.CircuitBreaker(name="k", min_calls=3, open_for=10.0, store=store, clock=clock)
    budget = rs.RetryBudget(name="k", store=store, clock=clock)
    assert breaker.call(lambda: "shared") == "shared"
    assert store.available
    own_redis.kill()
    caplog.set_level(logging.INFO, logger="resilient.stores")
    # no Redis error reaches the caller: the backend's own errors, then the local breaker's
    with pytest.raises(OSError, match="backend down"):
        breaker.call(fail)
    assert not is_available(store)
    with pytest.raises(OSError, match="backend down"):
        breaker.call(fail)  # S F F in the local window: 2 of 3 failed
    with pytest.raises(rs.CircuitOpenError):
        breaker.call(fail)
    assert breaker.state == "open"
    budget.deposit()
    assert budget.try_withdraw()  # the local budget's reserve
    errors = store.errors
    clock.advance(0.5)
    assert breaker.state == "open"  # a refresh is due, but Redis is not retried within 1 s
    assert store.errors == errors
    assert len(_store_warnings(caplog)) == 1
    assert "127.0.0.1:" in _store_warnings(caplog)[0].getMessage()
    assert [type(e) for e in events] == [StoreUnavailable]

    own_redis.start()  # same port, empty
    other = RedisStore(own_redis.url, prefix=prefix)
    rs.CircuitBreaker(name="k", open_for=30.0, store=other).open()  # another client's change
    clock.advance(10.0)  # past the local open-until and the retry interval
    with pytest.raises(rs.CircuitOpenError) as info:
        breaker.call(lambda: None)  # Redis asked again: open there, for 30 s
    assert info.value.retry_after is not None and info.value.retry_after > 25.0
    assert store.available
    assert [type(e) for e in events] == [StoreUnavailable, StoreRecovered]
    assert len(_store_warnings(caplog)) == 1  # one warning per episode
    assert any("available again" in r.getMessage() for r in caplog.records)  # at INFO
    other.close()
    store.close()


def test_a_stalled_redis_times_out_to_local_state(own_redis: RedisServer, prefix: str) -> None:
    store = RedisStore(own_redis.url, prefix=prefix, socket_timeout=0.05)
    breaker = rs.CircuitBreaker(name="stall", store=store)
    budget = rs.RetryBudget(name="stall", store=store)
    breaker.call(lambda: None)
    with own_redis.stopped():
        started = time.monotonic()
        assert breaker.call(lambda: "local") == "local"
        budget.deposit()
        assert budget.try_withdraw()
        assert breaker.call(lambda: "local") == "local"
        assert time.monotonic() - started < 0.5  # one timeout, then local until retry_interval
        assert not is_available(store)
    store.close()


@pytest.fixture
def locked_redis() -> Iterator[RedisServer]:
    from tests.stores.conftest import _available

    if not _available():
        pytest.skip("redis-server is not installed")
    server = RedisServer(password=PASSWORD)
    try:
        server.start()
        yield server
    finally:
        server.kill()


def test_a_wrong_password_falls_back_and_is_never_shown(
    locked_redis: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "Wr0ng-" + PASSWORD
    events: list[Event] = []
    store = RedisStore(
        f"redis://:{wrong}@127.0.0.1:{locked_redis.port}/0", prefix=prefix, hooks=[events.append]
    )
    caplog.set_level(logging.DEBUG)
    breaker = rs.CircuitBreaker(name="pw", min_calls=2, store=store)
    with pytest.raises(OSError, match="backend down"):
        breaker.call(fail)
    with pytest.raises(OSError, match="backend down"):
        breaker.call(fail)
    with pytest.raises(rs.CircuitOpenError) as info:
        breaker.call(fail)  # the local breaker opened
    assert not is_available(store)
    [warning] = _store_warnings(caplog)
    assert "AuthenticationError" in warning.getMessage()
    assert f"127.0.0.1:{locked_redis.port}/0" in warning.getMessage()
    shown = [caplog.text, repr(store), str(info.value), repr(events), repr(breaker)]
    assert all(wrong not in text and PASSWORD not in text for text in shown)
    assert isinstance(events[0], StoreUnavailable) and events[0].error == "AuthenticationError"
    # the right password shares
    good = RedisStore(locked_redis.url, prefix=prefix)
    rs.CircuitBreaker(name="pw", store=good).open()
    assert rs.CircuitBreaker(name="pw", store=good).state == "open"
    assert good.available
    store.close()
    good.close()


# -- async -----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_breakers_share_state(anyio_backend: str, store: RedisStore) -> None:
    breaker = rs.CircuitBreaker(name="async", min_calls=3, open_for=20.0, store=store)

    async def failing() -> None:
        raise OSError("backend down")

    async def fine() -> str:
        return "fine"

    assert await breaker.call_async(fine) == "fine"
    for _ in range(2):  # S F F: 2 of 3 failed
        with pytest.raises(OSError):
            await breaker.call_async(failing)
    with pytest.raises(rs.CircuitOpenError):
        await breaker.call_async(fine)
    assert rs.CircuitBreaker(name="async", store=store).state == "open"  # a sync reader sees it
    # asyncio uses redis.asyncio (one client for the running loop); trio a worker thread
    assert bool(store._async) is (anyio_backend == "asyncio")
    await store.aclose()


@pytest.mark.anyio
async def test_async_round_trips_do_not_block_the_event_loop(
    anyio_backend: str, own_redis: RedisServer, prefix: str
) -> None:
    store = RedisStore(own_redis.url, prefix=prefix, socket_timeout=0.3)
    breaker = rs.CircuitBreaker(name="loop", store=store)

    async def fine() -> str:
        return "fine"

    assert await breaker.call_async(fine) == "fine"
    breaker._shared.synced_at = float("-inf")  # type: ignore[union-attr]  # force a refresh
    with own_redis.stopped():
        async with loop_ticks() as ticks:
            assert await breaker.call_async(fine) == "fine"  # waits out the 0.3 s timeout
    assert not is_available(store)
    assert ticks[0] >= 10  # the loop kept running while Redis did not answer
    await store.aclose()


def _unflushed_store(server: RedisServer, prefix: str) -> RedisStore:
    """A store whose budgets never flush their deposits: a withdrawal is their one round trip,
    and it waits out 0.3 s when Redis is stopped."""
    return RedisStore(
        server.url, prefix=prefix, socket_timeout=0.3, flush_calls=10_000, flush_interval=3600
    )


@pytest.mark.anyio
async def test_an_async_retry_takes_its_budget_token_without_blocking_the_event_loop(
    anyio_backend: str, own_redis: RedisServer, prefix: str
) -> None:
    # With Redis stopped, the withdrawal waits out the store's 0.3 s timeout: in async code the
    # loop runs meanwhile. (Deposits are not flushed here: the withdrawal is the one round trip.)
    store = _unflushed_store(own_redis, prefix)
    budget = rs.RetryBudget(name="loop", store=store)
    retry = rs.Retry(on=OSError, attempts=2, wait=0.0, budget=budget)
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("once")
        return "fine"

    with own_redis.stopped():
        async with loop_ticks() as ticks:
            assert await retry.call_async(flaky) == "fine"
    assert not is_available(store)  # the round trip was made, and timed out
    assert ticks[0] >= 10
    await store.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_result_held_for_a_retry_is_closed_when_the_caller_is_cancelled_meanwhile(
    anyio_backend: str, own_redis: RedisServer, prefix: str
) -> None:
    # `result=` asked for a retry; while the budget's token is asked of a stalled Redis the
    # caller's task is cancelled (asyncio's own cancellation, raised once the shielded round
    # trip is over). Nobody will take the result: it is closed (a response's connection).
    store = _unflushed_store(own_redis, prefix)
    budget = rs.RetryBudget(name="loop", store=store)
    retry = rs.Retry(on=OSError, result=lambda r: True, attempts=2, wait=0.0, budget=budget)

    class Result:
        closed = False

        async def aclose(self) -> None:
            self.closed = True

    held = Result()

    async def answer() -> Result:
        return held

    with own_redis.stopped():
        task = asyncio.ensure_future(retry.call_async(answer))
        await asyncio.sleep(0.1)  # in the round trip now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert held.closed
    await store.aclose()


@pytest.mark.anyio
async def test_an_async_hedge_takes_its_budget_token_without_blocking_the_event_loop(
    anyio_backend: str, own_redis: RedisServer, prefix: str
) -> None:
    store = _unflushed_store(own_redis, prefix)
    hedge = rs.Hedge(delay=0.01, budget=rs.RetryBudget(name="loop", store=store))
    calls: list[int] = []

    async def slow_once() -> str:
        calls.append(1)
        await anyio.sleep(1.0 if len(calls) == 1 else 0.0)
        return "fine"

    with own_redis.stopped():
        async with loop_ticks() as ticks:
            assert await hedge.call_async(slow_once) == "fine"
    assert len(calls) == 2  # the hedge went out (with the local token) and answered
    assert not is_available(store)
    assert ticks[0] >= 10
    await store.aclose()


@pytest.mark.anyio
async def test_an_async_hedge_decided_while_its_token_is_asked_is_not_launched(
    anyio_backend: str, own_redis: RedisServer, prefix: str
) -> None:
    # The first attempt answers (at 0.1 s) while the hedge's token is asked of a stalled Redis
    # (until its 0.3 s timeout): the race is over, so no hedge is announced or started after all.
    store = _unflushed_store(own_redis, prefix)
    budget = rs.RetryBudget(name="late", store=store)
    events: list[Event] = []
    hedge = rs.Hedge(delay=0.05, budget=budget, hooks=[events.append])
    calls: list[int] = []

    async def first_wins() -> str:
        calls.append(1)
        await anyio.sleep(0.1 if len(calls) == 1 else 0.5)
        return "fine"

    assert await budget.try_withdraw_async()  # connected
    with own_redis.stopped():
        assert await hedge.call_async(first_wins) == "fine"
    assert calls == [1]
    assert [e for e in events if isinstance(e, HedgeLaunched)] == []
    await store.aclose()


@pytest.mark.anyio
async def test_try_withdraw_async_shares_the_fleet_s_tokens(
    anyio_backend: str, redis_server: RedisServer, prefix: str
) -> None:
    # Two budgets on one key stand for two processes: what one withdraws async, the other sees.
    def budget() -> rs.RetryBudget:
        store = RedisStore(redis_server.url, prefix=prefix, socket_timeout=1.0)
        return rs.RetryBudget(name="fleet", ratio=0.0, min_per_second=0.2, ttl=10.0, store=store)

    one, two = budget(), budget()
    assert await one.try_withdraw_async()
    assert await one.try_withdraw_async()
    assert not await two.try_withdraw_async()  # the fleet's 2 tokens are spent
    assert not two.try_withdraw()


def test_pybreaker_storage_still_works_beside_stores() -> None:
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    breaker = rs.CircuitBreaker.from_pybreaker(
        pybreaker.CircuitBreaker(fail_max=1, reset_timeout=30, state_storage=storage)
    )
    with pytest.raises(OSError):
        breaker.call(fail)
    assert storage.state == pybreaker.STATE_OPEN


_: Callable[..., object] = fail


def test_resilient_imports_without_redis_and_the_store_says_what_is_missing() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import resilient, resilient.stores\n"
        "rs_breaker = resilient.CircuitBreaker(name='x')\n"
        "try:\n"
        "    resilient.stores.RedisStore('redis://127.0.0.1:1/0')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert "pip install 'resilient[redis]'" in done.stdout


# -- a review's findings ---------------------------------------------------------------------------


def test_after_redis_restarts_empty_a_process_follows_the_new_state(
    redis_server: RedisServer, prefix: str
) -> None:
    # A went closed -> open -> half-open -> closed (its cached generation moved on); Redis then
    # lost every key. B trips the new key's breaker. A's probe must be taken as the fleet's:
    # the new key's generations once restarted at 0, below A's, and A dropped every reply as
    # late for an hour (key_ttl), probing behind the fleet's back and leaking the claims.
    store = RedisStore(redis_server.url, prefix=prefix, socket_timeout=1.0, staleness=0.0)
    a = rs.CircuitBreaker(name="flushed", consecutive_failures=1, open_for=0.05, store=store)
    b = rs.CircuitBreaker(name="flushed", consecutive_failures=1, open_for=0.05, store=store)
    a.open()
    time.sleep(0.06)
    a.call(lambda: None)  # its probe closes the breaker
    assert a.state == "closed"
    store._client.flushall()
    with pytest.raises(OSError):
        b.call(fail)  # the fresh key: open
    time.sleep(0.06)
    assert a.call(lambda: "ok") == "ok"  # the fleet's probe, taken by A
    assert a.state == "closed"
    assert b.state == "closed" or b.call(lambda: "ok") == "ok"
    assert store._client.zcard(f"{store.prefix}breaker:flushed:probes") == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_an_asyncio_cancellation_during_the_probes_acquire_leaks_no_claim(
    own_redis: RedisServer, prefix: str
) -> None:
    # asyncio's own task.cancel() (wait_for, asyncio.timeout, a TaskGroup) goes through anyio's
    # shield: Redis granted the claim once it answered, and the process never recorded it or
    # gave it back, so the fleet's one probe was gone for the lease (10 s).
    import asyncio

    store = RedisStore(own_redis.url, prefix=prefix, socket_timeout=2.0)
    one = rs.CircuitBreaker(name="native", open_for=0.05, store=store)
    two = rs.CircuitBreaker(name="native", open_for=0.05, store=store)
    one.open()
    await asyncio.sleep(0.06)
    await one.call_async(_answer)  # the asyncio client is connected; the probe closed it
    one.open()
    await asyncio.sleep(0.06)
    with own_redis.stopped():  # the acquire is sent and waits for Redis
        task = asyncio.ensure_future(one.call_async(_answer))
        await asyncio.sleep(0.1)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # raised once Redis answered (and the claim went back)
    assert two.try_acquire()  # the fleet's probe is free
    two.release()
    await store.aclose()


async def _answer() -> str:
    return "ok"


def test_a_store_keeps_no_client_for_an_event_loop_that_has_closed(store: RedisStore) -> None:
    # Each client held its loop: one `asyncio.run` per job kept a loop, a client and a socket
    # each, for good.
    import asyncio

    breaker = rs.CircuitBreaker(name="loops", open_for=0.05, store=store)
    breaker.open()
    time.sleep(0.06)
    for _ in range(5):
        asyncio.run(breaker.call_async(_answer))
        breaker.open()
        time.sleep(0.06)
    assert len(store._async) <= 1
    gc.collect()  # a socket left for the collector would warn (an error in this suite)


@pytest.mark.parametrize("options", [{"sockt_timeout": 1.0}, {"protocol": 4}])
def test_an_option_redis_does_not_take_is_refused_naming_it(
    redis_server: RedisServer, options: dict[str, Any]
) -> None:
    # It failed every round trip instead: the store was down for good, every process on its own.
    name = next(iter(options))
    with pytest.raises(ValueError, match=rf"options must be redis-py connection options.*{name}"):
        RedisStore(redis_server.url, **options)


class _RaisesOnHalfOpen(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if getattr(new_state, "name", new_state) == "half-open":
            raise RuntimeError("listener bug")


def test_a_listener_raising_as_the_probe_is_granted_gives_the_claim_back(
    store: RedisStore,
) -> None:
    one = rs.CircuitBreaker(
        name="announce", open_for=0.05, store=store, listeners=[_RaisesOnHalfOpen()]
    )
    two = rs.CircuitBreaker(name="announce", open_for=0.05, store=store)
    one.open()
    time.sleep(0.06)
    with pytest.raises(RuntimeError, match="listener bug"):
        one.call(lambda: "ok")
    assert two.try_acquire()  # the fleet's probe was given back
    two.release()
