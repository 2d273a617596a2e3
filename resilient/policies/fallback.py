"""Fallback: answer with something degraded instead of failing."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from resilient._policy import Policy
from resilient.events import FallbackUsed, Hook, emit
from resilient.policies._common import ExceptionMatcher, compile_matcher

__all__ = ["Fallback"]

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Fallback(Policy):
    """When the call fails with an exception matching ``on``, return ``value`` or ``handler(exc)``.

    Give exactly one of ``value`` and ``handler``. For ``async def`` functions the handler may be
    async too. Cancellation is never replaced.

    Example::

        @rs.Fallback(value=[], on=rs.ResilienceError)
        def recommendations(user): ...

        @rs.Fallback(handler=lambda exc: cache.get("prices"))
        async def prices(): ...
    """

    value: Any = _MISSING
    handler: Callable[[BaseException], Any] | None = None
    on: ExceptionMatcher = Exception
    name: str = "fallback"
    hooks: Sequence[Hook] = ()
    _match: Callable[[BaseException], bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        has_value = self.value is not _MISSING
        if has_value == (self.handler is not None):
            raise ValueError(
                f"give exactly one of value= and handler=, got value={self.value!r}, "
                f"handler={self.handler!r}"
            )
        if self.handler is not None and not callable(self.handler):
            raise ValueError(f"handler must be callable, got {self.handler!r}")
        object.__setattr__(self, "_match", compile_matcher(self.on, "on"))
        object.__setattr__(self, "hooks", tuple(self.hooks))

    def describe(self) -> str:
        what = f"handler={self.handler!r}" if self.handler is not None else f"value={self.value!r}"
        return f"Fallback({what}, on={self.on!r})"

    def _replacement(self, exc: Exception) -> Any:
        emit(self.hooks, FallbackUsed(self.name, exc))
        if self.handler is None:
            return self.value
        return self.handler(exc)

    def _execute(self, thunk: Callable[[], T]) -> T:
        try:
            return thunk()
        except Exception as exc:
            if not self._match(exc):
                raise
            replacement = self._replacement(exc)
            if inspect.isawaitable(replacement):
                close = getattr(replacement, "close", None)
                if callable(close):
                    close()
                raise TypeError(
                    f"{self.name}: the handler returned an awaitable for a sync call; "
                    "use a sync handler"
                ) from exc
            return replacement  # type: ignore[no-any-return]

    async def _execute_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        try:
            return await thunk()
        except Exception as exc:
            if not self._match(exc):
                raise
            replacement = self._replacement(exc)
            if inspect.isawaitable(replacement):
                replacement = await replacement
            return replacement  # type: ignore[no-any-return]
