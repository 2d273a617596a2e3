from __future__ import annotations

from typing import Any

import anyio
import pytest

import resilient as rs
from resilient.events import Event, FallbackUsed


def down() -> str:
    raise OSError("down")


def test_value_replaces_a_matching_failure() -> None:
    seen: list[Event] = []
    fallback = rs.Fallback(value="cached", on=OSError, hooks=[seen.append])
    assert fallback.call(down) == "cached"
    assert [type(e) for e in seen] == [FallbackUsed]


def test_handler_gets_the_exception() -> None:
    fallback = rs.Fallback(handler=lambda exc: f"degraded: {exc}")
    assert fallback.call(down) == "degraded: down"


def test_non_matching_failures_pass_through() -> None:
    with pytest.raises(OSError):
        rs.Fallback(value=1, on=KeyError).call(down)


def test_success_is_untouched() -> None:
    assert rs.Fallback(value=1).call(lambda: 2) == 2


def test_keyboard_interrupt_is_not_replaced() -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rs.Fallback(value=1, on=BaseException).call(interrupted)


def test_async_handler_in_sync_call_is_an_error() -> None:
    async def handler(exc: BaseException) -> str:
        return "x"

    with pytest.raises(TypeError, match="sync handler"):
        rs.Fallback(handler=handler).call(down)


@pytest.mark.anyio
async def test_async_with_sync_and_async_handlers() -> None:
    async def adown() -> str:
        await anyio.lowlevel.checkpoint()
        raise OSError("down")

    async def handler(exc: BaseException) -> str:
        return "async fallback"

    assert await rs.Fallback(value="v").call_async(adown) == "v"
    assert await rs.Fallback(handler=handler).call_async(adown) == "async fallback"
    assert await rs.Fallback(handler=lambda e: "sync").call_async(adown) == "sync"


@pytest.mark.anyio
async def test_cancellation_is_not_replaced() -> None:
    with anyio.move_on_after(0.02) as scope:
        await rs.Fallback(value=1, on=lambda e: True).call_async(anyio.sleep_forever)
    assert scope.cancelled_caught


def test_none_is_a_valid_value() -> None:
    assert rs.Fallback(value=None).call(down) is None


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"value": 1, "handler": lambda e: 2}, {"handler": 3}, {"value": 1, "on": 5}],
)
def test_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"value=|handler|on"):
        rs.Fallback(**kwargs)
