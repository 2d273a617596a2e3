"""Four worker processes share one breaker and one budget through a real redis-server.

One fleet runs every scenario, phase after phase, each phase released by one barrier: four
workers with the shared store and, where the comparison says something, four with local state
beside them (starting processes is what costs time here).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

import resilient as rs
from resilient.stores import RedisStore
from tests.stores.conftest import RedisServer, free_port

WORKER = Path(__file__).with_name("fleet_worker.py")
WORKERS = 4

MIN_CALLS = 20
BREAKER: dict[str, Any] = {
    "name": "fleet",
    "failure_rate": 0.5,
    "min_calls": MIN_CALLS,
    "open_for": 30.0,
    "half_open_probes": 1,
}
K, PROBE_OPEN_FOR = 2, 0.5
PROBE: dict[str, Any] = {"name": "probes", "open_for": PROBE_OPEN_FOR, "half_open_probes": K}
RATIO, MIN_PER_SECOND, TTL, CALLS = 0.1, 1.0, 30.0, 60
BUDGET: dict[str, Any] = {
    "name": "fleet",
    "ratio": RATIO,
    "min_per_second": MIN_PER_SECOND,
    "ttl": TTL,
}

pytestmark = pytest.mark.slow


def run_fleet(
    configs: list[dict[str, Any]], before: dict[int, Callable[[], None]]
) -> list[list[dict[str, Any]]]:
    """One worker per config; per phase: all ready, ``before[phase]()``, release, collect."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for cfg in configs
    ]
    results: list[list[dict[str, Any]]] = [[] for _ in procs]
    try:
        for phase in range(len(configs[0]["phases"])):
            for proc in procs:
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "ready", "a worker failed"
            if phase in before:
                before[phase]()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc, got in zip(procs, results, strict=True):
                assert proc.stdout is not None
                got.append(json.loads(proc.stdout.readline()))
        for proc in procs:
            assert proc.wait(timeout=20) == 0
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


def refused_port() -> int:
    """A loopback port nobody listens on: every connect attempt is refused at once."""
    port = free_port()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0)
    return port


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer) -> dict[str, Any]:
    """Phases: 0 breaker against a dead backend, 1 half-open probes, 2 budget."""
    prefix = f"fleet:{time.monotonic_ns()}:"
    port = refused_port()
    breaker = {"mode": "breaker", "breaker": BREAKER, "port": port}
    budget = {"mode": "budget", "budget": BUDGET, "calls": CALLS}
    shared = {
        "url": redis_server.url,
        "prefix": prefix,
        "phases": [breaker, {"mode": "probe", "breaker": PROBE, "tries": 5}, budget],
    }
    local = {"url": None, "prefix": prefix, "phases": [breaker, {"mode": "idle"}, budget]}

    def open_probe_breaker() -> None:
        # Opened before the workers build theirs (phase 1's set-up follows phase 0's results).
        store = RedisStore(redis_server.url, prefix=prefix)
        rs.CircuitBreaker(store=store, **PROBE).open()
        store.close()

    opened: list[float] = []

    def before_breaker() -> None:
        open_probe_breaker()
        opened.append(time.monotonic())

    def after_open_for() -> None:
        time.sleep(max(0.0, opened[0] + PROBE_OPEN_FOR + 0.02 - time.monotonic()))

    results = run_fleet(
        [shared] * WORKERS + [local] * WORKERS, {0: before_breaker, 1: after_open_for}
    )
    client = redis.Redis.from_url(redis_server.url)
    try:
        stored = {
            "breaker_state": client.hget(f"{prefix}cb:{{fleet}}", "state"),
            "claims": client.zcard(f"{prefix}cb:{{probes}}:p"),
            "probe_state": client.hget(f"{prefix}cb:{{probes}}", "state"),
        }
    finally:
        client.close()
    return {"shared": results[:WORKERS], "local": results[WORKERS:], "redis": stored}


def test_a_shared_breaker_stops_the_fleet_after_min_calls(fleet: dict[str, Any]) -> None:
    shared = [worker[0] for worker in fleet["shared"]]
    local = [worker[0] for worker in fleet["local"]]
    assert all(r["state"] == "open" and r["store_errors"] == 0 for r in shared)
    shared_calls = sum(r["attempts"] for r in shared)
    local_calls = sum(r["attempts"] for r in local)
    print(f"calls reaching the dead backend: shared {shared_calls}, local {local_calls}")
    # Shared: exactly min_calls failures are counted fleet-wide; each other worker may have had
    # one call in flight when the breaker opened (a closed breaker admits from its cached state
    # and learns "open" from that call's reply), so at most WORKERS - 1 more reach the backend.
    assert MIN_CALLS <= shared_calls <= MIN_CALLS + (WORKERS - 1)
    # Local: every process needs its own min_calls failures.
    assert local_calls >= WORKERS * MIN_CALLS
    assert fleet["redis"]["breaker_state"] == b"1"


def test_half_open_admits_exactly_k_probes_across_the_fleet(fleet: dict[str, Any]) -> None:
    granted = [worker[1]["granted"] for worker in fleet["shared"]]
    assert sum(granted) == K, granted  # 4 processes x 5 tries at once
    assert fleet["redis"]["claims"] == K
    assert fleet["redis"]["probe_state"] == b"2"


def test_a_shared_budget_holds_the_fleet_within_its_ratio(fleet: dict[str, Any]) -> None:
    shared = sum(worker[2]["retries"] for worker in fleet["shared"])
    local = sum(worker[2]["retries"] for worker in fleet["local"])
    reserve = MIN_PER_SECOND * TTL
    bound = RATIO * CALLS * WORKERS + reserve
    print(f"retries: shared {shared}, local {local}, fleet bound {bound:g}")
    # +1: the tokens are sums of 0.1s in floating point, which may land a hair above a whole one
    assert shared <= bound + 1
    assert shared >= bound - WORKERS  # and the budget was really spent, not refused outright
    # Local budgets: each process gets the ratio of its own calls and its own reserve.
    assert local >= WORKERS * (RATIO * CALLS + reserve) - WORKERS
    assert local > bound + 1
    assert all(worker[2]["store_errors"] == 0 for worker in fleet["shared"])
