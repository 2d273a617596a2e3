"""Composition: ``Pipeline(outermost, ..., innermost)``."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TypeVar

from resilient._policy import Policy

__all__ = ["Pipeline"]

T = TypeVar("T")


class Pipeline(Policy):
    """Policies applied in order, the first given being the outermost.

    ``Pipeline(a, b, c)`` behaves as ``a(b(c(fn)))``: here a fallback catches what is left after
    the retries, each retry passes through the breaker, and the breaker sees every attempt.

    Example::

        resilient_fetch = rs.Pipeline(
            rs.Fallback(value=None),
            rs.Bulkhead(max_concurrent=10),
            rs.Retry(on=ConnectionError),
            rs.CircuitBreaker(name="orders"),
        )

        @resilient_fetch
        def fetch(order_id: str) -> dict: ...

        print(resilient_fetch.describe())
    """

    __slots__ = ("_inner", "_outer", "policies")

    def __init__(self, *policies: Policy) -> None:
        if not policies:
            raise ValueError("policies must name at least one policy, got none")
        for i, policy in enumerate(policies):
            if not isinstance(policy, Policy):
                raise ValueError(f"policies[{i}] must be a resilient policy, got {policy!r}")
        self.policies: tuple[Policy, ...] = policies
        self._outer = policies[0]
        self._inner = tuple(reversed(policies[1:]))

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(repr(p) for p in self.policies)})"

    def describe(self) -> str:
        """The nesting, outermost first, one policy a line.

        Example::

            >>> print(rs.Pipeline(rs.Fallback(value=0), rs.Timeout(1.0)).describe())
            Pipeline
            └─ Fallback(value=0, on=<class 'Exception'>)
               └─ Timeout(1.0)
        """
        lines = ["Pipeline"]
        for depth, policy in enumerate(self.policies):
            text = policy.describe().replace("\n", "\n" + "   " * (depth + 1))
            lines.append("   " * depth + "└─ " + text)
        return "\n".join(lines)

    def _execute(self, thunk: Callable[[], T]) -> T:
        # Each inner policy becomes a zero-argument thunk for the one outside it: partial objects
        # are built in C, cheaper than closures or an extra Python frame per layer.
        for policy in self._inner:
            thunk = functools.partial(policy._execute, thunk)
        return self._outer._execute(thunk)

    async def _execute_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        for policy in self._inner:
            thunk = functools.partial(policy._execute_async, thunk)
        return await self._outer._execute_async(thunk)
