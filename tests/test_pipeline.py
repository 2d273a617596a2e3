from __future__ import annotations

from typing import Any

import anyio
import pytest

import resilient as rs
from resilient.testing import FakeClock


def test_first_policy_is_outermost() -> None:
    clock = FakeClock()
    calls = 0

    def down() -> str:
        nonlocal calls
        calls += 1
        raise OSError("down")

    breaker = rs.CircuitBreaker(consecutive_failures=5, clock=clock)
    pipeline = rs.Pipeline(
        rs.Fallback(value="fallback"),
        rs.Retry(on=OSError, attempts=3, wait=0, clock=clock),
        breaker,
    )
    # the breaker sees every attempt; the fallback sees only what the retries leave
    assert pipeline.call(down) == "fallback"
    assert calls == 3
    assert breaker.metrics()["consecutive_failures"] == 3
    assert pipeline.call(down) == "fallback"
    assert breaker.state == "open"
    assert calls == 5  # the sixth attempt was rejected by the open breaker


def test_retry_does_not_retry_rejections_unless_told() -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(clock=clock)
    breaker.open()
    calls = 0

    def fn() -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(rs.CircuitOpenError):
        rs.Pipeline(rs.Retry(on=OSError, clock=clock), breaker).call(fn)
    assert calls == 0
    assert clock.sleeps == []


def test_decorator_passes_arguments_and_keeps_metadata() -> None:
    pipeline = rs.Pipeline(rs.Fallback(value=-1), rs.Retry(on=OSError))

    @pipeline
    def divide(a: int, b: int = 1) -> float:
        """Divide."""
        return a / b

    assert divide(6, b=3) == 2
    assert divide.__name__ == "divide"
    assert divide(1, 0) == -1


@pytest.mark.anyio
async def test_async_pipeline_with_every_policy() -> None:
    clock = FakeClock()
    attempts = 0

    @rs.Pipeline(
        rs.Fallback(value="fallback"),
        rs.Bulkhead(max_concurrent=2),
        rs.Timeout(5.0),
        rs.Retry(on=OSError, attempts=3, wait=0.1, clock=clock),
        rs.CircuitBreaker(name="dep", clock=clock),
    )
    async def flaky(x: int) -> str:
        nonlocal attempts
        attempts += 1
        await anyio.lowlevel.checkpoint()
        if attempts < 3:
            raise OSError("down")
        return f"ok {x}"

    assert await flaky(7) == "ok 7"
    assert attempts == 3
    assert clock.sleeps == [0.1, 0.1]


def test_nested_pipelines() -> None:
    inner = rs.Pipeline(rs.Retry(on=OSError, wait=0), rs.CircuitBreaker())
    outer = rs.Pipeline(rs.Fallback(value=0), inner)
    assert outer.call(lambda: 5) == 5
    text = outer.describe()
    assert text.splitlines()[0] == "Pipeline"
    assert "Retry(" in text and "CircuitBreaker(" in text and "Fallback(" in text


def test_describe_shows_the_nesting() -> None:
    pipeline = rs.Pipeline(rs.Fallback(value=0), rs.Timeout(1.0))
    assert pipeline.describe() == (
        "Pipeline\n└─ Fallback(value=0, on=<class 'Exception'>)\n   └─ Timeout(1.0)"
    )


@pytest.mark.parametrize("bad", [(), ("not a policy",)])
def test_bad_pipelines(bad: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match="polic"):
        rs.Pipeline(*bad)


def test_generator_functions_are_refused() -> None:
    def gen() -> Any:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        rs.Retry(on=OSError)(gen)
