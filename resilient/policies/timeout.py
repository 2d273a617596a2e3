"""Timeout: bound how long a call may take.

Async calls are really cancelled when time is up, on asyncio and on trio, and `DeadlineExceeded`
(a ``TimeoutError``) is raised in their place. Sync calls cannot be interrupted safely in Python (a
thread cannot be killed, and abandoning it to a pool lets abandoned threads pile up without bound),
so a sync `Timeout` is a *deadline*: it is published to the code it runs (``rs.time_left()``), which
is how resilient's HTTP transport clips each attempt's socket timeouts and how an inner `Retry` knows
not to sleep past it; and a call that returns after its time raises `DeadlineExceeded`, its late
result discarded, so outer policies see the timeout it was.

On asyncio one ``TimerHandle`` per event loop serves all the calls of a `Timeout` at once (deadlines
in a heap, expired lazily): ``asyncio.timeout`` and anyio's cancel scopes each cost ~7 µs a call here,
which would be most of a whole pipeline's budget.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import sys
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, TypeVar

import anyio

from resilient._clock import Clock
from resilient._deadline import _DEADLINE, deadline_scope
from resilient._errors import DeadlineExceeded
from resilient._policy import Policy
from resilient.events import Hook, TimedOut, emit
from resilient.policies._common import check_positive, resolve_clock
from resilient.policies._common import discard as _discard

__all__ = ["Timeout"]

_log = logging.getLogger("resilient.timeout")

T = TypeVar("T")

_get_running_loop = asyncio.events._get_running_loop  # None outside asyncio (e.g. under trio)

if sys.version_info >= (3, 11):
    # The C methods themselves: no Python frame on the hot path.
    _cancelling = asyncio.Task.cancelling
    _uncancel = asyncio.Task.uncancel

else:  # pragma: no cover - Python 3.10 has no cancellation counts: every fired entry is ours

    def _cancelling(task: asyncio.Task[Any]) -> int:
        return 0

    def _uncancel(task: asyncio.Task[Any]) -> int:
        return 0


# A heap entry is a list [at, seq, callback, state]: lists compare in C (at, then the unique seq),
# several times cheaper than a Python class with __lt__.
_AT, _SEQ, _CALLBACK, _STATE = 0, 1, 2, 3
_LIVE, _DONE, _FIRED = 0, 1, 2
_NEVER = float("inf")
_Entry = list[Any]


class LoopTimer:
    """Many deadlines on one asyncio loop, served by a single pending loop callback.

    ``add(callback, at)`` returns an entry; ``finish(entry)`` withdraws it (O(1): it is only
    marked, and lets go of its callback). A `Timeout` cancels its task from here; the HTTP
    transport launches hedges.

    The timer holds its loop weakly and keeps no `asyncio.TimerHandle` (which holds the loop):
    timers are the values of a weak dictionary keyed by their loop, and a value that held its
    key would keep every loop ever used alive. A callback made needless by an earlier one is not
    cancelled; it finds ``at`` superseded and returns.
    """

    __slots__ = ("count", "handle_at", "heap", "live", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)
        self.heap: list[_Entry] = []
        self.handle_at = _NEVER  # when the pending loop callback is due (none: never)
        self.count = itertools.count()
        self.live = 0

    def add(self, callback: Callable[[], object], at: float) -> _Entry:
        entry = [at, next(self.count), callback, _LIVE]
        heap = self.heap
        heapq.heappush(heap, entry)
        self.live += 1
        if at < self.handle_at:
            loop = self.loop()
            assert loop is not None  # (an entry is added from a task on the loop)
            loop.call_at(at, self._fire, at)
            self.handle_at = at
        elif len(heap) > 64 and self.live * 2 < len(heap):
            # Finished entries wait in the heap until their time; compact when they dominate.
            self.heap = heap = [e for e in heap if e[_STATE] == _LIVE]
            heapq.heapify(heap)
        return entry

    def _fire(self, at: float) -> None:
        if at != self.handle_at:
            return  # superseded by an earlier callback
        self.handle_at = _NEVER
        loop = self.loop()
        assert loop is not None  # (this runs on the loop)
        now = loop.time()
        while heap := self.heap:  # (a callback's add() may compact it into a new list)
            entry = heap[0]
            if entry[_STATE] != _LIVE:
                heapq.heappop(heap)
                continue
            if entry[_AT] > now:
                if entry[_AT] < self.handle_at:  # (a callback's add() may have called sooner)
                    self.handle_at = entry[_AT]
                    loop.call_at(entry[_AT], self._fire, entry[_AT])
                return
            heapq.heappop(heap)
            entry[_STATE] = _FIRED
            self.live -= 1
            callback, entry[_CALLBACK] = entry[_CALLBACK], None
            try:
                callback()
            except Exception:  # one callback's bug must not stop the others' timers
                _log.exception("a timer callback raised")

    def finish(self, entry: _Entry) -> None:
        if entry[_STATE] == _LIVE:
            entry[_STATE] = _DONE
            entry[_CALLBACK] = None  # (a task's cancel holds the task, and the task its loop)
            self.live -= 1


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopTimer] = (
    weakref.WeakKeyDictionary()
)


#: The last (loop, timer) looked up, the loop weakly: nearly every call comes from the same loop,
#: and this skips the weak dictionary (~200 ns) on the hot path. One tuple, read and written in
#: one step: threads running loops of their own never see one loop paired with another's timer.
_last: tuple[Callable[[], asyncio.AbstractEventLoop | None], LoopTimer | None] = (
    lambda: None,
    None,
)


def loop_timer(loop: asyncio.AbstractEventLoop) -> LoopTimer:
    """The `LoopTimer` shared by everyone on ``loop`` (every `Timeout`, the HTTP hedges)."""
    global _last
    ref, timer = _last
    if timer is not None and ref() is loop:
        return timer
    found = _shared.get(loop)
    timer = found if found is not None else LoopTimer(loop)
    _shared[loop] = timer
    _last = (timer.loop, timer)
    return timer


@dataclass(frozen=True, slots=True, eq=False)
class Timeout(Policy):
    """Give a call ``seconds`` to finish (or less, if an enclosing deadline is sooner).

    Example::

        @rs.Timeout(0.5)
        async def fetch() -> bytes: ...   # cancelled after 0.5 s; raises DeadlineExceeded

        @rs.Timeout(0.5)
        def fetch_sync() -> bytes: ...    # a deadline for the I/O inside; late results raise
    """

    seconds: float
    _: KW_ONLY
    name: str = "timeout"
    clock: Clock | None = None
    hooks: Sequence[Hook] = ()
    _clock: Clock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_positive("seconds", self.seconds)
        object.__setattr__(self, "_clock", resolve_clock(self.clock))
        object.__setattr__(self, "hooks", tuple(self.hooks))

    def describe(self) -> str:
        return f"Timeout({self.seconds})"

    def _allowed(self) -> float:
        ambient = _DEADLINE.get()
        if ambient is None:
            return self.seconds
        clock, at = ambient
        return max(0.0, min(self.seconds, at - clock.monotonic()))

    def _expired(self, allowed: float) -> DeadlineExceeded:
        emit(self.hooks, TimedOut(self.name, allowed))
        return DeadlineExceeded(
            f"{self.name}: the call did not finish within {allowed:.3g} s", timeout=allowed
        )

    def _execute(self, thunk: Callable[[], T]) -> T:
        # deadline_scope() inlined: a generator-based context manager costs ~1 µs a call.
        clock = self._clock
        started = clock.monotonic()
        allowed = self._allowed()
        token = _DEADLINE.set((clock, started + allowed))
        try:
            result = thunk()
        finally:
            _DEADLINE.reset(token)
        if clock.monotonic() - started > allowed:
            _discard(result)
            raise self._expired(allowed)
        return result

    async def _execute_async(self, thunk: Callable[[], Awaitable[T]]) -> T:
        loop = _get_running_loop()
        if loop is None:
            return await self._execute_anyio(thunk)
        task = asyncio.current_task(loop)
        if task is None:  # pragma: no cover - a coroutine always runs in a task under asyncio
            return await self._execute_anyio(thunk)
        allowed = self.seconds if _DEADLINE.get() is None else self._allowed()
        timer = loop_timer(loop)
        cancelling = _cancelling(task)
        entry = timer.add(task.cancel, loop.time() + allowed)
        clock = self._clock
        token = _DEADLINE.set((clock, clock.monotonic() + allowed))
        try:
            result = await thunk()
        except asyncio.CancelledError:
            if entry[_STATE] == _FIRED and _uncancel(task) <= cancelling:
                raise self._expired(allowed) from None
            raise
        except BaseException:
            if entry[_STATE] == _FIRED:
                # The call turned our cancellation into another error, which stands (as with
                # `asyncio.timeout`); the task's count is kept balanced all the same.
                _uncancel(task)
            raise
        finally:
            _DEADLINE.reset(token)
            if entry[_STATE] == _LIVE:  # timer.finish(entry), inlined
                entry[_STATE] = _DONE
                entry[_CALLBACK] = None
                timer.live -= 1
        if entry[_STATE] == _FIRED:
            # The call swallowed our cancellation and returned: keep the task's count balanced.
            _uncancel(task)
        return result

    async def _execute_anyio(self, thunk: Callable[[], Awaitable[T]]) -> T:
        allowed = self._allowed()
        with deadline_scope(self._clock, allowed), anyio.move_on_after(allowed) as scope:
            return await thunk()
        if scope.cancelled_caught:
            raise self._expired(allowed)
        raise AssertionError("unreachable")  # pragma: no cover
