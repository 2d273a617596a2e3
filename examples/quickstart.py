"""The decorators on a flaky function: retry, breaker and fallback, sync and async.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel

import resilient as rs

rng = random.Random(7)
breaker = rs.CircuitBreaker(name="inventory", consecutive_failures=5)


@rs.Pipeline(
    rs.Fallback(value=-1, on=rs.ResilienceError),
    rs.Retry(on=ConnectionError, attempts=3, wait=0.01),
    breaker,
)
def stock(item: str) -> int:
    if rng.random() < 0.3:
        raise ConnectionError("inventory service unreachable")
    return len(item)


@rs.Pipeline(rs.Timeout(0.5), rs.Retry(on=ConnectionError, attempts=3, wait=0.01))
async def stock_async(item: str) -> int:
    await anyio.lowlevel.checkpoint()
    if rng.random() < 0.3:
        raise ConnectionError("inventory service unreachable")
    return len(item)


def main() -> None:
    print([stock(item) for item in ("apple", "kiwi", "banana")], breaker.state)
    print(anyio.run(stock_async, "cherry"))


if __name__ == "__main__":
    main()
