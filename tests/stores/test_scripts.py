"""The Lua scripts' arithmetic against a real redis-server: windows, thresholds, backoff, probes."""

from __future__ import annotations

import random
import time
from typing import Any, cast

import pytest
import redis

import resilient as rs
from resilient.policies.breaker import CircuitBreaker
from resilient.stores import RedisStore
from resilient.stores._redis import BreakerHandle, BreakerReply
from resilient.testing import FakeClock
from tests.stores.conftest import RedisServer

CLOSED, OPEN, HALF_OPEN = 0, 1, 2


def _handle(breaker: CircuitBreaker) -> BreakerHandle:
    assert breaker._shared is not None
    return breaker._shared


def _call(
    handle: BreakerHandle, op: str, claim: str = "", *, failed: bool = False, slow: bool = False
) -> BreakerReply:
    reply = handle.call(op, claim, failed, slow)
    assert reply is not None, "redis did not answer"
    return reply


@pytest.fixture
def store(redis_server: RedisServer, prefix: str) -> RedisStore:
    return RedisStore(redis_server.url, prefix=prefix, socket_timeout=1.0)


def _breaker(store: RedisStore, **kw: Any) -> CircuitBreaker:
    kw.setdefault("name", "s")
    return rs.CircuitBreaker(store=store, clock=FakeClock(), **kw)


def test_time_window_opens_at_the_failure_rate_once_min_calls_are_in(store: RedisStore) -> None:
    h = _handle(_breaker(store, failure_rate=0.5, min_calls=4))
    assert _call(h, "record", failed=True).state == CLOSED  # 1 call: below min_calls
    assert _call(h, "record").state == CLOSED
    assert _call(h, "record", failed=True).state == CLOSED  # 2 of 3: still below min_calls
    assert _call(h, "record").state == CLOSED  # a success never opens
    reply = _call(h, "record", failed=True)  # 3 of 5 >= 50 %
    assert reply.state == OPEN
    assert reply.opened_for == pytest.approx(5.0)
    assert 4.5 < reply.open_left <= 5.0
    # open: further outcomes move nothing
    assert _call(h, "record", failed=True).generation == reply.generation


def test_consecutive_failures_open_without_a_rate(store: RedisStore) -> None:
    h = _handle(_breaker(store, failure_rate=None, consecutive_failures=3, min_calls=100))
    for failed in (True, True, False, True, True):
        assert _call(h, "record", failed=failed).state == CLOSED
    assert _call(h, "record", failed=True).state == OPEN


def _local_trip_index(breaker: CircuitBreaker, outcomes: list[tuple[bool, bool]]) -> int | None:
    for i, (failed, slow) in enumerate(outcomes):
        duration = 1.0 if slow else 0.0
        if failed:
            breaker.on_failure(duration)
        else:
            breaker.on_success(duration)
        if breaker.state != "closed":
            return i
    return None


def _shared_trip_index(handle: BreakerHandle, outcomes: list[tuple[bool, bool]]) -> int | None:
    for i, (failed, slow) in enumerate(outcomes):
        if _call(handle, "record", failed=failed, slow=slow).state != CLOSED:
            return i
    return None


CONFIGS: list[dict[str, Any]] = [
    {"failure_rate": 0.5, "min_calls": 5},
    {"failure_rate": 0.3, "min_calls": 8, "window_calls": 8},
    {"failure_rate": 0.5, "min_calls": 4, "window_calls": 6, "consecutive_failures": 3},
    {"failure_rate": None, "min_calls": 5, "slow_call_duration": 0.5, "slow_call_rate": 0.4},
    {
        "failure_rate": 0.9,
        "min_calls": 6,
        "window_calls": 10,
        "slow_call_duration": 0.5,
        "slow_call_rate": 0.5,
    },
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_the_shared_window_trips_where_the_local_one_does(
    store: RedisStore, config: dict[str, Any]
) -> None:
    """Same outcomes, same settings: the script opens on the same call as the local breaker."""
    rng = random.Random(repr(config))
    trips = 0
    for trial in range(6):
        p_fail, p_slow = rng.uniform(0.1, 0.6), rng.uniform(0.0, 0.6)
        outcomes = [(rng.random() < p_fail, rng.random() < p_slow) for _ in range(40)]
        local = rs.CircuitBreaker(name="l", window=60.0, clock=FakeClock(), **config)
        shared = _handle(_breaker(store, name=f"d{trial}", window=60.0, **config))
        expected = _local_trip_index(local, outcomes)
        assert _shared_trip_index(shared, outcomes) == expected, outcomes
        trips += expected is not None
    assert trips >= 2  # the sequences do reach the thresholds


def test_the_count_window_forgets_the_oldest_call(store: RedisStore) -> None:
    h = _handle(_breaker(store, failure_rate=0.5, min_calls=4, window_calls=4))
    for failed in (True, False, False, False):  # F S S S: 1 of 4
        assert _call(h, "record", failed=failed).state == CLOSED
    # the first F leaves the window: S S S F = 1 of 4, then S S F F = 2 of 4
    assert _call(h, "record", failed=True).state == CLOSED
    assert _call(h, "record", failed=True).state == OPEN


def test_the_time_window_forgets_old_buckets(store: RedisStore) -> None:
    # 10 buckets of 20 ms: failures older than the window no longer count
    h = _handle(_breaker(store, failure_rate=0.5, min_calls=3, window=0.2))
    _call(h, "record", failed=True)
    _call(h, "record", failed=True)
    time.sleep(0.25)
    assert _call(h, "record", failed=True).state == CLOSED  # 1 call in the window
    assert _call(h, "record", failed=True).state == CLOSED
    assert _call(h, "record", failed=True).state == OPEN


def _wait_open(reply: BreakerReply) -> None:
    time.sleep(max(0.0, reply.open_left) + 0.005)


def test_failed_probes_reopen_for_longer_up_to_max_open_for(store: RedisStore) -> None:
    h = _handle(
        _breaker(store, open_for=0.02, open_for_multiplier=2.0, max_open_for=0.05, min_calls=1)
    )
    reply = _call(h, "open")
    opened = [reply.opened_for]
    for n in range(3):
        _wait_open(reply)
        claim = f"c{n}"
        assert _call(h, "acquire", claim).granted
        reply = _call(h, "record", claim, failed=True)
        assert reply.state == OPEN
        opened.append(reply.opened_for)
    assert opened == pytest.approx([0.02, 0.04, 0.05, 0.05])
    _wait_open(reply)
    assert _call(h, "acquire", "ok").state == HALF_OPEN
    assert _call(h, "record", "ok").state == CLOSED
    # the streak is over: the next opening is short again
    assert _call(h, "open").opened_for == pytest.approx(0.02)


def test_a_slow_probe_reopens(store: RedisStore) -> None:
    h = _handle(_breaker(store, open_for=0.02, slow_call_duration=0.5, min_calls=1))
    _wait_open(_call(h, "open"))
    assert _call(h, "acquire", "p").granted
    assert _call(h, "record", "p", slow=True).state == OPEN


def test_half_open_grants_exactly_k_claims_and_closes_after_k_successes(store: RedisStore) -> None:
    h = _handle(_breaker(store, open_for=0.3, half_open_probes=2))  # (0.3 s: room for a stall)
    first = _call(h, "open")
    assert not _call(h, "acquire", "early").granted  # still open
    _wait_open(first)
    a, b, c = (_call(h, "acquire", claim) for claim in "abc")
    assert (a.granted, b.granted, c.granted) == (True, True, False)
    assert a.state == b.state == c.state == HALF_OPEN
    assert a.generation == c.generation == first.generation + 1
    _call(h, "release", "b")  # a cancelled probe gives its claim back
    assert _call(h, "acquire", "d").granted
    # outcomes of calls that hold no claim of this episode move nothing
    assert _call(h, "record", "", failed=True).state == HALF_OPEN
    assert _call(h, "record", "b", failed=True).state == HALF_OPEN
    assert _call(h, "record", "a").state == HALF_OPEN
    assert not _call(h, "acquire", "e").granted  # 1 success + 1 in flight = k
    closed = _call(h, "record", "d")
    assert closed.state == CLOSED
    assert closed.generation == first.generation + 2


def test_a_probe_claim_lapses_after_its_lease(redis_server: RedisServer, prefix: str) -> None:
    store = RedisStore(redis_server.url, prefix=prefix, probe_lease=0.5, socket_timeout=1.0)
    h = _handle(_breaker(store, open_for=0.02))
    _wait_open(_call(h, "open"))
    assert _call(h, "acquire", "dead").granted
    assert not _call(h, "acquire", "live").granted  # (0.5 s lease: room for a stall)
    time.sleep(0.6)
    assert _call(h, "acquire", "live").granted  # the dead process's claim lapsed
    assert _call(h, "record", "dead").state == HALF_OPEN  # its late outcome counts for nothing
    assert _call(h, "record", "live").state == CLOSED


def test_an_outcome_from_an_earlier_episode_moves_nothing(store: RedisStore) -> None:
    h = _handle(_breaker(store, open_for=0.02))
    _wait_open(_call(h, "open"))
    assert _call(h, "acquire", "old").granted
    reopened = _call(h, "record", "old", failed=True)
    _wait_open(reopened)
    assert _call(h, "acquire", "new").granted
    # "old" belonged to the previous half-open episode: its success is ignored
    assert _call(h, "record", "old").state == HALF_OPEN
    assert _call(h, "record", "new").state == CLOSED


def test_keys_are_namespaced_and_expire(redis_server: RedisServer, prefix: str) -> None:
    store = RedisStore(redis_server.url, prefix=prefix, key_ttl=120.0, socket_timeout=1.0)
    h = _handle(_breaker(store, name="orders", window_calls=5, min_calls=5))
    _call(h, "record", failed=True)
    budget = rs.RetryBudget(name="orders", store=store, clock=FakeClock())
    budget.deposit()
    assert budget.try_withdraw()
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = sorted(k.decode() for k in cast(list[bytes], client.keys(f"{prefix}*")))
        assert keys == [
            f"{prefix}cb:{{orders}}",
            f"{prefix}cb:{{orders}}:w",
            f"{prefix}rb:{{orders}}",
        ]
        for key in keys:
            assert 0 < client.pttl(key) <= 120_000
    finally:
        client.close()


def test_budget_script_counts_tokens_and_reserve(store: RedisStore) -> None:
    budget = rs.RetryBudget(name="b", ratio=0.5, min_per_second=0.1, ttl=10.0, store=store)
    assert budget._shared is not None
    handle = budget._shared

    def take(tokens: float, want: bool) -> tuple[bool, float]:
        reply = handle.take(tokens, want)
        assert reply is not None, "redis did not answer"
        return reply[0], round(reply[1], 9)

    assert take(0.0, False) == (False, 1.0)  # the reserve: 0.1/s x 10 s
    assert take(1.5, True) == (True, 1.5)  # 1.5 + 1 reserve - 1
    assert take(0.0, True) == (True, 0.5)
    assert take(0.0, True) == (False, 0.5)  # < 1 token: refused, nothing taken
    assert take(0.5, True) == (True, 0.0)


def test_budget_tokens_expire_after_ttl(store: RedisStore) -> None:
    budget = rs.RetryBudget(name="e", ratio=1.0, min_per_second=0.0001, ttl=0.2, store=store)
    assert budget._shared is not None
    reply = budget._shared.take(5.0, False)
    assert reply is not None and reply[1] == pytest.approx(5.0, abs=1e-3)
    time.sleep(0.25)
    reply = budget._shared.take(0.0, True)
    assert reply is not None
    granted, balance = reply
    assert not granted
    assert balance == pytest.approx(0.0, abs=1e-3)
