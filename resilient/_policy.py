"""The plumbing every policy shares: decorator, ``call`` and ``call_async``.

A policy implements two methods over a zero-argument *thunk* that performs one attempt:
``_execute(thunk)`` for sync code and ``await _execute_async(thunk)`` for async code (the thunk
returns a fresh awaitable each time it is called, so a policy may call it more than once). Everything
else — decorating sync and async functions, composing in a `Pipeline` — is built on those two.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from typing_extensions import ParamSpec

__all__ = ["Policy"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class Policy:
    """Base class of every policy: a decorator for sync and async functions, plus ``call``.

    Example::

        retry = rs.Retry(on=OSError)

        @retry
        def fetch() -> bytes: ...

        @retry
        async def fetch_async() -> bytes: ...

        retry.call(fetch)
        await retry.call_async(fetch_async)
    """

    __slots__ = ()

    def _execute(self, thunk: Callable[[], T]) -> T:
        raise NotImplementedError

    async def _execute_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError

    def describe(self) -> str:
        """One line saying what this policy does (`Pipeline.describe` nests them)."""
        return repr(self)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn``: sync functions get the sync driver, ``async def`` the async one."""
        if not callable(fn):
            raise TypeError(f"{type(self).__name__} decorates a callable, got {fn!r}")
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise TypeError(
                f"{type(self).__name__} cannot wrap generator function {fn!r}: "
                "its body runs after the decorator has returned"
            )
        if inspect.iscoroutinefunction(fn):
            execute_async = self._execute_async
            afn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                if args or kwargs:
                    return await execute_async(functools.partial(afn, *args, **kwargs))
                return await execute_async(afn)

            return cast(Callable[P, R], async_wrapper)

        execute = self._execute

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if args or kwargs:
                return execute(functools.partial(fn, *args, **kwargs))
            return execute(fn)

        return wrapper

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call sync ``fn(*args, **kwargs)`` under this policy.

        Example::

            rs.Retry(on=OSError).call(socket.create_connection, ("db", 5432))
        """
        return self._execute(functools.partial(fn, *args, **kwargs) if args or kwargs else fn)

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await async ``fn(*args, **kwargs)`` under this policy (asyncio or trio).

        Example::

            await rs.Retry(on=OSError).call_async(client.get, "https://example.org")
        """
        return await self._execute_async(
            functools.partial(fn, *args, **kwargs) if args or kwargs else fn
        )
