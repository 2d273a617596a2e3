"""One process of a test fleet: ``python fleet_worker.py '<json settings>'``.

For each phase in the settings: prints ``ready`` once set up, waits for a line on stdin (the start
barrier), runs the phase's scenario, prints one JSON line with what it counted. Scenarios:

- ``breaker``: call a refused loopback port through a breaker until the breaker refuses;
  ``attempts`` = calls that got past the breaker (each one a real connect attempt).
- ``probe``: ``tries`` concurrent-ish ``try_acquire`` on a breaker whose open time is over;
  ``granted`` = probe permits obtained.
- ``budget``: ``calls`` calls that each deposit and then want one retry; ``retries`` = granted.
- ``idle``: nothing (a local worker's turn while the shared ones probe).
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

import resilient as rs
from resilient.stores import RedisStore


def main() -> None:
    cfg: dict[str, Any] = json.loads(sys.argv[1])
    store = RedisStore(cfg["url"], prefix=cfg["prefix"], socket_timeout=2.0) if cfg["url"] else None
    for phase in cfg["phases"]:
        result = run(phase, store)
        if store is not None:
            result["store_errors"] = store.errors
        print(json.dumps(result), flush=True)


def run(phase: dict[str, Any], store: RedisStore | None) -> dict[str, Any]:
    """Set up, report ``ready``, wait for the start line, run the scenario, return its counts."""
    mode = phase["mode"]
    if mode in ("breaker", "probe"):
        breaker = rs.CircuitBreaker(store=store, **phase["breaker"])
        _ = breaker.state  # connect and cache the shared state before the start
        port = phase.get("port", 0)
        attempts = 0

        def call() -> None:
            nonlocal attempts
            attempts += 1
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()

        _ready()
        if mode == "probe":
            return {"granted": sum(breaker.try_acquire() for _ in range(phase["tries"]))}
        for _ in range(10_000):
            try:
                breaker.call(call)
            except rs.CircuitOpenError:
                break
            except OSError:
                pass
        return {"attempts": attempts, "state": breaker.state}
    if mode == "budget":
        budget = rs.RetryBudget(store=store, **phase["budget"])
        _ready()
        retries = 0
        for _ in range(phase["calls"]):
            budget.deposit()
            retries += budget.try_withdraw()
        return {"retries": retries}
    _ready()  # "idle": take part in the barrier only
    return {}


def _ready() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
