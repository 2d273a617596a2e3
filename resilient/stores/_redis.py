"""`RedisStore`: breaker and retry-budget state shared by every process, through Redis.

redis-py is imported when a store is built, never when ``resilient`` is: the package works without
the ``redis`` extra. Every exchange with Redis is one EVALSHA of a script from `_scripts`; any
failure of it (refused, reset, slower than ``socket_timeout``, wrong password, a script error...)
is caught here and turns into ``None``, which the breaker or budget answers with its local state.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import uuid
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio.to_thread
import sniffio

from resilient import _later
from resilient._clock import Clock
from resilient.events import Hook, StoreRecovered, StoreUnavailable, emit
from resilient.policies._common import check_count, check_positive, resolve_clock
from resilient.stores import _scripts

if TYPE_CHECKING:
    from resilient.policies.breaker import CircuitBreaker
    from resilient.policies.budget import RetryBudget

__all__ = ["BreakerHandle", "BreakerReply", "BudgetHandle", "RedisStore"]

_log = logging.getLogger("resilient.stores")

#: Time buckets in a shared window, as in the local `TimeWindow`.
BUCKETS = 10


class BreakerReply(NamedTuple):
    """The shared breaker as a script left it: state code (0 closed, 1 open, 2 half-open), its
    generation, seconds left open, the seconds it opened for, and whether a permit was granted."""

    state: int
    generation: int
    open_left: float
    opened_for: float
    granted: bool


def _breaker_reply(raw: Any) -> BreakerReply:
    state, gen, left, opened, granted = (int(x) for x in raw)
    return BreakerReply(state, gen, left / 1e6, opened / 1e6, bool(granted))


def _budget_reply(raw: Any) -> tuple[bool, float]:
    return bool(int(raw[0])), float(raw[1])


class RedisStore:
    """Keep `CircuitBreaker` and `RetryBudget` state in Redis, so a whole fleet shares it.

    Pass it as ``store=``: breakers (and budgets) with the same ``name`` on the same store share
    one state, in every process that uses that Redis. Each update is one atomic Lua script on
    Redis's clock. A breaker in the closed state decides from the state cached with the last
    reply, so a call costs one round trip (recording its outcome), and none when it is refused.

    When Redis cannot be reached (down, slower than ``socket_timeout``, wrong password), each
    breaker and budget falls back to its own local state, one warning is logged on the
    ``resilient.stores`` logger and a `StoreUnavailable` event emitted per episode; Redis is
    tried again at most once per ``retry_interval`` and sharing resumes (`StoreRecovered`) when it
    answers. No Redis error ever reaches the caller. The password is never logged or shown.

    Example::

        store = rs.RedisStore("rediss://:secret@redis.internal:6380/0")
        payments = rs.CircuitBreaker(name="payments", min_calls=20, store=store)
        budget = rs.RetryBudget(name="payments", ratio=0.2, store=store)
        repr(store)  # "RedisStore('rediss://:***@redis.internal:6380/0')"

    ``staleness``: a cached closed state older than this is refreshed before a call (one round
    trip after an idle spell). ``probe_lease``: a half-open probe claim lapses after this long,
    so a process that dies mid-probe cannot hold the breaker half-open. ``flush_calls`` /
    ``flush_interval``: a budget sends its counted calls with the next retry, or once this many
    have accumulated, or this long has passed. Keys are ``prefix`` + ``"cb:{name}"`` (breakers)
    or ``"rb:{name}"`` (budgets) and expire ``key_ttl`` seconds after their last update. Other
    keyword arguments go to ``redis.Redis.from_url`` (``ssl_ca_certs=``, ``username=``...).

    The sync paths (the decorator on a sync function, the permission protocol used by the HTTP
    transport, `RetryBudget.try_withdraw`) block for that round trip: on loopback or in the same
    zone, tens to hundreds of microseconds. Async breakers use ``redis.asyncio`` under asyncio
    and a worker thread under trio, so the event loop is never blocked by them.
    """

    __slots__ = (
        "__weakref__",
        "_async",
        "_client",
        "_clock",
        "_display",
        "_down",
        "_down_since",
        "_kwargs",
        "_label",
        "_lock",
        "_next_try",
        "_password",
        "_scripts",
        "_url",
        "errors",
        "flush_calls",
        "flush_interval",
        "hooks",
        "key_ttl",
        "outages",
        "prefix",
        "probe_lease",
        "retry_interval",
        "socket_connect_timeout",
        "socket_timeout",
        "staleness",
        "tls",
    )

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = "resilient:",
        key_ttl: float = 3600.0,
        socket_timeout: float = 0.05,
        socket_connect_timeout: float = 0.05,
        retry_interval: float = 1.0,
        staleness: float = 1.0,
        probe_lease: float = 10.0,
        flush_calls: int = 100,
        flush_interval: float = 1.0,
        clock: Clock | None = None,
        hooks: Sequence[Hook] = (),
        **options: Any,
    ) -> None:
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a string, got {prefix!r}")
        for field, value in (
            ("key_ttl", key_ttl),
            ("socket_timeout", socket_timeout),
            ("socket_connect_timeout", socket_connect_timeout),
            ("retry_interval", retry_interval),
            ("probe_lease", probe_lease),
            ("flush_interval", flush_interval),
        ):
            check_positive(field, value)
        check_positive("staleness", staleness, allow_zero=True)
        check_count("flush_calls", flush_calls)
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ImportError(
                "RedisStore needs redis-py >= 5: pip install 'resilient[redis]'"
            ) from None
        self.prefix = prefix
        self.key_ttl = float(key_ttl)
        self.socket_timeout = float(socket_timeout)
        self.socket_connect_timeout = float(socket_connect_timeout)
        self.retry_interval = float(retry_interval)
        self.staleness = float(staleness)
        self.probe_lease = float(probe_lease)
        self.flush_calls = flush_calls
        self.flush_interval = float(flush_interval)
        self.hooks = tuple(hooks)
        self._clock = resolve_clock(clock)
        if not isinstance(url, str):
            raise ValueError(
                "url must be a redis://, rediss:// or unix:// URL (a str), "
                f"got a {type(url).__name__}"  # (not its repr: it may hold the password)
            )
        # Our own failure policy: one try, a short timeout, then local state.
        self._kwargs: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            **options,
        }
        self._url = url
        try:
            self._client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **self._kwargs)
            pool = self._client.connection_pool
            # Connections are made (not connected) now, sync and asyncio: an option their class
            # does not take would otherwise fail every round trip, leaving the store down for good.
            pool.connection_class(**pool.connection_kwargs)
            import redis.asyncio

            apool = redis.asyncio.ConnectionPool.from_url(url, **self._kwargs)
            apool.connection_class(**apool.connection_kwargs)
        except (TypeError, redis.RedisError) as exc:
            self._url = ""
            raise ValueError(
                f"options must be redis-py connection options, got {sorted(options)!r} ({exc})"
            ) from None
        except ValueError as exc:
            self._url = ""
            raise ValueError(
                "url must be a redis://, rediss:// or unix:// URL "
                f"({type(exc).__name__}), got {_redact_url(url)!r}"
            ) from None
        conn = self._client.connection_pool.connection_kwargs
        self._password: str | None = conn.get("password")
        self.tls = url.lower().startswith("rediss://")
        self._label, self._display = _describe(url, conn, self.tls)
        self._scripts: dict[str, Any] = {
            "breaker": self._client.register_script(_scripts.BREAKER),
            "budget": self._client.register_script(_scripts.BUDGET),
        }
        self._async: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[Any, dict[str, Any]]
        ]
        self._async = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._down = False
        self._down_since = 0.0
        self._next_try = 0.0
        #: Failed exchanges with Redis, and episodes of unavailability, since the store was built.
        self.errors = 0
        self.outages = 0

    def __repr__(self) -> str:
        return f"RedisStore({self._display!r})"

    __str__ = __repr__

    @property
    def label(self) -> str:
        """``host:port/db`` (or the socket path): how logs and events name this store.

        Example::

            RedisStore("redis://:pw@cache:6379/2").label  # "cache:6379/2"
        """
        return self._label

    @property
    def available(self) -> bool:
        """False while an episode of unavailability lasts (the policies run on local state).

        Example::

            if not store.available:
                health.degraded("breaker state is per process until Redis is back")
        """
        return not self._down

    def close(self) -> None:
        """Close the connections (sync and asyncio). The store reconnects if used again.

        Example::

            store.close()
        """
        self._client.close()
        for loop, (client, _) in list(self._async.items()):
            if loop.is_closed():
                _close_abandoned(client)
            elif not loop.is_running():
                loop.run_until_complete(client.aclose())
        self._async.clear()

    async def aclose(self) -> None:
        """Close the connections of the running asyncio loop (and the sync ones).

        Example::

            await store.aclose()
        """
        self._client.close()
        if sniffio.current_async_library() == "asyncio":
            entry = self._async.pop(asyncio.get_running_loop(), None)
            if entry is not None:
                await entry[0].aclose()

    # -- binding -------------------------------------------------------------------------------------

    def bind_breaker(self, breaker: CircuitBreaker) -> BreakerHandle:
        """The handle a `CircuitBreaker` keeps to its shared state (called by the breaker).

        Example::

            rs.CircuitBreaker(name="payments", store=store)  # calls store.bind_breaker(itself)
        """
        _later.IN_USE = True  # async transports now defer their round trips
        return BreakerHandle(self, breaker)

    def bind_budget(self, budget: RetryBudget) -> BudgetHandle:
        """The handle a `RetryBudget` keeps to its shared tokens (called by the budget).

        Example::

            rs.RetryBudget(name="payments", store=store)  # calls store.bind_budget(itself)
        """
        _later.IN_USE = True
        return BudgetHandle(self, budget)

    def _key_ttl_ms(self, *spans: float) -> int:
        """Keys outlive the longest time the state must be remembered."""
        return int(max(self.key_ttl, *(2 * s for s in spans)) * 1000)

    # -- running a script ----------------------------------------------------------------------------

    def _may_try(self) -> bool:
        """True unless Redis is down and was tried less than ``retry_interval`` ago."""
        if not self._down:
            return True
        now = self._clock.monotonic()
        with self._lock:
            if now < self._next_try:
                return False
            self._next_try = now + self.retry_interval
            return True

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """The script's reply, or None when Redis is unavailable (never an exception)."""
        if self._down and not self._may_try():
            return None
        return self._attempt(script, keys, args)

    def _attempt(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            # Script.__call__ is one EVALSHA, reloading the script on NOSCRIPT (a restarted Redis).
            reply = self._scripts[script](keys=keys, args=args)
        except Exception as exc:
            self._failed(exc)
            return None
        if self._down:
            self._recovered()
        return reply

    async def _run_async(self, script: str, keys: list[str], args: list[Any]) -> Any:
        if self._down and not self._may_try():
            return None
        if sniffio.current_async_library() != "asyncio":
            return await anyio.to_thread.run_sync(self._attempt, script, keys, args)
        try:
            reply = await self._async_scripts()[script](keys=keys, args=args)
        except Exception as exc:
            self._failed(exc)
            return None
        if self._down:
            self._recovered()
        return reply

    def _async_scripts(self) -> dict[str, Any]:
        """The asyncio client's scripts for the running loop (a client belongs to one loop)."""
        loop = asyncio.get_running_loop()
        entry = self._async.get(loop)
        if entry is None:
            # A client holds its loop (through its connections): the weak key of a loop that has
            # closed would never go. One `asyncio.run` per job would keep a client each.
            for old in [old for old in self._async if old.is_closed()]:
                gone = self._async.pop(old, None)
                if gone is not None:
                    _close_abandoned(gone[0])
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            client = redis.asyncio.Redis.from_url(
                self._url, retry=Retry(NoBackoff(), 0), **self._kwargs
            )
            scripts = {
                "breaker": client.register_script(_scripts.BREAKER),
                "budget": client.register_script(_scripts.BUDGET),
            }
            entry = self._async[loop] = (client, scripts)
        return entry[1]

    # -- episodes of unavailability -------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        now = self._clock.monotonic()
        with self._lock:
            self.errors += 1
            self._next_try = now + self.retry_interval
            if self._down:
                return
            self._down = True
            self._down_since = now
            self.outages += 1
        error = type(exc).__name__
        _log.warning(
            "resilient: redis store %s unavailable (%s: %s); breakers and budgets use local "
            "state, retrying every %g s",
            self._label,
            error,
            self._redact(str(exc)),
            self.retry_interval,
        )
        emit(self.hooks, StoreUnavailable(self._label, error))

    def _recovered(self) -> None:
        now = self._clock.monotonic()
        with self._lock:
            if not self._down:
                return
            self._down = False
            down_for = now - self._down_since
        _log.info(
            "resilient: redis store %s available again after %.3g s; state is shared again",
            self._label,
            down_for,
        )
        emit(self.hooks, StoreRecovered(self._label, down_for))

    def _redact(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text[:200]


def _close_abandoned(client: Any) -> None:
    """Close the sockets of an asyncio client whose event loop has closed, where it can no
    longer be awaited. Private parts of redis-py and asyncio, best effort: left alone, the
    garbage collector closes them with a ResourceWarning each."""
    pool = client.connection_pool
    for conn in (
        *getattr(pool, "_available_connections", ()),
        *getattr(pool, "_in_use_connections", ()),
    ):
        writer = getattr(conn, "_writer", None)
        if writer is None:
            continue
        transport = writer.transport
        try:
            transport.close()  # marks it closing; its closed loop cannot run connection_lost
        except RuntimeError:
            pass
        sock = getattr(transport, "_sock", None)
        if sock is not None:
            sock.close()
            transport._sock = None  # what connection_lost would have done
        conn._reader = conn._writer = None


def _redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for an error message about the URL).

    The query string goes too: redis-py also takes ``?password=...``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<not a URL>"
    rest, query, _ = rest.partition("?")
    tail = "?..." if query else ""
    auth, at, host = rest.rpartition("@")
    if not at:
        return f"{scheme}://{rest}{tail}"
    user, colon, _ = auth.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}{tail}"


def _describe(url: str, conn: dict[str, Any], tls: bool) -> tuple[str, str]:
    """(``host:port/db``, the URL with the password masked) from the parsed connection options."""
    db = conn.get("db", 0)
    user = conn.get("username") or ""
    auth = f"{user}{':***' if conn.get('password') else ''}"
    auth = f"{auth}@" if auth else ""
    if "path" in conn:
        label = f"{conn['path']}/{db}"
        return label, f"unix://{auth}{conn['path']}?db={db}"
    label = f"{conn.get('host', 'localhost')}:{conn.get('port', 6379)}/{db}"
    return label, f"{'rediss' if tls else 'redis'}://{auth}{label}"


def _num(value: float) -> str:
    return repr(float(value))


class BreakerHandle:
    """One breaker's link to its shared state: keys, fixed script arguments, the probe claims
    this process holds, and when the cached state was last refreshed. Used by `CircuitBreaker`."""

    __slots__ = (
        "_args",
        "_count",
        "_id",
        "_keys",
        "claims",
        "generation",
        "staleness",
        "store",
        "synced_at",
    )

    def __init__(self, store: RedisStore, breaker: CircuitBreaker) -> None:
        self.store = store
        base = f"{store.prefix}cb:{{{breaker.name}}}"
        self._keys = [base, f"{base}:w", f"{base}:p"]
        us = 1e6
        settings = [
            _num(-1 if breaker.failure_rate is None else breaker.failure_rate),
            str(breaker.min_calls),
            str(breaker.consecutive_failures or 0),
            _num(-1 if breaker.slow_call_duration is None else breaker.slow_call_rate),
            str(int(breaker.window * us)),
            str(BUCKETS),
            str(breaker.window_calls or 0),
            str(int(breaker.open_for * us)),
            _num(breaker.open_for_multiplier),
            str(int(breaker.max_open_for * us)),
            str(breaker.half_open_probes),
            str(int(store.probe_lease * us)),
            str(store._key_ttl_ms(breaker.window, breaker.max_open_for, store.probe_lease)),
        ]
        self._args = ",".join(settings)
        self._id = uuid.uuid4().hex[:12]
        self._count = itertools.count()
        #: Probe claims held by this process in the current half-open episode.
        self.claims: list[str] = []
        self.generation = -1
        self.staleness = store.staleness
        self.synced_at = float("-inf")

    def new_claim(self) -> str:
        """A claim id unique across the fleet."""
        return f"{self._id}:{next(self._count)}"

    def _argv(self, op: str, claim: str, failed: bool, slow: bool) -> list[Any]:
        return [op, claim, "1" if failed else "0", "1" if slow else "0", self._args]

    def call(
        self, op: str, claim: str = "", failed: bool = False, slow: bool = False
    ) -> BreakerReply | None:
        """Run ``op`` ("acquire", "peek", "record", "release", "reset", "open"); None if unavailable."""
        raw = self.store._run("breaker", self._keys, self._argv(op, claim, failed, slow))
        return None if raw is None else _breaker_reply(raw)

    async def call_async(
        self, op: str, claim: str = "", failed: bool = False, slow: bool = False
    ) -> BreakerReply | None:
        """`call` without blocking the event loop."""
        raw = await self.store._run_async(
            "breaker", self._keys, self._argv(op, claim, failed, slow)
        )
        return None if raw is None else _breaker_reply(raw)


class BudgetHandle:
    """One budget's link to its shared token buckets. Used by `RetryBudget`."""

    __slots__ = ("_args", "_keys", "flush_calls", "flush_interval", "store")

    def __init__(self, store: RedisStore, budget: RetryBudget) -> None:
        self.store = store
        self._keys = [f"{store.prefix}rb:{{{budget.name}}}"]
        self._args = [
            _num(budget.min_per_second * budget.ttl),
            str(int(budget.ttl * 1e6)),
            str(BUCKETS),
            str(store._key_ttl_ms(budget.ttl)),
        ]
        self.flush_calls = store.flush_calls
        self.flush_interval = store.flush_interval

    def _argv(self, tokens: float, want: bool) -> list[Any]:
        return [_num(tokens), "1" if want else "0", *self._args]

    def take(self, tokens: float, want: bool) -> tuple[bool, float] | None:
        """Add ``tokens``, and take one if ``want`` and there is one: (granted, balance left)."""
        raw = self.store._run("budget", self._keys, self._argv(tokens, want))
        return None if raw is None else _budget_reply(raw)

    async def take_async(self, tokens: float, want: bool) -> tuple[bool, float] | None:
        """`take` without blocking the event loop."""
        raw = await self.store._run_async("budget", self._keys, self._argv(tokens, want))
        return None if raw is None else _budget_reply(raw)
