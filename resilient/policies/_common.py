"""Small pieces the policies share: exception matching, validation, the default clock."""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio

from resilient._clock import Clock, system_clock

__all__ = ["ExceptionMatcher", "check_positive", "compile_matcher", "resolve_clock"]

ExceptionMatcher = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
)


def compile_matcher(on: object, field: str) -> Callable[[BaseException], bool]:
    """Turn ``on=`` (a class, a tuple of classes, or a predicate) into a predicate.

    Only ``Exception`` subclasses ever match: cancellation, ``KeyboardInterrupt`` and
    ``SystemExit`` are ``BaseException`` and pass through every policy untouched.
    """
    if isinstance(on, type) and issubclass(on, BaseException):
        cls = on
        return lambda exc: isinstance(exc, cls) and isinstance(exc, Exception)
    if isinstance(on, tuple):
        if not on or not all(isinstance(c, type) and issubclass(c, BaseException) for c in on):
            raise ValueError(f"{field} must be exception classes, got {on!r}")
        classes = on
        return lambda exc: isinstance(exc, classes) and isinstance(exc, Exception)
    if callable(on) and not isinstance(on, type):  # a class that is no exception is a mistake
        predicate = on
        return lambda exc: isinstance(exc, Exception) and bool(predicate(exc))
    raise ValueError(
        f"{field} must be an exception class, a tuple of them or a predicate, got {on!r}"
    )


def check_positive(field: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ValueError naming ``field`` unless ``value`` is a finite number > 0 (or >= 0)."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field} must be a finite number {bound}, got {value!r}")


def check_count(field: str, value: int, *, minimum: int = 1) -> None:
    """Raise ValueError naming ``field`` unless ``value`` is an int >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")


def check_fraction(field: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ValueError naming ``field`` unless 0 < value <= 1 (or 0 <= value <= 1)."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (0 <= value <= 1 if allow_zero else 0 < value <= 1)
    )
    if not ok:
        low = "0 <=" if allow_zero else "0 <"
        raise ValueError(f"{field} must satisfy {low} {field} <= 1, got {value!r}")


def resolve_clock(clock: Clock | None) -> Clock:
    if clock is None:
        return system_clock
    if not isinstance(clock, Clock):
        raise ValueError(f"clock must have monotonic(), sleep() and sleep_async(), got {clock!r}")
    return clock


def discard(value: object) -> None:
    """Close a result that is being thrown away (an HTTP response, a file), as STYLE §5 asks."""
    close = getattr(value, "close", None)
    if callable(close):
        close()


async def discard_async(value: object) -> None:
    """`discard` for async code: ``aclose()`` if the result has one."""
    aclose = getattr(value, "aclose", None)
    if callable(aclose):
        await aclose()
        return
    discard(value)


async def discard_shielded(value: object) -> None:
    """`discard_async` run to its end even if the caller is being cancelled: for a result
    nobody will take because the call is failing or being cancelled."""
    with anyio.CancelScope(shield=True):
        await discard_async(value)
