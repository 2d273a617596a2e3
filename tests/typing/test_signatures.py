"""Checked by mypy --strict (the decorators keep the wrapped signature); also run by pytest."""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine
from typing import Any

import anyio
from typing_extensions import assert_type

import resilient as rs

retry = rs.Retry(on=OSError)
pipeline = rs.Pipeline(rs.Fallback(value=0), rs.Retry(on=OSError), rs.CircuitBreaker())


@retry
def add(a: int, b: int = 2) -> int:
    return a + b


@pipeline
async def fetch(url: str, *, timeout: float = 1.0) -> bytes:
    return url.encode()


def test_sync_signature_survives() -> None:
    assert_type(add(1), int)
    assert add(1, b=3) == 4


def test_async_signature_survives() -> None:
    coro = fetch("x")
    assert_type(coro, Coroutine[Any, Any, bytes]).close()
    result = anyio.run(fetch, "abc")
    assert_type(result, bytes)
    assert result == b"abc"


def test_call_checks_arguments() -> None:
    value = retry.call(add, 1, b=5)
    assert_type(value, int)
    assert value == 6


async def _call_async_types() -> None:
    value = await retry.call_async(fetch, "u", timeout=2.0)
    assert_type(value, bytes)
    coro: Awaitable[bytes] = fetch("u")
    assert_type(await coro, bytes)


def test_call_async_types() -> None:
    anyio.run(_call_async_types)


def _wrong_calls_are_type_errors() -> None:  # never called: only mypy reads it
    # If a decorator lost the signature, these ignores would be unused and mypy --strict would fail.
    add("one")  # type: ignore[arg-type]
    add(1, c=2)  # type: ignore[call-arg]
    _ = fetch(1)  # type: ignore[arg-type]
    _ = retry.call(add, "x")  # type: ignore[arg-type]
