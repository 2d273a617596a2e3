"""`ResilientTransport`: one httpx transport, sync and async, with the standard pipeline per request.

::

    bulkhead → total deadline → retry (+ budget) → breaker → attempt timeout → inner transport

The retry loop here is HTTP's own, not `Retry`: it must know what was sent (body replay), read
``Retry-After``, close every response it discards, and return the last response (a 503 is an
answer) rather than raise. The decisions live in `_decide`; the sync and async drivers are twins.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import queue
import random as _random
import re
import ssl
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import httpx
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import _internal as _metrics_internal
from opentelemetry.trace import SpanKind, Status, StatusCode

from resilient import _later
from resilient._clock import Clock
from resilient._deadline import _DEADLINE
from resilient._errors import CircuitOpenError, NoHealthyEndpoints
from resilient.balancing._replica import LatencyWindow, Replica
from resilient.balancing._service import (
    ReplicaStatistics,
    Service,
    ServiceRuntime,
    default_replica_breaker,
)
from resilient.discovery._base import Discovery
from resilient.discovery.static import Static
from resilient.events import HedgeLaunched, Hook, RetryGaveUp, RetryScheduled, emit
from resilient.http._cache import StaleIfError
from resilient.http._classify import Classifier
from resilient.policies._common import check_count, check_positive, resolve_clock
from resilient.policies.breaker import CLOSED, REJECTED, CircuitBreaker
from resilient.policies.budget import RetryBudget
from resilient.policies.bulkhead import Bulkhead
from resilient.policies.retry import add_note, full_jitter
from resilient.policies.timeout import loop_timer
from resilient.telemetry import redact

__all__ = ["Hedging", "ResilientTransport"]

_get_running_loop = asyncio.events._get_running_loop  # None outside asyncio (e.g. under trio)


def _yield_gil() -> None:
    """A sync request refused without any I/O gives other threads the GIL once, as a request
    that did I/O would. Threads failing fast in a loop otherwise hold it for whole switch
    intervals (5 ms), and the other threads' requests wait behind them: in the bench's outage
    scenario (8 threads, every request refused by the service breaker) p99 went from 10-30 ms
    to 3-5 ms, p50 from 0.1 to 1 ms (the fair share). ``time.sleep(0)`` rather than
    ``os.sched_yield()``, which measured worse: it gives up the CPU but rarely the GIL."""
    time.sleep(0)


#: How long no read is cut after a cut found the retry budget empty (`_hedge_after_cut`).
_NO_CUT_FOR = 1.0

#: httpx's default keep-alive expiry: how long an idle connection of the hedges' pool lives.
_HEDGE_POOL_IDLE = 5.0

_DEFAULT: Any = type("_Default", (), {"__repr__": lambda self: "<default>"})()

#: Keys accepted in ``request.extensions["resilient"]``.
_OPTION_KEYS = frozenset({"attempts", "deadline", "hedge", "idempotent", "retry"})

_SENSITIVE_QUERY_WORDS = re.compile(
    r"token|key|secret|pass|pwd|sig|auth|credential|session|cookie|jwt", re.IGNORECASE
)


def _url_for_telemetry(url: httpx.URL) -> str:
    """``url.full`` per the OpenTelemetry HTTP conventions: userinfo and signatures redacted,
    and no fragment (never sent; OAuth's implicit flow puts tokens there)."""
    if url.fragment:
        url = url.copy_with(fragment=None)
    if url.userinfo:
        url = url.copy_with(username="REDACTED", password="REDACTED")
    if url.query:
        params = [
            (k, "REDACTED" if _SENSITIVE_QUERY_WORDS.search(k) else v)
            for k, v in url.params.multi_items()
        ]
        url = url.copy_with(params=params)
    return str(url)


if sys.version_info >= (3, 11):
    _cancelling = asyncio.Task.cancelling
    _uncancel = asyncio.Task.uncancel
else:  # pragma: no cover - Python 3.10 has no cancellation counts

    def _cancelling(task: asyncio.Task[Any]) -> int:
        return 0

    def _uncancel(task: asyncio.Task[Any]) -> int:
        return 0


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's CA bundle, SSL_CERT_FILE/DIR honoured), made once
    per process and shared by the default inner transports (an SSLContext is thread-safe).

    Also imports httpcore, which httpx imports only when its first transport is built: with trio
    installed that takes ~100 ms, which the first requests would otherwise wait for."""
    import httpcore  # noqa: F401

    return httpx.create_ssl_context()


class _TrackedBody(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A streamed request body that knows whether any part of it has gone out."""

    def __init__(self, inner: httpx.SyncByteStream | httpx.AsyncByteStream) -> None:
        self.inner = inner
        self.started = False

    def __iter__(self) -> Iterator[bytes]:
        assert isinstance(self.inner, httpx.SyncByteStream)
        for chunk in self.inner:
            self.started = True
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self.inner, httpx.AsyncByteStream)
        async for chunk in self.inner:
            self.started = True
            yield chunk

    def close(self) -> None:
        if isinstance(self.inner, httpx.SyncByteStream):
            self.inner.close()

    async def aclose(self) -> None:
        if isinstance(self.inner, httpx.AsyncByteStream):
            await self.inner.aclose()


_PROVIDER_KNOWN = hasattr(trace, "_TRACER_PROVIDER")
#: Likewise for metrics: with no meter provider installed, counting an attempt (a call into a
#: proxy instrument that does nothing) is skipped; the global is read per attempt, so a provider
#: installed later is seen.
_METER_KNOWN = hasattr(_metrics_internal, "_METER_PROVIDER")


def _tracing_installed() -> bool:
    """Has the application installed a tracer provider (an SDK)? Checked per attempt, cheaply:
    ``trace.get_tracer_provider()`` reads ``os.environ`` every time it is called."""
    provider = getattr(trace, "_TRACER_PROVIDER", _DEFAULT)
    if provider is _DEFAULT:  # the API's internals changed: ask it the public way
        return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return provider is not None


def _quantile(spec: str) -> float | None:
    """``"p95"`` -> 0.95; None if ``spec`` is not of that form."""
    match = re.fullmatch(r"p(\d{1,2}(?:\.\d+)?)", spec)
    if match is None:
        return None
    q = float(match.group(1)) / 100.0
    return q if 0.0 < q < 1.0 else None


class _ReleaseOnClose(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that gives its bulkhead permit back when it is closed (once), reporting
    the request's outcome: an adaptive limit (`AIMDLimit`) backs off on a 429 or 503 answer."""

    def __init__(
        self,
        inner: httpx.SyncByteStream | httpx.AsyncByteStream,
        bulkhead: Bulkhead,
        duration: float,
        dropped: bool,
    ) -> None:
        self._inner = inner
        self._bulkhead: Bulkhead | None = bulkhead
        self._duration = duration
        self._dropped = dropped

    def _release(self) -> None:
        bulkhead, self._bulkhead = self._bulkhead, None
        if bulkhead is not None:
            if self._dropped:
                bulkhead.on_failure(self._duration)
            else:
                bulkhead.on_success(self._duration)

    def __iter__(self) -> Iterator[bytes]:
        assert isinstance(self._inner, httpx.SyncByteStream)
        yield from self._inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self._inner, httpx.AsyncByteStream)
        async for chunk in self._inner:
            yield chunk

    def close(self) -> None:
        try:
            if isinstance(self._inner, httpx.SyncByteStream):
                self._inner.close()
        finally:
            self._release()

    async def aclose(self) -> None:
        try:
            if isinstance(self._inner, httpx.AsyncByteStream):
                await self._inner.aclose()
        finally:
            self._release()

    def __del__(self) -> None:
        # A response dropped without close() must not hold its permit forever.
        self._release()


class _ReadCut(dict[str, "float | None"]):
    """An attempt's httpx timeouts with the read cut for a hedge: due ``delay`` after the attempt
    began, as the delay was learned (from whole attempts), but never less than half the delay
    after the request was written.

    httpcore reads the read timeout (``timeouts.get("read")``) when it starts waiting for the
    answer: after a connection was taken from the pool and the request written, which on a busy
    client takes milliseconds (1.6 ms at the median in the tail benchmark, 4 ms at p90). A fixed
    value would hedge that much later than the delay; ``get`` answers the time left instead. The
    floor is for the replica: an abandoned attempt counts against it (it is the evidence against
    one that accepts and never answers), and a request that waited long for a pool connection or
    a handshake must not be given up, and blamed on the replica, a moment after it was sent.
    Other readers (``[...]``, ``dict(...)``) see the delay itself, the cut as it was before.

    Example::

        cut = _ReadCut.make({"read": 5.0}, 0.01, clock.monotonic, clock.monotonic())
        cut.get("read")  # 0.01 less the time since it was made, at least 0.005
        cut.restore(5.0)  # the headers came in time: the body gets the request's own
    """

    __slots__ = ("due", "now")

    due: float | None
    now: Callable[[], float]

    @staticmethod
    def make(
        own: dict[str, float | None] | None,
        delay: float,
        now: Callable[[], float],
        started: float,
    ) -> _ReadCut:
        """The cut of ``delay`` from ``started`` (``now``: the clock's monotonic) over the
        request's own timeouts ``own``. (Not ``__init__``: a dict subclass's is twice the cost,
        on most requests.)"""
        cut = _ReadCut(own) if own else _ReadCut()
        cut["read"] = delay
        cut.now = now
        cut.due = started + delay
        return cut

    def get(self, key: str, default: Any = None) -> Any:
        due = self.due
        if due is not None and key == "read":
            # (At least 1 ms even for a zero delay: a zero timeout makes the socket non-blocking,
            # an error rather than a timeout.)
            return max(due - self.now(), (dict.__getitem__(self, "read") or 0.0) * 0.5, 0.001)
        return dict.get(self, key, default)

    def restore(self, read: float | None) -> None:
        """The answer came in time: from now on the read timeout is ``read``."""
        self.due = None
        self["read"] = read


def _flag(options: Mapping[str, Any], name: str) -> bool:
    """A per-request switch of ``request.extensions["resilient"]``: a real bool ("false" is a
    string, and true)."""
    value = options[name]
    if not isinstance(value, bool):
        raise ValueError(
            f"request.extensions['resilient'][{name!r}] must be True or False, got {value!r}"
        )
    return value


def _uncut(request: httpx.Request, own: dict[str, float | None] | None) -> None:
    """Give a request that ends without a good answer (an error, a fallback's answer) the
    timeouts it was sent with, ``own``, if an attempt's read cut or clipped timeouts are on it:
    a fallback sees the request as sent, and the caller may send the same request object again.
    (A good answer keeps the attempt's: its body is read with them.)"""
    extensions = request.extensions
    if extensions.get("timeout") is not own:
        # Ours: an attempt's timeouts are only ever set on a copy of the extensions.
        if own is None:
            extensions.pop("timeout", None)
        else:
            extensions["timeout"] = own


#: How long a replica whose breaker refused its probe stays out of the choice (`_choose`).
_REFUSED_PROBE_WAIT = 0.1


class _Call:
    """One request's progress through its attempts."""

    __slots__ = (
        "attempt",
        "attempts",
        "body",
        "deadline_at",
        "delay",
        "first",
        "full_read",
        "hedge",
        "host",
        "idempotent",
        "last_duration",
        "logical",
        "logical_host",
        "logical_sni",
        "lost",
        "retry",
        "sent",
        "service",
        "shortened",
        "timeouts",
        "tried",
    )

    def __init__(self) -> None:
        self.attempt = 0
        self.sent = 0
        self.attempts = 1
        self.body: _TrackedBody | None = None
        self.deadline_at: float | None = None
        self.delay: float | None = None  # seconds before this request's first hedge; None: none
        self.idempotent = False
        self.hedge = True
        self.last_duration = 0.0
        self.service: ServiceRuntime | None = None
        self.logical: httpx.URL | None = None
        self.logical_host: str | None = None
        self.logical_sni: Any = None  # the caller's sni_hostname extension, if any
        self.tried: tuple[Replica, ...] = ()  # a tuple: no list to make for a direct host
        self.first: Replica | None = None  # already picked for the first attempt (short path)
        self.host: _Host | None = None
        self.timeouts: dict[str, float | None] | None = None
        self.shortened = False
        self.full_read: float | None = None
        self.retry = True
        self.lost = False  # a copy answered well: attempts cancelled from now on lost a race


#: One attempt in flight: its breaker and permit generation, span, latency window, replica (None
#: for a direct host) and start time. A tuple: it is made on every request, and a class instance
#: costs three times as much.
_Attempt = tuple[
    "CircuitBreaker | None", int, "trace.Span | None", LatencyWindow, "Replica | None", float
]


@dataclass(frozen=True, slots=True)
class _Instruments:
    attempts: metrics.Counter
    retries: metrics.Counter
    rejections: metrics.Counter
    budget_exhausted: metrics.Counter
    stale: metrics.Counter
    hedges: metrics.Counter


@dataclass(frozen=True, slots=True, kw_only=True)
class Hedging:
    """Hedged requests for idempotent requests: a second copy when the first is slow.

    After ``delay`` seconds without an answer (or, with ``delay="p95"``, after the 95th percentile
    of the service's or host's recent latencies, once ``min_samples`` are known; any ``"pNN"``
    works), another copy is sent; the first good answer wins and the others are cancelled and
    closed. When the percentile is more than ``tail_ratio`` times the median, the slow answers
    are a mode of their own and hedging starts earlier (see `learned_delay`; ``tail_ratio=None``
    keeps the plain percentile). Each hedge takes a token from the transport's retry budget, so
    hedging adds at most the budget's share of load.
    Requests with a streamed body, and requests that are not idempotent, are never hedged.

    On asyncio a hedge is a real race: the first copy keeps running and the first good answer
    wins (a request is watched, and the race set up only when its hedge falls due). Sync and
    trio clients cannot race cheaply, so by default their first attempt's read timeout is cut to
    the delay and, if it runs over, it is abandoned and a copy is sent at once (no cost when it
    does not run over). A sync client's copies to an origin hedged at least every 5 s go through
    a second connection pool (when the transport built its own), so that they do not queue
    behind the requests they were sent to overtake. ``threads=True`` races sync
    requests in pool threads (every hedgeable request then pays a thread hand-off, tens of µs);
    ``trio=True`` races trio requests in a task group (~100 µs a request).

    Example::

        rs.ResilientTransport(hedge=rs.http.Hedging(delay=0.05, max_hedges=2))
        rs.ResilientTransport(hedge=rs.http.Hedging(threads=True))   # for httpx.Client too
        rs.ResilientTransport(hedge=None)                            # no hedging
    """

    delay: float | str = "p95"
    max_hedges: int = 1
    min_delay: float = 0.002
    min_samples: int = 50
    tail_ratio: float | None = 3.0
    threads: bool = False
    trio: bool = False
    max_workers: int = 32
    _quantile: float | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if isinstance(self.delay, str):
            q = _quantile(self.delay)
            if q is None:
                raise ValueError(f"delay must be seconds or 'pNN' (e.g. 'p95'), got {self.delay!r}")
            object.__setattr__(self, "_quantile", q)
        else:
            check_positive("delay", self.delay)
        check_count("max_hedges", self.max_hedges)
        check_positive("min_delay", self.min_delay, allow_zero=True)
        check_count("min_samples", self.min_samples)
        if self.tail_ratio is not None:
            check_positive("tail_ratio", self.tail_ratio)
            if self.tail_ratio < 1:
                raise ValueError(f"tail_ratio must be >= 1, got {self.tail_ratio!r}")
        check_count("max_workers", self.max_workers, minimum=2)

    def learned_delay(self, window: LatencyWindow) -> float | None:
        """The hedge delay ``window``'s latencies call for (None until ``min_samples`` are known).

        The ``delay`` percentile, unless it is more than ``tail_ratio`` times the median: then
        the slow answers are a mode of their own (a stalled disk, a GC pause, a slow replica),
        and the percentile sits on its edge, where it swings with sampling noise and waits
        nearly as long as the slow answers themselves. The delay is then ``tail_ratio`` times
        the median, or the percentile that hedges twice as often (p90 for p95) if that is
        later, so that at most twice the planned share of requests is hedged.

        Example::

            window = rs.balancing.LatencyWindow()
            for _ in range(95):
                window.add(0.004)
            for _ in range(5):
                window.add(0.064)  # 5 % are 16x slower than the median
            rs.http.Hedging().learned_delay(window)  # 0.012: 3 x the median, not 0.064
        """
        q = self._quantile
        if q is None:
            assert not isinstance(self.delay, str)
            return float(self.delay)
        delay = window.quantile(q, self.min_samples)
        if delay is None:
            return None
        ratio = self.tail_ratio
        if ratio is not None:
            median = window.quantile(0.5, self.min_samples)
            assert median is not None
            if delay > ratio * median:
                # round(): 2 x 0.95 - 1 is 0.8999..., which would index one sample early.
                wider = window.quantile(max(0.5, round(2 * q - 1, 9)), self.min_samples)
                assert wider is not None
                delay = min(delay, max(wider, ratio * median))
        return max(self.min_delay, delay)


class _Host:
    """What the transport keeps per host: its breaker, its latencies, its telemetry attributes."""

    __slots__ = ("attributes", "breaker", "latency", "name", "watch", "watches")

    def __init__(
        self,
        name: str,
        breaker: CircuitBreaker | None,
        learn: Callable[[LatencyWindow], float | None] | None,
    ) -> None:
        self.name = name
        self.breaker = breaker
        self.latency = LatencyWindow(learn=learn)
        self.attributes: dict[str, str | int] = {"server.address": name.rpartition(":")[0]}
        self.watch: _HedgeWatch | None = None  # the one of the loop seen last
        self.watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _HedgeWatch] = (
            weakref.WeakKeyDictionary()
        )

    def watch_on(self, loop: asyncio.AbstractEventLoop) -> _HedgeWatch:
        """This host's hedge watch on ``loop``."""
        watch = self.watches.get(loop)
        if watch is None:
            watch = self.watches[loop] = _HedgeWatch(loop)
        self.watch = watch
        return watch


#: The largest retryable answer kept, in memory, for the case the breaker opens before its retry.
_KEEP_BYTES = 64 * 1024


def _small(response: httpx.Response) -> bool:
    """A retryable answer small enough to read and keep: its size known and at most
    ``_KEEP_BYTES`` (an answer of unknown length might never end)."""
    length = response.headers.get("Content-Length", "")
    return length.isdigit() and int(length) <= _KEEP_BYTES


def _kept(response: httpx.Response, raw: bytes) -> httpx.Response:
    """A retryable answer, read, as a fresh response the caller may get instead of a later
    rejection: open (the client reads and closes it as any answer; a bulkhead permit is held
    until then), with the body as it came (still encoded)."""
    extensions = {
        k: v for k, v in response.extensions.items() if k in ("http_version", "reason_phrase")
    }
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        extensions=extensions,
    )


def _clone(request: httpx.Request) -> httpx.Request:
    """A copy of a request for a hedge: its own headers and extensions, the same (bytes) body."""
    return httpx.Request(
        request.method,
        request.url,
        headers=request.headers.copy(),
        stream=request.stream,
        extensions=dict(request.extensions),
    )


class _AsyncioRace:
    """A hedged request on asyncio: the attempt runs in the caller's task, hedges from a timer.

    An anyio task group per request would cost ~30 µs on every hedgeable request; here a request
    that answers before ``delay`` costs one ``call_later`` and its cancellation. A winning hedge
    interrupts the caller's attempt with ``task.cancel()``, taken back with ``uncancel()`` as
    ``asyncio.timeout`` does, so an outer cancellation is never swallowed. Methods rather than
    closures, so a finished race leaves no reference cycle for the garbage collector.
    """

    __slots__ = (
        "call",
        "cancelling",
        "changed",
        "context",
        "delay",
        "done",
        "hedges",
        "host",
        "kept",
        "loop",
        "primary",
        "request",
        "task",
        "timer",
        "timers",
        "transport",
        "winner",
    )

    def __init__(
        self,
        transport: ResilientTransport,
        request: httpx.Request,
        call: _Call | None,
        delay: float,
        loop: asyncio.AbstractEventLoop,
        host: _Host | None = None,
        task: asyncio.Task[Any] | None = None,
        cancelling: int | None = None,
        context: contextvars.Context | None = None,
    ) -> None:
        """A race for the caller's task; with ``task``, one that a `_HedgeWatch` starts late,
        when its first hedge is due (``cancelling``: the task's count when it asked)."""
        scheduled = task is None
        if task is None:
            task = asyncio.current_task(loop)
            assert task is not None
        self.transport = transport
        self.request = request
        self.call = call  # None: made by `ResilientTransport._resumed` when a hedge needs it
        self.host = host  # (for that)
        self.delay = delay
        self.loop = loop
        self.task = task
        self.hedges: list[asyncio.Task[httpx.Response]] = []
        self.winner: httpx.Response | None = None
        # A hedge's answer that is no good (a 503): what the request gets if its own attempt
        # raised and no hedge does better, as in the sync and trio races.
        self.kept: httpx.Response | None = None
        self.primary = True
        self.done = False
        self.timers = timers = loop_timer(loop)
        # The caller's context, for its hedges: the shared timer's callback (and a watch's
        # sweep) runs in the context of whichever task scheduled it, and a hedge would take
        # another request's (its store round trips, its span, the caller's own variables).
        self.context = contextvars.copy_context() if scheduled else context
        # Our entry in the loop's shared timer: the next hedge is due after ``delay``.
        self.timer: list[Any] | None = (
            timers.add(self._launch, loop.time() + delay) if scheduled else None
        )
        self.cancelling = _cancelling(task) if cancelling is None else cancelling
        self.changed: asyncio.Event | None = None  # made when the caller waits for hedges

    def call_state(self) -> _Call:
        """The request's `_Call`, made now if the short path left it for later."""
        call = self.call
        if call is None:
            host = self.host
            assert host is not None
            call = self.call = self.transport._resumed(
                host, True, self.request.extensions.get("timeout"), self.delay, None, False
            )
        return call

    def _launch(self) -> None:
        self.timer = None
        if self.changed is not None:
            self.changed.set()
        if self.done or self.winner is not None:
            return
        number = len(self.hedges) + 1
        transport = self.transport
        if not transport._may_hedge(self.request, number, self.delay * number):
            return
        attempt = transport._attempt_async(_clone(self.request), self.call_state())
        context = self.context
        if context is None:
            hedge = self.loop.create_task(attempt)
        else:
            hedge = context.run(self.loop.create_task, attempt)
        hedge.add_done_callback(self._finished)
        self.hedges.append(hedge)
        assert transport.hedge is not None
        if number < transport.hedge.max_hedges:
            self.timer = self.timers.add(self._launch, self.loop.time() + self.delay)

    def _finished(self, hedge: asyncio.Task[httpx.Response]) -> None:
        if self.changed is not None:
            self.changed.set()
        if hedge.cancelled() or hedge.exception() is not None:
            return
        response = hedge.result()
        if self.done or self.winner is not None:
            self.loop.create_task(response.aclose())
            return
        if not self.transport._good(response):
            if self.kept is not None:
                self.loop.create_task(self.kept.aclose())
            self.kept = response
            return
        self.winner = response
        self.call_state().lost = True
        if self.primary:
            self.task.cancel()  # the caller's own attempt lost the race

    def _stop(self) -> None:
        """End the race: no more hedges, cancel those running, close a winner nobody took."""
        self.done = True
        if self.timer is not None:
            self.timers.finish(self.timer)
            self.timer = None
        for hedge in self.hedges:
            hedge.cancel()
        self.hedges = []
        if self.winner is not None:
            self.loop.create_task(self.winner.aclose())
            self.winner = None
        if self.kept is not None:
            self.loop.create_task(self.kept.aclose())
            self.kept = None

    def _take_winner(self) -> httpx.Response:
        winner, self.winner = self.winner, None
        assert winner is not None
        return winner

    async def _wait_for_hedges(self) -> bool:
        """The caller's attempt is over without a good answer: hedges in flight (and those still
        due on schedule) may give one. True if one did; False at once if none was launched."""
        if not self.hedges:
            return False
        changed = self.changed = asyncio.Event()  # set by _launch and _finished from now on
        while self.winner is None:
            if self.timer is None and all(hedge.done() for hedge in self.hedges):
                break
            changed.clear()
            await changed.wait()
        return self.winner is not None

    def quiet(self) -> bool:
        """After the caller's attempt answered: True, the race over, if no hedge went out (the
        common case, kept short)."""
        self.primary = False
        if self.hedges or self.winner is not None:
            return False
        self.done = True
        if self.timer is not None:
            self.timers.finish(self.timer)
            self.timer = None
        return True

    async def run(self) -> httpx.Response:
        call = self.call
        assert call is not None
        transport = self.transport
        try:
            response = await transport._attempt_async(self.request, call)
        except BaseException as exc:
            return await self.settle(exc)
        if self.quiet() and response.status_code not in transport.classifier.retry_statuses:
            return response
        return await self.settle(response)

    async def settle(self, outcome: httpx.Response | BaseException) -> httpx.Response:
        """The caller's attempt is over with ``outcome``: take a hedge's answer if it won (or,
        ``outcome`` being no good answer, once one does), else ``outcome``; then end the race."""
        self.primary = False
        try:
            if isinstance(outcome, httpx.Response):
                try:
                    better = not self.transport._good(outcome) and await self._wait_for_hedges()
                except BaseException:
                    # Cancelled while waiting for a hedge: nobody will take this answer.
                    self.loop.create_task(outcome.aclose())
                    raise
                if better:
                    await outcome.aclose()  # a retryable answer, and a hedge did better
                    return self._take_winner()
                if self.hedges:
                    self.call_state().lost = True  # the hedges still running lost
                return outcome
            if isinstance(outcome, asyncio.CancelledError):
                if self.winner is not None and _uncancel(self.task) <= self.cancelling:
                    return self._take_winner()  # a hedge won and cancelled the caller's attempt
            elif isinstance(outcome, Exception):
                if await self._wait_for_hedges():
                    return self._take_winner()
                if self.kept is not None:  # a hedge's answer beats the attempt's error
                    kept, self.kept = self.kept, None
                    return kept
            raise outcome
        finally:
            self._stop()


class _HedgeWatch:
    """The hedge deadlines of the short path's asyncio requests to one host on one loop.

    A request that may be hedged puts its task here and takes it back when its attempt is over;
    one pending loop callback wakes the watch at the earliest deadline, and only a request still
    running then gets a race (`_AsyncioRace`), made at that moment with its first hedge. Most
    requests answer first and cost a dict insert and pop, where a race of their own would cost
    an object and a timer entry each (~6 µs of a client's request). Entries come in deadline order (one
    host, one delay) unless the learned delay shrank; then the watch scans them all.
    """

    __slots__ = ("handle_at", "last_at", "loop", "ordered", "pending", "raced")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly, and no TimerHandle kept, as in `LoopTimer`: a host keeps its watches in a weak
        # dictionary by loop, and a watch that held its loop would keep it alive for good.
        self.loop = weakref.ref(loop)
        #: task -> (deadline, transport, request, host, delay, the task's cancellation count,
        #: its context: its hedges run in it, not in the context of whichever request's call
        #: scheduled the sweep)
        self.pending: dict[
            asyncio.Task[Any],
            tuple[float, ResilientTransport, httpx.Request, _Host, float, int, contextvars.Context],
        ] = {}
        self.raced: dict[asyncio.Task[Any], _AsyncioRace] = {}
        self.handle_at = float("inf")  # when the pending loop callback is due (none: never)
        self.last_at = 0.0
        self.ordered = True

    def add(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: ResilientTransport,
        request: httpx.Request,
        host: _Host,
        delay: float,
    ) -> asyncio.Task[Any]:
        """Watch the caller's task on ``loop`` (this watch's): its first hedge is due in
        ``delay`` seconds."""
        task = asyncio.current_task(loop)
        assert task is not None
        at = loop.time() + delay
        self.pending[task] = (
            at,
            transport,
            request,
            host,
            delay,
            _cancelling(task),
            contextvars.copy_context(),
        )
        if at < self.last_at:
            self.ordered = False
        self.last_at = at
        if at < self.handle_at:
            loop.call_at(at, self._sweep, at)
            self.handle_at = at
        return task

    def take(self, task: asyncio.Task[Any]) -> _AsyncioRace | None:
        """The caller's attempt is over: the race the watch started for it, if it did."""
        if self.pending.pop(task, None) is not None:
            return None
        return self.raced.pop(task, None)  # (None if making its race failed)

    def _sweep(self, at: float) -> None:
        if at != self.handle_at:
            return  # superseded by an earlier callback
        self.handle_at = float("inf")
        pending = self.pending
        loop = self.loop()
        assert loop is not None  # (this runs on the loop)
        now = loop.time()
        due: list[asyncio.Task[Any]] = []
        later = float("inf")
        for task, entry in pending.items():
            if entry[0] <= now:
                due.append(task)
            else:
                later = min(later, entry[0])
                if self.ordered:
                    break
        if len(due) == len(pending):
            self.ordered = True  # empty from here: in order again
        if later != float("inf"):
            loop.call_at(later, self._sweep, later)
            self.handle_at = later
        for task in due:
            _, transport, request, host, delay, cancelling, context = pending.pop(task)
            race = _AsyncioRace(
                transport, request, None, delay, loop, host, task, cancelling, context
            )
            self.raced[task] = race
            race._launch()


class ResilientTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """An httpx transport that retries safely, within deadlines and budgets, behind breakers.

    One class serves ``httpx.Client`` and ``httpx.AsyncClient``. Defaults: 3 attempts in all,
    full-jitter backoff from 100 ms, a `RetryBudget` (20 % + 10/s), one `CircuitBreaker` per
    host, connect errors retried for every method, read errors, timeouts and 429/502/503/504
    retried for idempotent requests only, ``Retry-After`` honoured (capped at 30 s), and no total
    deadline unless ``deadline=`` is given.

    Per-request overrides go in ``request.extensions["resilient"]``: ``attempts``, ``deadline``
    (seconds), ``idempotent`` (True/False), ``retry`` (False turns retries off), ``hedge``
    (False: never hedge this request).

    The final response carries ``response.extensions["resilient"]``: ``{"attempts": n,
    "stale": bool}``.

    Example::

        transport = rs.ResilientTransport(deadline=5.0)
        with httpx.Client(transport=transport, timeout=1.0) as client:
            client.get("http://127.0.0.1:8001/items")
            client.post("http://127.0.0.1:8001/orders", json=order,
                        headers={"Idempotency-Key": order_id})   # retried: it carries a key
            client.get("http://127.0.0.1:8001/slow",
                       extensions={"resilient": {"attempts": 1}})

        async with httpx.AsyncClient(transport=rs.ResilientTransport()) as client:
            await client.get("http://127.0.0.1:8001/items")
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        *,
        services: Mapping[str, Discovery | Service | Sequence[str]] | None = None,
        attempts: int = 3,
        deadline: float | None = None,
        attempt_timeout: float | None = None,
        wait: float | None = None,
        budget: RetryBudget | None = _DEFAULT,
        breaker: CircuitBreaker | Callable[[str], CircuitBreaker] | None = _DEFAULT,
        bulkhead: Bulkhead | None = None,
        hedge: Hedging | None = _DEFAULT,
        classifier: Classifier | None = None,
        fallback: StaleIfError
        | Callable[[httpx.Request, BaseException | httpx.Response], httpx.Response | None]
        | None = None,
        deadline_header: str | None = None,
        clock: Clock | None = None,
        random: Callable[[], float] | None = None,
        hooks: Sequence[Hook] = (),
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        check_count("attempts", attempts)
        if deadline is not None:
            check_positive("deadline", deadline)
        if attempt_timeout is not None:
            check_positive("attempt_timeout", attempt_timeout)
        if wait is not None:
            check_positive("wait", wait, allow_zero=True)
        if transport is not None and not isinstance(
            transport, (httpx.BaseTransport, httpx.AsyncBaseTransport)
        ):
            raise ValueError(f"transport must be an httpx transport, got {transport!r}")
        if budget is not None and budget is not _DEFAULT and not isinstance(budget, RetryBudget):
            raise ValueError(f"budget must be a RetryBudget or None, got {budget!r}")
        if hedge is not None and hedge is not _DEFAULT and not isinstance(hedge, Hedging):
            raise ValueError(f"hedge must be a Hedging or None, got {hedge!r}")
        if bulkhead is not None and not isinstance(bulkhead, Bulkhead):
            raise ValueError(f"bulkhead must be a Bulkhead or None, got {bulkhead!r}")
        if breaker is not None and breaker is not _DEFAULT and not callable(breaker):
            raise ValueError(
                f"breaker must be a CircuitBreaker, a factory or None, got {breaker!r}"
            )
        if fallback is not None and not (isinstance(fallback, StaleIfError) or callable(fallback)):
            raise ValueError(f"fallback must be a StaleIfError or a callable, got {fallback!r}")
        self._clock = resolve_clock(clock)
        self._inner = transport
        # The default inner transport is built at the first request (only then is it known to be
        # sync or async), but its TLS context, the slow part (~20-30 ms loading the CA bundle), is
        # ready now (with the imports it needs), as with httpx.Client(): otherwise the first
        # requests would wait for them.
        self._ssl: ssl.SSLContext | None = _default_ssl_context() if transport is None else None
        self._sync_inner: httpx.BaseTransport | None = None
        self._sync_hedge_inner: httpx.BaseTransport | None = None  # see `_sync_hedge_transport`
        self._hedged_at: dict[tuple[bytes, int | None], float] = {}  # origin: its last hedge
        self._closed = False
        self._no_cut_until = 0.0  # see `_hedge_after_cut`
        self._async_inner: httpx.AsyncBaseTransport | None = None
        self.attempts = attempts
        self.deadline = deadline
        self.attempt_timeout = attempt_timeout
        self.wait = wait
        self.budget: RetryBudget | None = (
            RetryBudget(clock=self._clock) if budget is _DEFAULT else budget
        )
        self.bulkhead = bulkhead
        self.hedge: Hedging | None = Hedging() if hedge is _DEFAULT else hedge
        # Latency windows keep the hedge delay they call for up to date (every 128 samples).
        self._learn = (
            self.hedge.learned_delay
            if self.hedge is not None and self.hedge._quantile is not None
            else None
        )
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_busy = 0
        self._pool_lock = threading.Lock()
        self.classifier = classifier or Classifier()
        self.fallback = fallback
        self.deadline_header = deadline_header
        self.hooks = tuple(hooks)
        self._rand = random or _random.random
        self._hosts: dict[tuple[bytes, int | None], _Host] = {}
        self._services: dict[str, ServiceRuntime] = {}
        for name, spec in (services or {}).items():
            self._services[name.lower()] = self._service_runtime(name, spec)
        self._shared_breaker: CircuitBreaker | None = None
        self._breaker_factory: Callable[[str], CircuitBreaker] | None = None
        if breaker is _DEFAULT:
            self._breaker_factory = self._default_breaker
        elif isinstance(breaker, CircuitBreaker):
            self._shared_breaker = breaker
        elif breaker is not None:
            self._breaker_factory = breaker
        # With no provider given and none installed yet, spans are skipped until one is installed:
        # starting a no-op span costs ~1.5 µs a request for nothing.
        self._tracer_given = tracer_provider is not None
        self._meter_given = meter_provider is not None or not _METER_KNOWN
        # The short path for the common request (see `handle_request`) leaves these out: it is taken
        # when none of them is configured. (The configuration is read once, here.)
        self._direct_ok = (
            bulkhead is None
            and deadline is None
            and attempt_timeout is None
            and not self._tracer_given
            and not self._meter_given
            and not isinstance(fallback, StaleIfError)
        )
        # Statuses below this one are good answers (neither retried nor failures), known without a
        # call; 0 when the classifier's own is_failure must judge every one.
        self._good_below = (
            min(min(self.classifier.retry_statuses, default=600), 429)
            if type(self.classifier).is_failure is Classifier.is_failure
            else 0
        )
        self._direct_sync_ok = self._direct_ok and not (
            self.hedge is not None and self.hedge.threads
        )
        # (A budget with a store would flush its deposits from the short path, blocking the loop:
        # `_handle_async` defers that round trip.)
        self._direct_async_ok = (
            self._direct_ok
            and not (self.hedge is not None and self.hedge.trio)
            and (self.budget is None or self.budget._shared is None)
        )
        self._fixed_delay: float | None = (
            float(self.hedge.delay)
            if self.hedge is not None and not isinstance(self.hedge.delay, str)
            else None
        )
        self._tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("resilient")
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("resilient")
        self._instruments = _Instruments(
            attempts=meter.create_counter("resilient.http.attempts", unit="{attempt}"),
            retries=meter.create_counter("resilient.http.retries", unit="{retry}"),
            rejections=meter.create_counter("resilient.http.rejections", unit="{request}"),
            budget_exhausted=meter.create_counter(
                "resilient.http.retry_budget.exhausted", unit="{retry}"
            ),
            stale=meter.create_counter("resilient.http.stale_responses", unit="{response}"),
            hedges=meter.create_counter("resilient.http.hedges", unit="{hedge}"),
        )
        # Discovery starts last, once every argument is known to be good: a source started
        # before a bad one raised would run on (a DNS thread, a ZooKeeper session) with nothing
        # left to close it.
        started: list[ServiceRuntime] = []
        try:
            for runtime in self._services.values():
                started.append(runtime)  # (before: a start() interrupted half-way is closed too)
                runtime.service.discovery.start()
        except BaseException:
            for runtime in started:
                runtime.close()
            raise

    # -- configuration ------------------------------------------------------------------------------

    def _service_runtime(
        self, name: str, spec: Discovery | Service | Sequence[str]
    ) -> ServiceRuntime:
        if not isinstance(name, str) or not name or ("." in name and name.endswith(".")):
            raise ValueError(f"services keys must be host names, got {name!r}")
        if isinstance(spec, Service):
            service = spec
        elif isinstance(spec, Discovery):
            service = Service(discovery=spec)
        elif isinstance(spec, Sequence) and not isinstance(spec, str):
            service = Service(discovery=Static(spec))
        else:
            raise ValueError(
                f"services[{name!r}] must be a discovery source, a Service or a list of URLs, "
                f"got {redact(repr(spec))}"
            )
        return ServiceRuntime(
            name,
            service,
            clock=self._clock,
            hooks=self.hooks,
            default_breaker=default_replica_breaker,
            learn=self._learn,
        )

    def statistics(self) -> dict[str, list[ReplicaStatistics]]:
        """Per logical service, each replica's state, in-flight requests, latency and outcomes.

        Example::

            for replica in transport.statistics()["orders"]:
                print(replica.url, replica.state, replica.in_flight, replica.ewma_ms)
        """
        return {name: runtime.statistics() for name, runtime in self._services.items()}

    def _default_breaker(self, host: str) -> CircuitBreaker:
        return CircuitBreaker(name=f"http:{host}", clock=self._clock, hooks=self.hooks)

    def _host(self, url: httpx.URL) -> _Host:
        key = (url.raw_host, url.port)
        host = self._hosts.get(key)
        if host is None:
            name = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
            breaker = self._shared_breaker
            if breaker is None and self._breaker_factory is not None:
                breaker = self._breaker_factory(name)
            host = self._hosts.setdefault(key, _Host(name, breaker, self._learn))
        return host

    def breaker_for(self, url: httpx.URL) -> CircuitBreaker | None:
        """The breaker that guards requests to ``url``'s host (None when breakers are off).

        Example::

            transport.breaker_for(httpx.URL("http://127.0.0.1:8001/")).state  # "closed"
        """
        return self._host(url).breaker

    def _latency(self, request: httpx.Request, call: _Call) -> LatencyWindow:
        """Latencies that predict this request's: its service's, or its host's."""
        if call.service is not None:
            return call.service.latency
        if call.host is None:
            call.host = self._host(request.url)
        return call.host.latency

    def _may_hedge(self, request: httpx.Request, number: int, after: float) -> bool:
        """Take a budget token for hedge ``number`` and report it; False if there is none."""
        if not self._budget_token(request):
            return False
        self._hedge_launched(request, number, after)
        return True

    def _budget_token(self, request: httpx.Request) -> bool:
        """A retry budget token for a retry or hedge of ``request``; False (counted) if none."""
        if self.budget is not None and not self.budget.try_withdraw():
            return self._budget_exhausted(request)
        return True

    async def _budget_token_async(self, request: httpx.Request) -> bool:
        """`_budget_token` without blocking the event loop on a store's round trip."""
        if self.budget is not None and not await self.budget.try_withdraw_async():
            return self._budget_exhausted(request)
        return True

    def _budget_exhausted(self, request: httpx.Request) -> bool:
        """Count a token the budget refused ``request``; False, for `_budget_token`."""
        self._instruments.budget_exhausted.add(1, self._host(request.url).attributes)
        return False

    def _hedge_launched(self, request: httpx.Request, number: int, after: float) -> None:
        """Count hedge ``number`` of ``request``, sent ``after`` seconds in, and announce it."""
        self._instruments.hedges.add(1, self._host(request.url).attributes)
        emit(self.hooks, HedgeLaunched("http", number, after))

    def _good(self, response: httpx.Response) -> bool:
        return response.status_code not in self.classifier.retry_statuses

    def _begin(self, request: httpx.Request) -> _Call:
        call = _Call()
        call.attempts = self.attempts
        deadline = self.deadline
        options = request.extensions.get("resilient")
        idempotent: bool | None = None
        if options:
            unknown = set(options) - _OPTION_KEYS
            if unknown:
                raise ValueError(
                    f"request.extensions['resilient'] has unknown keys {sorted(unknown)!r}; "
                    f"known: {sorted(_OPTION_KEYS)!r}"
                )
            if "attempts" in options:
                check_count("request.extensions['resilient']['attempts']", options["attempts"])
                call.attempts = options["attempts"]
            if "deadline" in options:
                deadline = options["deadline"]
                if deadline is not None:
                    check_positive("request.extensions['resilient']['deadline']", deadline)
            if "idempotent" in options:
                idempotent = _flag(options, "idempotent")
            if "retry" in options:
                call.retry = _flag(options, "retry")
            if "hedge" in options:
                call.hedge = _flag(options, "hedge")
        call.idempotent = (
            self.classifier.is_idempotent(request) if idempotent is None else idempotent
        )
        # (Hedged only if idempotent by its method, or marked so: see `Classifier.may_hedge`.)
        hedgeable = self.classifier.may_hedge(request) if idempotent is None else idempotent
        now = self._clock.monotonic()
        if deadline is not None:
            call.deadline_at = now + deadline
        ambient = _DEADLINE.get()
        if ambient is not None:
            clock, at = ambient
            ambient_at = now + (at - clock.monotonic())
            if call.deadline_at is None or ambient_at < call.deadline_at:
                call.deadline_at = ambient_at
        call.timeouts = request.extensions.get("timeout")
        if not isinstance(request.stream, httpx.ByteStream):
            call.body = _TrackedBody(request.stream)
            request.stream = call.body
        window: LatencyWindow | None = None
        if self._services:
            url = request.url
            service = self._services.get(url.host) if url.port is None else None
            if service is not None:
                call.service = service
                call.logical = url
                call.logical_host = request.headers.get("Host")
                call.logical_sni = request.extensions.get("sni_hostname")
                window = service.latency
        if window is None:
            call.host = host = self._host(request.url)
            window = host.latency
        hedge = self.hedge
        if hedge is not None and call.hedge and hedgeable and call.body is None:
            # (A streamed body cannot be sent twice.)
            call.delay = window.learned if self._learn is not None else self._fixed_delay
        if self.budget is not None:
            self.budget.deposit()
        return call

    def _prepare(
        self, request: httpx.Request, call: _Call, read_limit: float | None = None
    ) -> None:
        """Set this attempt's httpx timeouts when there is a deadline or an attempt timeout: the
        request's own, clipped to the time left and the attempt timeout, and with the read
        timeout cut to ``read_limit`` for a speculative attempt. Each attempt starts again from
        the request's own timeouts."""
        call.sent += 1
        limit = self.attempt_timeout
        now = self._clock.monotonic()
        left: float | None = None
        if call.deadline_at is not None:
            left = call.deadline_at - now
            limit = left if limit is None else min(limit, left)
            if self.deadline_header:
                request.headers[self.deadline_header] = f"{max(left, 0.0):.3f}"
        call.shortened = False
        assert limit is not None  # without one, _start_attempt sets the timeouts itself
        base = call.timeouts or {}
        timeouts: dict[str, float | None] = {}
        for key in ("connect", "read", "write", "pool"):
            value = base.get(key)
            timeouts[key] = max(limit, 0.001) if value is None else min(value, max(limit, 0.001))
        if read_limit is not None:
            read = timeouts["read"]
            # A cut pays only if a copy sent then has the delay to answer in before the
            # deadline: else the attempt is given up to a copy with less time than it had.
            if (
                (read is None or read_limit < read)
                and now >= self._no_cut_until  # (see `_hedge_after_cut`)
                and (left is None or left >= 2 * read_limit)
            ):
                call.full_read = read
                call.shortened = True
                timeouts = _ReadCut.make(timeouts, read_limit, self._clock.monotonic, now)
        request.extensions = {**request.extensions, "timeout": timeouts}

    # -- decisions -----------------------------------------------------------------------------------

    def _decide(
        self,
        request: httpx.Request,
        call: _Call,
        exc: BaseException | None = None,
        response: httpx.Response | None = None,
        withdraw: bool = True,
    ) -> float | str:
        """After an attempt: seconds to wait before the next one, or why there is none.
        ``withdraw=False`` leaves the budget's token to the caller (`_decide_async`)."""
        if exc is not None:
            kind = self.classifier.exception_kind(exc)
            if kind == "not_retryable":
                return "not_retryable"
            if kind == "maybe_processed" and not call.idempotent:
                return "not_idempotent"
            if call.body is not None and call.body.started:
                return "body_sent"
        else:
            assert response is not None
            if response.status_code not in self.classifier.retry_statuses:
                return "done"
            if not call.idempotent:
                return "not_idempotent"
            if call.body is not None and call.body.started:
                return "body_sent"
        if not call.retry:
            return "retry_off"
        if call.service is None:  # a service's retry goes to another replica instead
            breaker = self._host(request.url).breaker
            if breaker is not None and breaker.state == "open":
                return "breaker_open"
        if call.attempt >= call.attempts:
            return "attempts"
        delay: float | None = None
        if response is not None:
            delay = self.classifier.retry_after(response, datetime.now(timezone.utc))
        elif (
            exc is not None
            and call.service is not None
            and len(call.tried) < len(call.service.replicas)
            and self.classifier.exception_kind(exc) == "not_sent"
        ):
            # The replica could not be reached and the next attempt goes to another one: there
            # is nothing to wait for (the backoff protects a server, and this one never saw us).
            delay = 0.0
        if delay is None:
            delay = full_jitter(call.attempt, self._rand()) if self.wait is None else self.wait
        if call.deadline_at is not None and (
            self._clock.monotonic() + delay + call.last_duration > call.deadline_at
        ):
            return "deadline"
        if withdraw and not self._budget_token(request):
            return "budget"
        return delay

    async def _decide_async(
        self,
        request: httpx.Request,
        call: _Call,
        exc: BaseException | None = None,
        response: httpx.Response | None = None,
    ) -> float | str:
        """`_decide` for async requests: a store's round trip for the budget's token does not
        block the event loop."""
        decision = self._decide(request, call, exc, response, withdraw=False)
        if not isinstance(decision, str) and not await self._budget_token_async(request):
            return "budget"
        return decision

    def _gave_up(
        self, request: httpx.Request, call: _Call, reason: str, exc: BaseException | None
    ) -> None:
        if reason in ("done", "not_retryable", "not_idempotent", "retry_off"):
            if exc is not None and reason == "not_idempotent":
                add_note(
                    exc,
                    f"resilient: {request.method} not retried: the server may have processed it "
                    "(send an Idempotency-Key header to allow retries)",
                )
            return
        why = {
            "attempts": "attempts exhausted",
            "deadline": "the next attempt could not finish before the deadline",
            "budget": "retry budget exhausted",
            "body_sent": "the streamed request body was already (partly) sent",
            "breaker_open": "the circuit breaker opened",
        }[reason]
        if exc is not None:
            add_note(exc, f"resilient: gave up after {call.attempt} attempt(s): {why}")
        event_reason = reason if reason in ("attempts", "deadline", "budget") else "stop"
        emit(self.hooks, RetryGaveUp("http", call.attempt, event_reason, exc))  # type: ignore[arg-type]

    def _scheduled(
        self,
        request: httpx.Request,
        call: _Call,
        delay: float,
        exc: BaseException | None,
        response: httpx.Response | None,
    ) -> None:
        self._instruments.retries.add(1, self._host(request.url).attributes)
        emit(self.hooks, RetryScheduled("http", call.attempt, delay, exc, response))

    def _degraded(
        self, request: httpx.Request, call: _Call, outcome: BaseException | httpx.Response
    ) -> httpx.Response | None:
        """The fallback's answer after every attempt failed, or None. After an error the request
        gets the timeouts it was sent with back first (`_uncut`): the fallback sees it as sent."""
        if not isinstance(outcome, httpx.Response):
            _uncut(request, call.timeouts)
        fallback = self.fallback
        if fallback is None:
            return None
        if isinstance(outcome, httpx.Response) and not self.classifier.is_failure(
            outcome.status_code
        ):
            return None
        if isinstance(fallback, StaleIfError):
            # A service's answers are kept under its own URL, not the replica's that served them.
            stale = fallback.lookup(request, call.logical)
        else:
            stale = fallback(request, outcome)
        if stale is not None:
            self._instruments.stale.add(1, self._host(request.url).attributes)
            stale.extensions = {
                **stale.extensions,
                "resilient": {"attempts": call.attempt, "stale": True},
            }
        return stale

    def _finish(
        self, request: httpx.Request, call: _Call, response: httpx.Response
    ) -> httpx.Response:
        # httpx gives every response its own extensions dict: set the key in place.
        response.extensions["resilient"] = {"attempts": call.attempt, "stale": False}
        fallback = self.fallback
        if isinstance(fallback, StaleIfError):
            if response.status_code < 400:
                fallback.invalidate(request, call.logical)  # (an unsafe method's success)
            if response.status_code == 200:
                return fallback.wrap(request, response, call.logical)
        return response

    def _rejected(self, request: httpx.Request, exc: CircuitOpenError) -> None:
        self._instruments.rejections.add(
            1,
            {
                **self._host(request.url).attributes,
                "resilient.policy.kind": "circuit_breaker",
            },
        )

    # -- telemetry -----------------------------------------------------------------------------------

    def _span_attributes(self, request: httpx.Request, call: _Call) -> dict[str, Any]:
        url = request.url
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "server.address": url.host,
            "server.port": url.port or (443 if url.scheme == "https" else 80),
            "url.full": _url_for_telemetry(url),
        }
        if call.sent > 1:
            attributes["http.request.resend_count"] = call.sent - 1
        return attributes

    @staticmethod
    def _span_outcome(
        span: trace.Span, response: httpx.Response | None, exc: BaseException | None
    ) -> None:
        if response is not None:
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 400:
                span.set_attribute("error.type", str(response.status_code))
                span.set_status(Status(StatusCode.ERROR))
        elif exc is not None:
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR))

    # -- one attempt: what both drivers do around the inner transport ----------------------------

    def _choose(self, request: httpx.Request, call: _Call) -> tuple[Replica, int]:
        """Pick a replica of the request's service, route the request to it, take its permit.

        A replica whose breaker refuses (its half-open probes are all out) is passed over for
        another; in panic mode, if every candidate refuses, the request goes without a permit.
        """
        service = call.service
        assert service is not None
        assert call.logical is not None
        skipped: list[Replica] = []
        first = call.first
        call.first = None
        while True:
            replica: Replica | None
            if first is not None:
                replica, first = first, None
            else:
                replica = service.pick((*call.tried, *skipped))
            if replica is None:
                if skipped and service.panic:
                    replica = self._least_tried(call, skipped)
                    gen = REJECTED
                    break
                if skipped:  # the others are out, and those left refused their permits
                    raise self._refused(service, skipped[-1])
                raise NoHealthyEndpoints(
                    f"service {service.name!r} has no replica to send to "
                    f"({len(service.replicas)} known)",
                    name=service.name,
                )
            if replica in call.tried and skipped and service.panic:
                # Every replica not tried yet refused a permit; in panic one of them is still a
                # better bet than sending the same request to the same replica again.
                replica = self._least_tried(call, skipped)
                gen = REJECTED
                break
            if replica in skipped:
                # pick() went round again to a replica that already refused: every candidate
                # has refused, and asking again would spin.
                if not service.panic:
                    raise self._refused(service, replica)
                replica = self._least_tried(call, skipped)
                gen = REJECTED
                break
            breaker = replica.breaker
            gen = breaker._acquire() if breaker is not None else 0
            if gen != REJECTED:
                break
            if replica.ejected and breaker is not None:
                service.probe_refused(replica, breaker.retry_after() or _REFUSED_PROBE_WAIT)
            skipped.append(replica)
            if len(skipped) >= len(service.replicas) or replica in call.tried:
                if not service.panic:
                    raise self._refused(service, replica)
                replica = self._least_tried(call, skipped)
                gen = REJECTED
                break
        call.tried = (*call.tried, replica)
        self._route(request, call.logical, replica, service)
        return replica, gen

    @staticmethod
    def _refused(service: ServiceRuntime, replica: Replica) -> Exception:
        if replica.breaker is not None:
            return replica.breaker._reject()
        return NoHealthyEndpoints(
            f"service {service.name!r}: every replica refused", name=service.name
        )

    @staticmethod
    def _least_tried(call: _Call, candidates: Sequence[Replica]) -> Replica:
        """In panic, with every permit refused: a replica this request has not tried, if any."""
        for replica in candidates:
            if replica not in call.tried:
                return replica
        return min(candidates, key=call.tried.count)

    def _route(
        self, request: httpx.Request, logical: httpx.URL, replica: Replica, service: ServiceRuntime
    ) -> None:
        """Point the request at a replica: its scheme, host, port and path prefix."""
        request.url = replica.url_for(logical)
        server_name = service.service.tls_server_name
        if server_name:
            request.headers["Host"] = server_name
            request.extensions = {**request.extensions, "sni_hostname": server_name}
        else:
            request.headers["Host"] = replica.route[4]

    def _start_attempt(
        self,
        request: httpx.Request,
        call: _Call,
        read_limit: float | None = None,
        admitted: int | None = None,
    ) -> _Attempt:
        """Choose the replica (or take the host), take the breaker's permit and start the
        attempt's span. ``admitted``: the host breaker's permit, taken already
        (`_admitted_async`)."""
        replica: Replica | None = None
        if call.service is not None:
            replica, gen = self._choose(request, call)
            breaker = replica.breaker
            latency = call.service.latency
            attributes = replica.attributes
            replica.in_flight += 1
        else:
            host = call.host
            assert host is not None
            breaker = host.breaker
            gen = 0
            if admitted is not None:
                gen = admitted
            elif breaker is not None:
                rt = breaker._rt
                if breaker._plain and rt.state is CLOSED:
                    gen = rt.generation  # what _acquire() answers when closed, without the call
                else:
                    gen = breaker._acquire()
                    if gen == REJECTED:
                        raise breaker._reject()
            latency = host.latency
            attributes = host.attributes
        if call.deadline_at is None and self.attempt_timeout is None:
            # The common case, kept short: no time limit to clip to, at most a read cut.
            call.sent += 1
            call.shortened = False
            own = call.timeouts
            if read_limit is not None:
                read, cut = self._cut_read(request, own, read_limit, self._clock.monotonic())
                if cut is not None:
                    call.full_read = read
                    call.shortened = True
            elif request.extensions.get("timeout") is not own:  # undo an earlier cut
                request.extensions = {**request.extensions, "timeout": own}
        else:
            self._prepare(request, call, read_limit)
        if self._meter_given or _metrics_internal._METER_PROVIDER is not None:
            self._instruments.attempts.add(1, attributes)
        span: trace.Span | None = None
        if self._tracer_given or (
            trace._TRACER_PROVIDER is not None if _PROVIDER_KNOWN else _tracing_installed()
        ):
            span = self._tracer.start_span(request.method, kind=SpanKind.CLIENT)
            if span.is_recording():
                # Attributes, redaction and propagation only when someone records.
                span.set_attributes(self._span_attributes(request, call))
                propagate.inject(request.headers, context=trace.set_span_in_context(span))
            else:
                span.end()
                span = None
        return (breaker, gen, span, latency, replica, self._clock.monotonic())

    def _attempt_failed(self, attempt: _Attempt, call: _Call | None, exc: Exception | None) -> None:
        """An attempt that raised ``exc``; or, with no ``call`` and no ``exc``, one that lost a
        race (`_attempt_lost`)."""
        breaker, gen, span, _, replica, started = attempt
        duration = self._clock.monotonic() - started
        if call is not None:
            call.last_duration = duration
        if span is not None:
            self._span_outcome(span, None, exc)
            span.end()
        if replica is not None:
            replica.in_flight -= 1
            replica.failures += 1
            replica.observe_failure(duration, started + duration)
        if breaker is not None and gen != REJECTED:
            if exc is not None and self.classifier.exception_kind(exc) == "not_retryable":
                breaker._release(gen)
            else:
                # (Also an attempt given up by the hedge's read cut: slower than the service's
                # p95, it is the only evidence against a replica that accepts and never answers.)
                breaker._failure(gen, duration, exc)

    def _attempt_lost(self, attempt: _Attempt, delay: float | None) -> None:
        """An attempt cancelled because another copy of its request answered first.

        If it ran for the hedge delay (the first copy always has), it was slower than the
        service's usual answer, and it counts against its replica as an attempt given up by
        the sync read cut does: it is the only evidence against a replica that accepts and
        never answers, which would otherwise stay in the choice, each request to it costing a
        hedge. A hedge cut short sooner, because the first copy answered after all, tells
        nothing against its replica: given back, as if never made."""
        if delay is not None and self._clock.monotonic() - attempt[5] < delay:
            self._attempt_cancelled(attempt)
        else:
            self._attempt_failed(attempt, None, None)

    @staticmethod
    def _attempt_cancelled(attempt: _Attempt) -> None:
        breaker, gen, span, _, replica, _ = attempt
        if span is not None:
            span.end()
        if replica is not None:
            replica.in_flight -= 1
        if breaker is not None and gen != REJECTED:
            breaker._release(gen)

    def _attempt_answered(self, attempt: _Attempt, call: _Call, response: httpx.Response) -> None:
        breaker, gen, span, latency, replica, started = attempt
        call.last_duration = duration = self._clock.monotonic() - started
        if span is not None:
            self._span_outcome(span, response, None)
            span.end()
        failed = self.classifier.is_failure(response.status_code)
        if replica is not None:
            replica.in_flight -= 1
            if failed:
                replica.failures += 1
                replica.observe_failure(duration, started + duration)
            else:
                replica.successes += 1
                replica.observe(duration, started + duration)
        if not failed and self._learn is not None:  # the latencies serve hedging alone
            latency.add(duration)
        if breaker is not None and gen != REJECTED:
            if failed:
                breaker._failure(gen, duration, None)
            elif breaker._plain:
                breaker._fast_success(gen)
            else:
                breaker._success(gen, duration)

    # -- sync -------------------------------------------------------------------------------------

    def _sync_transport(self) -> httpx.BaseTransport:
        inner = self._sync_inner
        if inner is not None:
            return inner
        with self._pool_lock:  # concurrent first requests must not each build a pool
            inner = self._sync_inner
            if inner is not None:
                return inner
            if self._inner is None:
                inner = httpx.HTTPTransport(verify=self._ssl or True)
            elif isinstance(self._inner, httpx.BaseTransport):
                inner = self._inner
            else:
                raise TypeError(
                    "this ResilientTransport wraps an async transport; use it with httpx.AsyncClient"
                )
            self._sync_inner = inner
        return inner

    def _sync_hedge_transport(self, request: httpx.Request) -> httpx.BaseTransport:
        """The transport a sync hedge of ``request`` is sent through: a second pool like the
        first, when this transport built its own and hedges to the request's origin are
        frequent; else the requests' own.

        A hedge goes out because its request is already late. In the requests' own pool it
        would queue behind the very requests it was sent to overtake: for a free connection
        when slow requests fill the pool, and, on every attempt, for httpcore's pool lock, which
        is held while the pool polls each idle connection (system calls that hand the GIL to
        other threads) and is taken three times a request. In the bench's tail scenario (8
        client threads) a pool of its own took the p99 from 18-21 ms to 13-17 ms (decision 5).

        A connection of that pool is only worth having if it is used before httpx lets it go
        (5 s idle): a hedge to an origin last hedged longer ago than that (or never) would open
        a connection, and a TLS handshake, where the requests' pool likely has one idle, and
        such a client has no queue to skip. It takes the requests' pool. A caller's transport
        cannot be copied: it serves every hedge."""
        url = request.url
        origin = (url.raw_host, url.port)
        now = self._clock.monotonic()
        hedged = self._hedged_at
        last = hedged.get(origin)
        hedged[origin] = now
        frequent = last is not None and now - last <= _HEDGE_POOL_IDLE
        if not frequent and len(hedged) > 256:  # origins come and go: forget the stale ones
            for key, at in list(hedged.items()):
                if now - at > _HEDGE_POOL_IDLE:
                    hedged.pop(key, None)
        inner = self._sync_hedge_inner
        if inner is not None and frequent:
            return inner
        if frequent and self._inner is None:
            with self._pool_lock:
                inner = self._sync_hedge_inner
                if inner is None and not self._closed:  # closed: nothing would close a new one
                    inner = self._sync_hedge_inner = httpx.HTTPTransport(verify=self._ssl or True)
            if inner is not None:
                return inner
        return self._sync_transport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the pipeline (httpx calls this).

        The short path: the common request (see `_plain_request`) has its first attempt made
        right here, with only the work of `_begin`, `_start_attempt` and `_attempt_answered` that
        it needs. Anything but a good answer goes on in `_loop` (through `_resumed`) exactly as
        if `_begin` had started it; every other request takes the whole path, `_handle`.

        Most requests are this one, and the client's own work around a request evicts ours from
        the CPU's caches: each call and branch left out here costs more than it seems."""
        if not self._direct_sync_ok:
            return self._handle(request)
        url = request.url
        inner = self._sync_inner
        if self._services and url.port is None:
            # A service first: its name may also be in `_hosts` (`breaker_for`, telemetry of a
            # refusal), and must never be sent to as a host.
            service = self._services.get(url.host)
            if service is not None:
                if inner is None:
                    return self._handle(request)
                return self._service_direct(request, service, inner)
        host = self._hosts.get((url.raw_host, url.port))
        if host is None or inner is None or not self._plain_request(request, host.breaker):
            return self._handle(request)
        budget = self.budget
        if budget is not None:
            budget.deposit()
        breaker = host.breaker
        gen = 0 if breaker is None else breaker._rt.generation
        own = request.extensions.get("timeout")
        hedgeable = self.classifier.may_hedge(request)
        idempotent = hedgeable or self.classifier.is_idempotent(request)
        delay: float | None = None
        read: float | None = None
        cut: _ReadCut | None = None
        clock = self._clock
        started = clock.monotonic()
        if hedgeable and self.hedge is not None:
            delay = host.latency.learned if self._learn is not None else self._fixed_delay
            if delay is not None:
                read, cut = self._cut_read(request, own, delay, started)
        failed: Exception | None = None
        try:
            response = inner.handle_request(request)
        except Exception as exc:
            failed = exc  # handled below, outside this block: later errors are not its context
        except BaseException:
            if breaker is not None:
                breaker._release(gen)
            _uncut(request, own)
            raise
        if failed is not None:
            call = self._resumed(host, idempotent, own, delay, read, cut is not None)
            self._attempt_failed((breaker, gen, None, host.latency, None, started), call, failed)
            return self._loop(request, call, failed)
        status = response.status_code
        classifier = self.classifier
        if status >= self._good_below and (
            status in classifier.retry_statuses or classifier.is_failure(status)
        ):
            call = self._resumed(host, idempotent, own, delay, read, cut is not None)
            self._attempt_answered(
                (breaker, gen, None, host.latency, None, started), call, response
            )
            return self._loop(request, call, response)
        if cut is not None:
            cut.restore(read)  # as `_restore_read`: the body is read with the request's own
        if self._learn is not None:
            host.latency.add(clock.monotonic() - started)
        if breaker is not None:
            breaker._fast_success(gen)
        response.extensions["resilient"] = {"attempts": 1, "stale": False}
        return response

    def _service_direct(
        self, request: httpx.Request, service: ServiceRuntime, inner: httpx.BaseTransport
    ) -> httpx.Response:
        """`handle_request`'s short path for a request to a service: a replica chosen and the
        first attempt made here, with only the work of `_begin`, `_guarded`, `_choose` and the
        attempt that it needs. Taken while the service's breaker and the chosen replica's are
        closed; anything but a good answer goes on in `_guarded_from` exactly as if `_handle`
        had started it. However it ends, the caller gets its request back as it sent it."""
        guard = service.breaker
        if (guard is not None and not (guard._plain and guard._rt.state is CLOSED)) or (
            not self._plain_request(request, None)
        ):
            return self._handle(request)
        replica = service.pick(())
        breaker = None if replica is None else replica.breaker
        if replica is None or (
            breaker is not None and not (breaker._plain and breaker._rt.state is CLOSED)
        ):
            # No replica, or its permit is not a formality (half-open, or panic): the whole
            # path takes it from here with this pick. Picking again would skip it (a round
            # robin's turn would go to the next replica), and a replica due its probe would never
            # get one.
            return self._handle(request, replica)
        budget = self.budget
        if budget is not None:
            budget.deposit()
        guard_gen = 0 if guard is None else guard._rt.generation
        gen = 0 if breaker is None else breaker._rt.generation
        logical = request.url
        logical_host = request.headers.get("Host")
        logical_sni = request.extensions.get("sni_hostname")
        self._route(request, logical, replica, service)
        try:
            own = request.extensions.get("timeout")
            hedgeable = self.classifier.may_hedge(request)
            idempotent = hedgeable or self.classifier.is_idempotent(request)
            latency = service.latency
            delay: float | None = None
            read: float | None = None
            cut: _ReadCut | None = None
            clock = self._clock
            started = clock.monotonic()
            if hedgeable and self.hedge is not None:
                delay = latency.learned if self._learn is not None else self._fixed_delay
                if delay is not None:
                    read, cut = self._cut_read(request, own, delay, started)
            replica.in_flight += 1
            failed: Exception | None = None
            try:
                response = inner.handle_request(request)
            except Exception as exc:
                failed = exc  # handled below, outside this block: later errors are not its context
            except BaseException:
                replica.in_flight -= 1
                if breaker is not None:
                    breaker._release(gen)
                if guard is not None:
                    guard._release(guard_gen)
                _uncut(request, own)
                raise
            if failed is None:
                status = response.status_code
                classifier = self.classifier
                if status < self._good_below or not (
                    status in classifier.retry_statuses or classifier.is_failure(status)
                ):
                    if cut is not None:
                        cut.restore(read)  # as `_restore_read`
                    duration = clock.monotonic() - started
                    replica.in_flight -= 1
                    replica.successes += 1
                    replica.observe(duration, started + duration)
                    if self._learn is not None:
                        latency.add(duration)
                    if breaker is not None:
                        breaker._fast_success(gen)
                    if guard is not None:
                        guard._fast_success(guard_gen)
                    response.extensions["resilient"] = {"attempts": 1, "stale": False}
                    return response
            call = self._resumed(None, idempotent, own, delay, read, cut is not None)
            call.service = service
            call.logical = logical
            call.logical_host = logical_host
            call.logical_sni = logical_sni
            call.tried = (replica,)
            attempt = (breaker, gen, None, latency, replica, started)
            if failed is not None:
                self._attempt_failed(attempt, call, failed)
            else:
                self._attempt_answered(attempt, call, response)
            return self._guarded_from(request, call, guard, guard_gen, failed or response)
        finally:
            self._unroute_to(request, logical, logical_host, logical_sni)

    def _handle(self, request: httpx.Request, first: Replica | None = None) -> httpx.Response:
        """The whole path of a request; ``first``, a replica of its service already picked for
        its first attempt (by `_service_direct`)."""
        bulkhead = self.bulkhead
        started = 0.0
        if bulkhead is not None:
            bulkhead.acquire()
            started = self._clock.monotonic()
        try:
            call = self._begin(request)
            call.first = first
            if call.logical is None:
                response = self._loop(request, call)  # not a service: no service breaker either
            else:
                try:
                    response = self._guarded(request, call)
                finally:
                    self._unroute(request, call)
        except Exception as exc:
            if bulkhead is not None:
                self._failed(bulkhead, started, exc)
            raise
        except BaseException:
            if bulkhead is not None:
                bulkhead.release()  # cancelled: no outcome
            raise
        if bulkhead is not None:
            # The permit is held until the caller closes the response: a streamed download is
            # work in progress as much as the request was.
            self._hold(response, bulkhead, started)
        return response

    def _plain_request(self, request: httpx.Request, breaker: CircuitBreaker | None) -> bool:
        """May the short path (`handle_request`) serve this request? No per-request options or ambient deadline, a bytes
        body, no telemetry to record, and a closed breaker (the transport's own configuration
        was checked once, in ``_direct_ok``)."""
        return (
            (breaker is None or (breaker._plain and breaker._rt.state is CLOSED))
            and not request.extensions.get("resilient")
            and isinstance(request.stream, httpx.ByteStream)
            and _DEADLINE.get() is None
            and _metrics_internal._METER_PROVIDER is None
            and (trace._TRACER_PROVIDER is None if _PROVIDER_KNOWN else not _tracing_installed())
        )

    def _cut_read(
        self,
        request: httpx.Request,
        own: dict[str, float | None] | None,
        delay: float,
        started: float,
    ) -> tuple[float | None, _ReadCut | None]:
        """The read cut of `_hedged` for an attempt begun at ``started``: the request's own read
        timeout, and the cut now set on the request (None if its own timeout is the shorter)."""
        read = own.get("read") if own else None
        if (read is not None and delay >= read) or started < self._no_cut_until:
            return read, None
        cut = _ReadCut.make(own, delay, self._clock.monotonic, started)
        request.extensions = {**request.extensions, "timeout": cut}
        return read, cut

    def _resumed(
        self,
        host: _Host | None,
        idempotent: bool,
        timeouts: dict[str, float | None] | None,
        delay: float | None,
        read: float | None,
        shortened: bool,
    ) -> _Call:
        """The `_Call` of a request the short path began, after its first attempt: the state `_begin`
        and `_start_attempt` would have left."""
        call = _Call()
        call.attempts = self.attempts
        call.idempotent = idempotent
        call.host = host
        call.timeouts = timeouts
        call.delay = delay
        call.attempt = call.sent = 1
        call.shortened = shortened
        call.full_read = read
        return call

    def _failed(self, bulkhead: Bulkhead, started: float, exc: Exception) -> None:
        """Give the permit back after a request that raised (an httpx timeout is a drop)."""
        duration = self._clock.monotonic() - started
        bulkhead.on_failure(duration, None if isinstance(exc, httpx.TimeoutException) else exc)

    def _hold(self, response: httpx.Response, bulkhead: Bulkhead, started: float) -> None:
        """Make the response's body hold the bulkhead permit until it is closed; a response
        already read and closed (a stale answer, a fallback's, a kept 503) gives it back now:
        its ``close()`` would never reach the body again."""
        dropped = response.status_code in (429, 503)  # the server shed load: a drop for AIMD
        duration = self._clock.monotonic() - started
        held = _ReleaseOnClose(response.stream, bulkhead, duration, dropped)
        if response.is_closed:
            held._release()
        else:
            response.stream = held

    def _attempt(
        self,
        request: httpx.Request,
        call: _Call,
        read_limit: float | None = None,
        hedge: bool = False,
    ) -> httpx.Response:
        """One attempt; ``hedge``: a copy sent because another is late (`_sync_hedge_transport`)."""
        inner = self._sync_inner
        if inner is None:
            inner = self._sync_transport()  # built before the clock starts: not the replica's time
        attempt = self._start_attempt(request, call, read_limit)
        try:
            if hedge:  # its replica now chosen, hence the origin
                inner = self._sync_hedge_transport(request)
            response = inner.handle_request(request)
        except Exception as exc:
            self._attempt_failed(attempt, call, exc)
            raise
        except BaseException:
            self._attempt_cancelled(attempt)
            raise
        self._attempt_answered(attempt, call, response)
        return response

    def _hedged(self, request: httpx.Request, call: _Call, delay: float) -> httpx.Response:
        """One round of a hedged request: the first copy, and hedges after ``delay``."""
        assert self.hedge is not None
        if self.hedge.threads:
            return self._race_threads(request, call, delay)
        try:
            response = self._attempt(request, call, read_limit=delay)
        except httpx.ReadTimeout as exc:
            return self._after_cut(request, call, delay, exc)
        if call.shortened:
            self._restore_read(request, call)
        return response

    def _after_cut(
        self, request: httpx.Request, call: _Call, delay: float, exc: Exception
    ) -> httpx.Response:
        """An attempt whose read timeout was cut to ``delay`` failed with ``exc``. If the cut
        timed it out, it was slower than its service's p95: abandon it and send another copy at
        once (a hedge). Otherwise ``exc`` stands."""
        if not self._hedge_after_cut(request, call, delay, exc):
            raise exc
        return self._attempt(request, call, hedge=True)

    def _hedge_after_cut(
        self, request: httpx.Request, call: _Call, delay: float, exc: Exception
    ) -> bool:
        """Did the read cut time this attempt out? Then a copy goes out now (a hedge).

        The attempt was given up by us, not by its own timeout: a request is never failed for
        it. With no budget token for the copy, the copy goes all the same, and no read is cut
        for the next second (`_NO_CUT_FOR`), so that the budget, spent in an outage, is
        overdrawn at most by the cuts in flight when it ran dry."""
        if not self._cut_timed_out(request, call, delay, exc):
            return False
        self._copy_after_cut(request, delay, self._budget_token(request))
        return True

    async def _hedge_after_cut_async(
        self, request: httpx.Request, call: _Call, delay: float, exc: Exception
    ) -> bool:
        """`_hedge_after_cut` for trio: a store's round trip for the budget's token does not
        block the event loop."""
        if not self._cut_timed_out(request, call, delay, exc):
            return False
        self._copy_after_cut(request, delay, await self._budget_token_async(request))
        return True

    def _cut_timed_out(
        self, request: httpx.Request, call: _Call, delay: float, exc: Exception
    ) -> bool:
        """Was ``exc`` the read cut's timeout? Then the attempt counts as a slow sample."""
        if not (call.shortened and isinstance(exc, httpx.ReadTimeout)):
            return False
        self._censored(request, call, delay)
        return True

    def _copy_after_cut(self, request: httpx.Request, delay: float, funded: bool) -> None:
        """Announce the copy sent after a read cut; sent without a budget token (``funded``
        False), no read is cut for a while."""
        if not funded:
            self._no_cut_until = self._clock.monotonic() + _NO_CUT_FOR
        self._hedge_launched(request, 1, delay)

    def _settle(
        self, request: httpx.Request, call: _Call, outcome: httpx.Response | Exception
    ) -> httpx.Response:
        """The rest of the first round of a request the short path began, given its first attempt's
        outcome: what `_hedged` (or a plain `_attempt`) would have made of it."""
        if isinstance(outcome, Exception):
            if call.delay is None:
                raise outcome
            return self._after_cut(request, call, call.delay, outcome)
        if call.shortened:
            self._restore_read(request, call)
        return outcome

    def _censored(self, request: httpx.Request, call: _Call, delay: float) -> None:
        """An abandoned attempt took longer than ``delay``: count it as a slow sample, so the
        learned percentile is not computed from the fast answers alone (which would pull the
        delay down and down, abandoning ever more attempts)."""
        if self._learn is not None:
            self._latency(request, call).add(2.0 * delay)

    @staticmethod
    def _restore_read(request: httpx.Request, call: _Call) -> None:
        """The answer's headers came in time: its body gets the request's own read timeout.

        httpcore reads the timeouts from the same dict when the body is read, later."""
        if call.shortened:
            timeouts = request.extensions.get("timeout")
            if isinstance(timeouts, _ReadCut):
                timeouts.restore(call.full_read)

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                assert self.hedge is not None
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.hedge.max_workers, thread_name_prefix="resilient-hedge"
                )
            return self._pool

    def _race_threads(self, request: httpx.Request, call: _Call, delay: float) -> httpx.Response:
        """Run the attempt and its hedges in pool threads; return the first good answer.

        Threads cannot be cancelled: losers run to the end and their responses are closed then.
        A request is raced only while the pool has a free worker, so a hedge never waits behind
        other requests' losers; when the pool is full the request runs plainly in the caller's
        thread.
        """
        hedge = self.hedge
        assert hedge is not None
        pool = self._thread_pool()
        results: queue.SimpleQueue[tuple[httpx.Response | None, Exception | None]] = (
            queue.SimpleQueue()
        )
        decided = threading.Event()

        def run(req: httpx.Request, hedging: bool) -> None:
            try:
                outcome: tuple[httpx.Response | None, Exception | None] = (
                    self._attempt(req, call, hedge=hedging),
                    None,
                )
            except Exception as exc:
                outcome = (None, exc)
            finally:
                with self._pool_lock:
                    self._pool_busy -= 1
            results.put(outcome)
            if decided.is_set():
                self._drain(results)  # the race is over: close what arrives late

        def submit(req: httpx.Request, hedging: bool) -> bool:
            with self._pool_lock:
                if self._pool_busy >= hedge.max_workers:
                    return False
                self._pool_busy += 1
            pool.submit(contextvars.copy_context().run, run, req, hedging)
            return True

        if not submit(request, False):
            return self._attempt(request, call)
        launched, finished = 1, 0
        more = hedge.max_hedges > 0
        kept: list[httpx.Response] = []
        failure: Exception | None = None
        next_at = self._clock.monotonic() + delay
        try:
            while finished < launched:
                timeout = max(0.0, next_at - self._clock.monotonic()) if more else None
                try:
                    response, exc = results.get(timeout=timeout)
                except queue.Empty:
                    clone = _clone(request)
                    room = self._pool_busy < hedge.max_workers
                    if (
                        room
                        and self._may_hedge(request, launched, delay * launched)
                        and submit(clone, True)
                    ):
                        launched += 1
                        next_at += delay
                        more = launched <= hedge.max_hedges
                    else:
                        more = False
                    continue
                finished += 1
                if response is None:
                    failure = exc
                elif self._good(response):
                    for extra in kept:
                        extra.close()
                    kept = []
                    return response
                else:
                    kept.append(response)
        finally:
            decided.set()
            self._drain(results)
        if kept:
            for extra in kept[:-1]:
                extra.close()
            return kept[-1]
        assert failure is not None
        raise failure

    @staticmethod
    def _drain(
        results: queue.SimpleQueue[tuple[httpx.Response | None, Exception | None]],
    ) -> None:
        while True:
            try:
                late, _ = results.get_nowait()
            except queue.Empty:
                return
            if late is not None:
                late.close()

    @staticmethod
    def _unroute(request: httpx.Request, call: _Call) -> None:
        """Give the caller back the request it sent: httpx uses ``response.request`` for
        redirects and cookies, which must stay on the service, not on one replica."""
        assert call.logical is not None
        ResilientTransport._unroute_to(request, call.logical, call.logical_host, call.logical_sni)

    @staticmethod
    def _unroute_to(
        request: httpx.Request, logical: httpx.URL, logical_host: str | None, logical_sni: Any
    ) -> None:
        request.url = logical
        if logical_host is None:
            request.headers.pop("Host", None)
        else:
            request.headers["Host"] = logical_host
        if logical_sni is None:
            request.extensions.pop("sni_hostname", None)
        else:
            request.extensions["sni_hostname"] = logical_sni  # the caller's own

    def _guarded(self, request: httpx.Request, call: _Call) -> httpx.Response:
        guard = call.service.breaker if call.service is not None else None
        if guard is None:
            return self._loop(request, call)
        gen = guard._acquire()
        if gen == REJECTED:
            _yield_gil()
            return self._shed(request, call, guard)
        return self._guarded_from(request, call, guard, gen)

    def _guarded_from(
        self,
        request: httpx.Request,
        call: _Call,
        guard: CircuitBreaker | None,
        gen: int,
        first: httpx.Response | Exception | None = None,
    ) -> httpx.Response:
        """`_loop` under the service breaker's permit ``gen`` (taken), its outcome judged.
        ``first``: the first attempt's outcome, when the short path made it."""
        if guard is None:
            return self._loop(request, call, first)
        try:
            response = self._loop(request, call, first)
        except Exception as exc:
            guard._failure(gen, 0.0, exc)
            raise
        except BaseException:
            guard._release(gen)
            raise
        self._judge(guard, gen, response)
        return response

    def _shed(self, request: httpx.Request, call: _Call, guard: CircuitBreaker) -> httpx.Response:
        """The service breaker is open: a degraded answer if there is one, else refuse."""
        exc = guard._reject()
        self._rejected(request, exc)
        stale = self._degraded(request, call, exc)
        if stale is not None:
            return stale
        raise exc

    def _judge(self, guard: CircuitBreaker, gen: int, response: httpx.Response) -> None:
        """Report a whole request's outcome to its service breaker."""
        info = response.extensions.get("resilient") or {}
        if info.get("stale") or self.classifier.is_failure(response.status_code):
            guard._failure(gen, 0.0, None)
        elif guard._plain:
            guard._fast_success(gen)
        else:
            guard._success(gen, 0.0)

    def _loop(
        self,
        request: httpx.Request,
        call: _Call,
        first: httpx.Response | Exception | None = None,
    ) -> httpx.Response:
        """Attempts until one answers well or a decision stops them. ``first``: the outcome of
        the first attempt, when the short path made it. A request that fails gets its own
        timeouts back (`_uncut`)."""
        try:
            return self._attempts(request, call, first)
        except BaseException:
            _uncut(request, call.timeouts)
            raise

    def _attempts(
        self,
        request: httpx.Request,
        call: _Call,
        first: httpx.Response | Exception | None,
    ) -> httpx.Response:
        failure: Exception | None = None
        answered: httpx.Response | None = None  # the last retryable answer (`_kept`)
        while True:
            try:
                if first is not None:
                    outcome, first = first, None
                    response = self._settle(request, call, outcome)
                else:
                    call.attempt += 1
                    delay = call.delay
                    if delay is None:
                        response = self._attempt(request, call)
                    else:
                        response = self._hedged(request, call, delay)
            except CircuitOpenError as exc:
                if call.attempt == 1:
                    _yield_gil()  # refused before any I/O
                self._rejected(request, exc)
                stale = self._degraded(request, call, exc)
                if stale is not None:
                    return stale
                if failure is not None:  # the breaker opened between attempts: the real error
                    add_note(failure, f"resilient: not retried: {exc}")
                    raise failure from None
                if answered is not None:  # ... or the real answer, as `_decide` would give it
                    return self._finish(request, call, answered)
                raise
            except Exception as exc:
                failure, answered = exc, None
                decision = self._decide(request, call, exc=exc)
                if isinstance(decision, str):
                    self._gave_up(request, call, decision, exc)
                    stale = self._degraded(request, call, exc)
                    if stale is not None:
                        return stale
                    raise
                self._scheduled(request, call, decision, exc, None)
                self._clock.sleep(decision)
                continue
            if response.status_code not in self.classifier.retry_statuses and (
                self.fallback is None or response.status_code < 500
            ):
                return self._finish(request, call, response)  # the common case, kept short
            decision = self._decide(request, call, response=response)
            if isinstance(decision, str):
                self._gave_up(request, call, decision, None)
                stale = self._degraded(request, call, response)
                if stale is not None:
                    response.close()
                    return stale
                return self._finish(request, call, response)
            self._scheduled(request, call, decision, None, response)
            # Closed, its connection back to the pool; if small, read first (the connection is
            # then kept) and kept as the request's answer should the breaker open meanwhile.
            failure, answered = None, None
            try:
                if _small(response):
                    answered = _kept(response, b"".join(response.iter_raw()))
            except httpx.HTTPError:
                pass  # its body did not come: it is no answer to give
            finally:
                response.close()
            self._clock.sleep(decision)

    def _close_services(self) -> None:
        for runtime in self._services.values():
            runtime.close()

    def close(self) -> None:
        self._close_services()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        with self._pool_lock:
            self._closed = True  # a late hedge builds no pool that nothing would close
            hedges, self._sync_hedge_inner = self._sync_hedge_inner, None
        if hedges is not None:
            hedges.close()
        if self._sync_inner is not None:
            self._sync_inner.close()
        elif isinstance(self._inner, httpx.BaseTransport):
            self._inner.close()

    def __enter__(self) -> ResilientTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.close()

    # -- async ------------------------------------------------------------------------------------

    def _async_transport(self) -> httpx.AsyncBaseTransport:
        inner = self._async_inner
        if inner is not None:
            return inner
        with self._pool_lock:
            inner = self._async_inner
            if inner is not None:
                return inner
            if self._inner is None:
                inner = httpx.AsyncHTTPTransport(verify=self._ssl or True)
            elif isinstance(self._inner, httpx.AsyncBaseTransport):
                inner = self._inner
            else:
                raise TypeError(
                    "this ResilientTransport wraps a sync transport; use it with httpx.Client"
                )
            self._async_inner = inner
        return inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the pipeline (httpx calls this): `handle_request`'s short
        path, for async requests, else `_handle_async`. On asyncio a hedged request is watched
        (`_HedgeWatch`) and races (`_AsyncioRace`) only if it is still running when its hedge
        is due; its `_Call` is made only then or if its attempt does not answer well."""
        if not self._direct_async_ok:
            return await self._handle_async(request)
        url = request.url
        if self._services and url.port is None and url.host in self._services:
            return await self._handle_async(request)  # a service: see `handle_request`
        host = self._hosts.get((url.raw_host, url.port))
        inner = self._async_inner
        if host is None or inner is None or not self._plain_request(request, host.breaker):
            return await self._handle_async(request)
        budget = self.budget
        if budget is not None:
            budget.deposit()
        breaker = host.breaker
        gen = 0 if breaker is None else breaker._rt.generation
        own = request.extensions.get("timeout")
        hedgeable = self.classifier.may_hedge(request)
        idempotent = hedgeable or self.classifier.is_idempotent(request)
        delay: float | None = None
        read: float | None = None
        cut: _ReadCut | None = None
        watch: _HedgeWatch | None = None
        task: asyncio.Task[Any] | None = None
        clock = self._clock
        started = clock.monotonic()
        if hedgeable and self.hedge is not None:
            delay = host.latency.learned if self._learn is not None else self._fixed_delay
            if delay is not None:
                loop = _get_running_loop()
                if loop is not None:
                    watch = host.watch
                    if watch is None or watch.loop() is not loop:
                        watch = host.watch_on(loop)
                    task = watch.add(loop, self, request, host, delay)
                else:  # trio: the read cut, as sync
                    read, cut = self._cut_read(request, own, delay, started)
        failed: BaseException | None = None
        try:
            response = await inner.handle_async_request(request)
        except BaseException as exc:
            failed = exc  # handled below, outside this block: later errors are not its context
        if failed is not None:
            race = watch.take(task) if task is not None and watch is not None else None
            attempt = (breaker, gen, None, host.latency, None, started)
            call = race.call_state() if race is not None else None
            if not isinstance(failed, Exception):
                if call is not None and call.lost and isinstance(failed, asyncio.CancelledError):
                    self._attempt_lost(attempt, delay)  # a hedge won and cancelled it
                else:
                    self._attempt_cancelled(attempt)
                if race is None:
                    _uncut(request, own)
                    raise failed
                assert call is not None
                return await self._loop_async(request, call, failed, race)
            if call is None:
                call = self._resumed(host, idempotent, own, delay, read, cut is not None)
            self._attempt_failed(attempt, call, failed)
            return await self._loop_async(request, call, failed, race)
        race = watch.take(task) if task is not None and watch is not None else None
        status = response.status_code
        classifier = self.classifier
        if (race is not None and not race.quiet()) or (
            status >= self._good_below
            and (status in classifier.retry_statuses or classifier.is_failure(status))
        ):
            if race is not None:
                call = race.call_state()
                if race.done:
                    race = None  # no hedge went out: nothing left of the race
            else:
                call = self._resumed(host, idempotent, own, delay, read, cut is not None)
            self._attempt_answered(
                (breaker, gen, None, host.latency, None, started), call, response
            )
            return await self._loop_async(request, call, response, race)
        if cut is not None:
            cut.restore(read)  # as `_restore_read`
        if self._learn is not None:
            host.latency.add(clock.monotonic() - started)
        if breaker is not None:
            breaker._fast_success(gen)
        response.extensions["resilient"] = {"attempts": 1, "stale": False}
        return response

    async def _handle_async(self, request: httpx.Request) -> httpx.Response:
        if _later.IN_USE:
            started = _later.begin()
            if started is not None:
                # A breaker or budget may use a store: its round trips wait for the request's
                # end, awaited there, rather than blocking the loop where they are asked for.
                later, token = started
                try:
                    return await self._handle_async_now(request)
                finally:
                    _later.end(token)
                    await later.settle()
        return await self._handle_async_now(request)

    async def _handle_async_now(self, request: httpx.Request) -> httpx.Response:
        bulkhead = self.bulkhead
        started = 0.0
        if bulkhead is not None:
            await bulkhead.acquire_async()
            started = self._clock.monotonic()
        try:
            call = self._begin(request)
            if call.logical is None:
                response = await self._loop_async(request, call)
            else:
                try:
                    response = await self._guarded_async(request, call)
                finally:
                    self._unroute(request, call)
        except Exception as exc:
            if bulkhead is not None:
                self._failed(bulkhead, started, exc)
            raise
        except BaseException:
            if bulkhead is not None:
                bulkhead.release()  # cancelled: no outcome
            raise
        if bulkhead is not None:
            self._hold(response, bulkhead, started)
        return response

    async def _attempt_async(
        self, request: httpx.Request, call: _Call, read_limit: float | None = None
    ) -> httpx.Response:
        inner = self._async_inner
        if inner is None:
            inner = self._async_transport()
        admitted: int | None = None
        if _later.IN_USE and call.service is None:
            admitted = await self._admitted_async(call)
        attempt = self._start_attempt(request, call, read_limit, admitted)
        try:
            response = await inner.handle_async_request(request)
        except Exception as exc:
            self._attempt_failed(attempt, call, exc)
            raise
        except BaseException as exc:
            # Lost a race: on asyncio its hedge cancelled it; on trio `_race_anyio`'s task group.
            if call.lost and isinstance(exc, anyio.get_cancelled_exc_class()):
                self._attempt_lost(attempt, call.delay)
            else:
                self._attempt_cancelled(attempt)
            raise
        self._attempt_answered(attempt, call, response)
        return response

    @staticmethod
    async def _admitted_async(call: _Call) -> int | None:
        """The permit of a host breaker bound to a store, taken without blocking the event loop
        (`CircuitBreaker._acquire_async`); None when there is no such breaker."""
        host = call.host
        assert host is not None
        breaker = host.breaker
        if breaker is None or breaker._shared is None:
            return None
        gen = await breaker._acquire_async()
        if gen == REJECTED:
            raise breaker._reject()
        return gen

    async def _hedged_async(
        self, request: httpx.Request, call: _Call, delay: float
    ) -> httpx.Response:
        """One round of a hedged request off asyncio (trio): speculative, or raced if asked."""
        assert self.hedge is not None
        if self.hedge.trio:
            return await self._race_anyio(request, call, delay)
        try:
            response = await self._attempt_async(request, call, read_limit=delay)
        except httpx.ReadTimeout as exc:
            if not await self._hedge_after_cut_async(request, call, delay, exc):
                raise
            return await self._attempt_async(request, call)
        if call.shortened:
            self._restore_read(request, call)
        return response

    async def _settle_async(
        self,
        request: httpx.Request,
        call: _Call,
        outcome: httpx.Response | BaseException,
        race: _AsyncioRace | None,
    ) -> httpx.Response:
        """`_settle` for async requests; with ``race``, its hedges may still answer."""
        if race is not None:
            return await race.settle(outcome)
        if isinstance(outcome, httpx.Response):
            if call.shortened:
                self._restore_read(request, call)
            return outcome
        if (
            call.delay is not None
            and isinstance(outcome, Exception)
            and await self._hedge_after_cut_async(request, call, call.delay, outcome)
        ):
            return await self._attempt_async(request, call)
        raise outcome

    async def _race_anyio(
        self, request: httpx.Request, call: _Call, delay: float
    ) -> httpx.Response:
        """The same race on any anyio backend (trio), in a task group."""
        assert self.hedge is not None
        winner: list[httpx.Response] = []
        outcomes: list[httpx.Response | Exception] = []
        changed = anyio.Event()

        async def run(req: httpx.Request, tg: anyio.abc.TaskGroup) -> None:
            nonlocal changed
            if winner:
                return  # started in the batch that decided the race: trio runs it up to a checkpoint
            try:
                response = await self._attempt_async(req, call)
            except Exception as exc:
                outcomes.append(exc)
            else:
                if not winner and self._good(response):
                    winner.append(response)
                    call.lost = True  # the copies still running lost the race
                    tg.cancel_scope.cancel()
                    return
                outcomes.append(response)
            changed.set()
            changed = anyio.Event()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, request, tg)
                launched = 1
                start = anyio.current_time()
                while launched <= self.hedge.max_hedges:
                    due = start + delay * launched  # on schedule, whatever woke us meanwhile
                    while not winner and len(outcomes) < launched:
                        left = due - anyio.current_time()
                        if left <= 0:
                            break
                        with anyio.move_on_after(left):
                            await changed.wait()
                    if winner or len(outcomes) == launched:
                        break  # decided, or every attempt so far failed: the retry loop acts
                    if not await self._budget_token_async(request) or winner:
                        break  # (a winner may have come while a store was asked for the token)
                    self._hedge_launched(request, launched, delay * launched)
                    tg.start_soon(run, _clone(request), tg)
                    launched += 1
        except BaseException:
            # Cancelled (or failed) with answers in hand: nobody will take them.
            with anyio.CancelScope(shield=True):
                for kept in (*winner, *outcomes):
                    if isinstance(kept, httpx.Response):
                        await kept.aclose()
            raise
        responses = [o for o in outcomes if isinstance(o, httpx.Response)]
        if winner:
            for extra in responses:
                await extra.aclose()
            return winner[0]
        if responses:
            for extra in responses[:-1]:
                await extra.aclose()
            return responses[-1]
        failure = outcomes[-1]
        assert isinstance(failure, Exception)
        raise failure

    async def _guarded_async(self, request: httpx.Request, call: _Call) -> httpx.Response:
        guard = call.service.breaker if call.service is not None else None
        if guard is None:
            return await self._loop_async(request, call)
        gen = await guard._acquire_async()
        if gen == REJECTED:
            return self._shed(request, call, guard)
        try:
            response = await self._loop_async(request, call)
        except Exception as exc:
            guard._failure(gen, 0.0, exc)
            raise
        except BaseException:
            guard._release(gen)
            raise
        self._judge(guard, gen, response)
        return response

    async def _loop_async(
        self,
        request: httpx.Request,
        call: _Call,
        first: httpx.Response | BaseException | None = None,
        race: _AsyncioRace | None = None,
    ) -> httpx.Response:
        """`_loop` for async requests; ``race``: the first attempt's, when it is not over."""
        try:
            return await self._attempts_async(request, call, first, race)
        except BaseException:
            _uncut(request, call.timeouts)
            raise

    async def _attempts_async(
        self,
        request: httpx.Request,
        call: _Call,
        first: httpx.Response | BaseException | None,
        race: _AsyncioRace | None,
    ) -> httpx.Response:
        failure: Exception | None = None
        answered: httpx.Response | None = None  # the last retryable answer (`_kept`)
        while True:
            try:
                if first is not None:
                    outcome, first = first, None
                    response = await self._settle_async(request, call, outcome, race)
                else:
                    call.attempt += 1
                    call.lost = False  # (a race of an earlier round may have left it set)
                    delay = call.delay
                    if delay is None:
                        response = await self._attempt_async(request, call)
                    elif (loop := _get_running_loop()) is not None:
                        response = await _AsyncioRace(self, request, call, delay, loop).run()
                    else:
                        response = await self._hedged_async(request, call, delay)
            except CircuitOpenError as exc:
                self._rejected(request, exc)
                stale = self._degraded(request, call, exc)
                if stale is not None:
                    return stale
                if failure is not None:  # the breaker opened between attempts: the real error
                    add_note(failure, f"resilient: not retried: {exc}")
                    raise failure from None
                if answered is not None:  # ... or the real answer, as `_decide` would give it
                    return self._finish(request, call, answered)
                raise
            except Exception as exc:
                failure, answered = exc, None
                if _later.IN_USE:
                    await _later.flush_pending()
                decision = await self._decide_async(request, call, exc=exc)
                if isinstance(decision, str):
                    self._gave_up(request, call, decision, exc)
                    stale = self._degraded(request, call, exc)
                    if stale is not None:
                        return stale
                    raise
                self._scheduled(request, call, decision, exc, None)
                await self._clock.sleep_async(decision)
                continue
            if response.status_code not in self.classifier.retry_statuses and (
                self.fallback is None or response.status_code < 500
            ):
                return self._finish(request, call, response)  # the common case, kept short
            if _later.IN_USE:
                try:
                    await _later.flush_pending()
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await response.aclose()  # cancelled: nobody will take it
                    raise
            try:
                decision = await self._decide_async(request, call, response=response)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await response.aclose()  # cancelled: nobody will take it
                raise
            if isinstance(decision, str):
                self._gave_up(request, call, decision, None)
                stale = self._degraded(request, call, response)
                if stale is not None:
                    await response.aclose()
                    return stale
                return self._finish(request, call, response)
            self._scheduled(request, call, decision, None, response)
            failure, answered = None, None
            try:  # as in `_attempts`
                if _small(response):
                    answered = _kept(response, b"".join([c async for c in response.aiter_raw()]))
            except httpx.HTTPError:
                pass
            finally:
                await response.aclose()
            await self._clock.sleep_async(decision)

    async def aclose(self) -> None:
        self._close_services()
        if self._async_inner is not None:
            await self._async_inner.aclose()
        elif isinstance(self._inner, httpx.AsyncBaseTransport):
            await self._inner.aclose()

    async def __aenter__(self) -> ResilientTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()
