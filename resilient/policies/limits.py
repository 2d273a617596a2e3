"""Adaptive concurrency limits: how many calls a `Bulkhead` lets run at once, learned from outcomes.

`AIMDLimit` is the loss-based limit of Netflix's concurrency-limits (TCP's congestion window
applied to calls): additive increase while the limit is in use and nothing is dropped,
multiplicative decrease on a drop::

    a drop (exception matched by ``on``, or slower than ``timeout``)
        limit = max(min_limit, floor(limit × backoff))
    otherwise, if in_flight × 2 >= limit (the limit is in use)
        limit = min(max_limit, limit + increase)
    otherwise
        limit unchanged

The limit is pure configuration and a pure function (`AIMDLimit.next_limit`); the current value
lives in the `Bulkhead` that uses it (``Bulkhead(max_concurrent=AIMDLimit(...))``), which samples it
once per finished call. See docs/decisions/0008-adaptive-protection.md.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from resilient.policies._common import (
    ExceptionMatcher,
    check_count,
    check_positive,
    compile_matcher,
)

__all__ = ["AIMDLimit"]

# ``asyncio.TimeoutError`` is the builtin from Python 3.11 on, a class of its own before.
if sys.version_info >= (3, 11):
    _TIMEOUTS: tuple[type[BaseException], ...] = (TimeoutError,)
else:  # pragma: no cover - Python 3.10
    _TIMEOUTS = (TimeoutError, asyncio.TimeoutError)

# ``limit × backoff`` in binary floating point can land a hair under an exact integer
# (90 × 0.7 = 62.999…); this nudge keeps ``floor`` on the integer the decimal arithmetic gives.
_NUDGE = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class AIMDLimit:
    """An additive-increase / multiplicative-decrease concurrency limit (Netflix ``AIMDLimit``).

    Give it to a `Bulkhead` as ``max_concurrent``: the bulkhead starts at ``initial`` permits and,
    after each call, moves its limit with `next_limit`. A call is a *drop* when it raised an
    exception matched by ``on`` (default: ``TimeoutError``, which includes `DeadlineExceeded`) or
    took longer than ``timeout`` seconds (when set); a drop multiplies the limit by ``backoff``
    (rounded down, never below ``min_limit``). A call that was not dropped raises the limit by
    ``increase`` (never above ``max_limit``) if at least half the limit was in flight when it
    finished (counting itself); a limit nobody uses does not grow. Other exceptions mean the
    dependency answered, so they count like successes; cancellation counts as nothing.

    Example::

        db = rs.Bulkhead(
            name="db",
            max_concurrent=rs.AIMDLimit(initial=20, min_limit=2, max_limit=100, timeout=1.0),
            max_queue=50,
        )

        limit = rs.AIMDLimit(initial=20)
        assert limit.next_limit(20, in_flight=12, dropped=True) == 18   # floor(20 × 0.9)
        assert limit.next_limit(18, in_flight=9) == 19                  # 9 × 2 >= 18: in use
        assert limit.next_limit(19, in_flight=3) == 19                  # idle: unchanged
    """

    initial: int = 20
    min_limit: int = 1
    max_limit: int = 200
    backoff: float = 0.9
    increase: int = 1
    timeout: float | None = None
    on: ExceptionMatcher = _TIMEOUTS
    _is_drop: Callable[[BaseException], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_count("min_limit", self.min_limit)
        check_count("max_limit", self.max_limit)
        if self.max_limit < self.min_limit:
            raise ValueError(
                f"max_limit must be >= min_limit ({self.min_limit!r}), got {self.max_limit!r}"
            )
        check_count("initial", self.initial)
        if not self.min_limit <= self.initial <= self.max_limit:
            raise ValueError(
                f"initial must be within [min_limit, max_limit] = "
                f"[{self.min_limit}, {self.max_limit}], got {self.initial!r}"
            )
        ok = (
            isinstance(self.backoff, (int, float))
            and not isinstance(self.backoff, bool)
            and 0 < self.backoff < 1
        )
        if not ok:
            raise ValueError(f"backoff must satisfy 0 < backoff < 1, got {self.backoff!r}")
        check_count("increase", self.increase)
        if self.timeout is not None:
            check_positive("timeout", self.timeout)
        object.__setattr__(self, "_is_drop", compile_matcher(self.on, "on"))

    def next_limit(
        self, limit: int, in_flight: int, *, dropped: bool = False, duration: float | None = None
    ) -> int:
        """The limit after one call finished: ``in_flight`` calls were running (counting it).

        ``dropped`` says the call was dropped (see `is_drop`); a ``duration`` longer than
        ``timeout`` is a drop too. Pure: the caller keeps the current limit.

        Example::

            limit = rs.AIMDLimit(initial=20, timeout=2.0)
            limit.next_limit(20, in_flight=1, duration=2.5)   # 18: slower than the timeout
            limit.next_limit(20, in_flight=10)                # 21: half the limit in use
        """
        if dropped or (
            self.timeout is not None and duration is not None and duration > self.timeout
        ):
            return max(self.min_limit, math.floor(limit * self.backoff + _NUDGE))
        if in_flight * 2 >= limit:
            return min(self.max_limit, limit + self.increase)
        return limit

    def is_drop(self, exc: BaseException) -> bool:
        """True when ``exc`` means the call was dropped (matched by ``on``; never cancellation).

        Example::

            rs.AIMDLimit().is_drop(TimeoutError())   # True
            rs.AIMDLimit().is_drop(KeyError("x"))    # False: the dependency answered
        """
        return self._is_drop(exc)
