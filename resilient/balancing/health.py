"""Active health checks: probe every replica's ``/health`` on a schedule, as Envoy does.

A `HealthChecker` tracks a set of endpoints and keeps one status per URL::

    healthy   ──(a probe fails, or phi > phi_threshold)──────────────► suspect
    suspect   ──(a probe succeeds)───────────────────────────────────► healthy
    suspect   ──(unhealthy_threshold failed probes in a row)─────────► unhealthy
    unhealthy ──(healthy_threshold successful probes in a row)───────► healthy

(With ``unhealthy_threshold=1`` a failed probe moves healthy straight to unhealthy.)

- **healthy**: in rotation. New endpoints start here — *assume healthy until proven otherwise* — so
  a replica that discovery just found takes traffic at once and a health checker that cannot reach
  anything (a broken network path, a wrong ``path``) degrades to "no health checking", never to
  "no replicas".
- **suspect**: still usable, but the balancer should prefer others: the last probe failed (a
  failure streak still below ``unhealthy_threshold``) or, with ``phi_threshold`` set, the next
  successful heartbeat is overdue (phi accrual). Suspicion never ejects by itself; only the
  thresholds do, so one slow probe cannot take a replica out of rotation.
- **unhealthy**: out of rotation until ``healthy_threshold`` consecutive probes succeed.

The decisions are sans-IO: `ProbeScheduler` says which endpoints are due at time ``t`` and when to
wake next, and the checker's state machine turns probe outcomes into statuses. Two thin runners do
the I/O, both on the same scheduler: `HealthChecker.start_thread` (a daemon thread and an
``httpx.Client``) and `HealthChecker.run` (a task for anyio's task group, asyncio or trio, with an
``httpx.AsyncClient``). `HealthChecker.poll` is one synchronous step, for tests on a fake clock.

Readers never lock: `HealthChecker.status` is one dictionary lookup in an immutable mapping that
the checker replaces (copy on write) at every change, and `HealthChecker.version` grows by one
each time, so a balancer can cache what it derives from the statuses and rebuild on a new version.
"""

from __future__ import annotations

import logging
import math
import random as _random
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from statistics import NormalDist
from types import MappingProxyType, TracebackType
from typing import Any, Literal

import anyio
import httpx

from resilient._clock import Clock
from resilient.discovery._base import Endpoint
from resilient.policies._common import check_count, check_positive, resolve_clock
from resilient.telemetry import _clean, redact

__all__ = [
    "EndpointHealth",
    "HealthCheck",
    "HealthChecker",
    "HealthStatus",
    "ProbeScheduler",
    "phi_accrual",
]

_log = logging.getLogger("resilient.health")

HealthStatus = Literal["healthy", "unhealthy", "suspect"]
"""What a `HealthChecker` says of an endpoint; anything but ``"unhealthy"`` is in rotation."""

HEALTHY: HealthStatus = "healthy"
SUSPECT: HealthStatus = "suspect"
UNHEALTHY: HealthStatus = "unhealthy"

#: At most this many probes run at once in the thread runner (a frozen replica holds one for up to
#: ``timeout`` seconds; the others must not wait behind it).
_PROBE_THREADS = 8
_USER_AGENT = "resilient-healthcheck"


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheck:
    """How to probe replicas and when to change their status (Envoy's active health check model).

    Every endpoint's ``url + path`` is fetched with GET every ``interval`` seconds, ± a uniform
    ``jitter`` fraction of it (so replicas are not probed in lockstep), counted from the end of the
    previous probe; ``timeout`` bounds each phase of a probe (connect, write, read) as httpx does.
    A probe succeeds when the status is in ``expected_statuses``; anything else, an error or a
    timeout, fails. ``unhealthy_threshold`` failures in a row mark the endpoint unhealthy;
    ``healthy_threshold`` successes in a row bring it back.

    With ``phi_threshold`` set, the phi accrual failure detector (Hayashibara et al.; Akka,
    Cassandra) also watches the time since the last successful probe against the history of
    intervals between successful probes (the last ``phi_window``, standard deviation at least
    ``phi_min_stddev`` seconds); when phi exceeds the threshold, a healthy endpoint becomes
    *suspect* (never unhealthy: the thresholds alone eject). Akka uses 8 and 0.1 s.

    Example::

        check = HealthCheck(path="/healthz", interval=2.0, timeout=0.5, unhealthy_threshold=2)
        checker = HealthChecker(check)
        checker.update(snapshot.endpoints)
        checker.start_thread()
    """

    path: str = "/health"
    interval: float = 5.0
    jitter: float = 0.1
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_statuses: AbstractSet[int] = frozenset(range(200, 300))
    phi_threshold: float | None = None
    phi_window: int = 100
    phi_min_stddev: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ValueError(f"path must be a string starting with '/', got {self.path!r}")
        check_positive("interval", self.interval)
        if (
            not isinstance(self.jitter, (int, float))
            or isinstance(self.jitter, bool)
            or not 0 <= self.jitter < 1
        ):
            raise ValueError(f"jitter must satisfy 0 <= jitter < 1, got {self.jitter!r}")
        check_positive("timeout", self.timeout)
        check_count("healthy_threshold", self.healthy_threshold)
        check_count("unhealthy_threshold", self.unhealthy_threshold)
        statuses: object = self.expected_statuses
        if (
            isinstance(statuses, (str, bytes))
            or not isinstance(statuses, Iterable)
            or not statuses
            or not all(
                isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in statuses
            )
        ):
            raise ValueError(
                f"expected_statuses must be a non-empty set of HTTP statuses (100..599), "
                f"got {statuses!r}"
            )
        object.__setattr__(self, "expected_statuses", frozenset(statuses))
        if self.phi_threshold is not None:
            check_positive("phi_threshold", self.phi_threshold)
            if 10.0**-self.phi_threshold <= 0.0:
                raise ValueError(
                    f"phi_threshold must be at most about 300 (a probability of 10**-phi "
                    f"must be representable), got {self.phi_threshold!r}"
                )
        check_count("phi_window", self.phi_window)
        check_positive("phi_min_stddev", self.phi_min_stddev)


def phi_accrual(elapsed: float, mean: float, stddev: float) -> float:
    """Phi: how sure we are that a heartbeat ``elapsed`` seconds overdue is not coming.

    ``phi = -log10(1 - F(elapsed))`` with ``F`` the normal CDF of the inter-arrival times (``mean``,
    ``stddev``). Phi 1 means a 10 % chance the endpoint is fine and just late, phi 2 a 1 % chance,
    and so on; ``math.inf`` when the chance underflows.

    Example::

        phi_accrual(1.0, mean=1.0, stddev=0.1)  # 0.301: as late as usual, -log10(0.5)
        phi_accrual(1.2, mean=1.0, stddev=0.1)  # 1.643: two standard deviations late
    """
    if not stddev > 0:
        raise ValueError(f"stddev must be > 0, got {stddev!r}")
    # 1 - F(x) through erfc keeps its precision far into the tail, where 1 - (1 + erf) / 2 is 0.
    p_later = 0.5 * math.erfc((elapsed - mean) / (stddev * math.sqrt(2.0)))
    if p_later <= 0.0:
        return math.inf
    return -math.log10(p_later) + 0.0  # + 0.0: never -0.0


class ProbeScheduler:
    """Sans-IO probe timing: which endpoints are due at time ``t``, and when to wake next.

    An added key is due at once (its first probe). `due` hands out the keys whose time has come and
    marks them in flight: an in-flight key is never due again until `done` reports its probe
    finished, which schedules the next one ``interval × (1 ± jitter)`` later (uniform, drawn from
    ``random()`` in [0, 1)). `abandon` puts an in-flight key back, due at once, when its probe was
    cancelled. Not thread-safe: its owner serializes calls.

    Example::

        scheduler = ProbeScheduler(interval=10.0, jitter=0.1, random=lambda: 0.0)
        scheduler.add("http://a", now=0.0)
        assert scheduler.due(0.0) == ["http://a"] and scheduler.next_wakeup() is None
        assert scheduler.done("http://a", now=0.3) == 9.3  # 0.3 + 10 × (1 - 0.1)
        assert scheduler.due(9.0) == [] and scheduler.next_wakeup() == 9.3
    """

    __slots__ = ("_due", "_in_flight", "_random", "interval", "jitter")

    def __init__(
        self, interval: float, jitter: float = 0.0, *, random: Callable[[], float] | None = None
    ) -> None:
        check_positive("interval", interval)
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must satisfy 0 <= jitter < 1, got {jitter!r}")
        self.interval = float(interval)
        self.jitter = float(jitter)
        self._random = random or _random.random
        self._due: dict[str, float] = {}
        self._in_flight: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"ProbeScheduler(interval={self.interval!r}, jitter={self.jitter!r}, "
            f"keys={len(self._due)}, in_flight={len(self._in_flight)})"
        )

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def add(self, key: str, now: float) -> None:
        """Track ``key``, first due at ``now``. A key already tracked keeps its schedule."""
        self._due.setdefault(key, now)

    def discard(self, key: str) -> None:
        """Forget ``key`` (a later `done` for it is ignored)."""
        self._due.pop(key, None)
        self._in_flight.discard(key)

    def due(self, now: float) -> list[str]:
        """The keys due at ``now`` that are not in flight, earliest first; they are in flight now."""
        ready = sorted(
            (t, key) for key, t in self._due.items() if t <= now and key not in self._in_flight
        )
        keys = [key for _, key in ready]
        self._in_flight.update(keys)
        return keys

    def done(self, key: str, now: float) -> float | None:
        """``key``'s probe finished at ``now``: schedule the next; return its time (None: unknown)."""
        if key not in self._in_flight:
            return None
        self._in_flight.discard(key)
        when = now + self.next_interval()
        self._due[key] = when
        return when

    def abandon(self, key: str) -> None:
        """``key``'s probe was cancelled without an outcome: due again at once."""
        self._in_flight.discard(key)

    def in_flight(self) -> frozenset[str]:
        """The keys handed out by `due` and not yet `done` or abandoned."""
        return frozenset(self._in_flight)

    def next_interval(self) -> float:
        """One interval with jitter: ``interval × (1 + jitter × (2u - 1))``, ``u = random()``."""
        return self.interval * (1.0 + self.jitter * (2.0 * self._random() - 1.0))

    def next_wakeup(self) -> float | None:
        """The earliest due time of a key not in flight; None when there is none."""
        times = [t for key, t in self._due.items() if key not in self._in_flight]
        return min(times) if times else None


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointHealth:
    """What a `HealthChecker` knows of one endpoint, as `HealthChecker.statistics` reports it.

    Times are readings of the checker's clock; ``changed_at`` is when the status last changed (or
    the endpoint was added); ``last_error`` describes the last failed probe.

    Example::

        for url, health in checker.statistics().items():
            print(url, health.status, f"phi={health.phi:.1f}", health.last_error or "")
    """

    url: str
    status: HealthStatus
    consecutive_successes: int
    consecutive_failures: int
    probes: int
    failures: int
    phi: float
    changed_at: float
    last_probe_at: float | None
    last_success_at: float | None
    last_error: str | None


class _Tracker:
    """One endpoint's runtime state; written under the checker's lock only."""

    __slots__ = (
        "auth",
        "changed_at",
        "endpoint",
        "failures",
        "last_error",
        "last_probe_at",
        "last_success_at",
        "phi_params",
        "probe_url",
        "probes",
        "sample_from",
        "samples",
        "status",
        "streak_failures",
        "streak_successes",
        "suspect_after",
        "url",
    )

    def __init__(self, endpoint: Endpoint, check: HealthCheck, now: float) -> None:
        self.endpoint = endpoint
        self.url = endpoint.url
        # Userinfo goes as Basic auth, not in the URL: httpx logs the URLs it requests.
        url = httpx.URL(endpoint.url.rstrip("/") + check.path)
        self.auth: Any = httpx.USE_CLIENT_DEFAULT
        if url.userinfo:
            self.auth = httpx.BasicAuth(url.username, url.password)
            url = url.copy_with(username=None, password=None)
        self.probe_url = str(url)
        self.status: HealthStatus = HEALTHY
        self.changed_at = now
        self.streak_successes = 0
        self.streak_failures = 0
        self.probes = 0
        self.failures = 0
        self.last_probe_at: float | None = None
        self.last_success_at: float | None = None
        self.last_error: str | None = None
        # Akka's first-heartbeat estimate: two samples at interval ± interval / 4, which leave the
        # window as real ones arrive, so the first few real gaps do not make phi overconfident.
        spread = check.interval / 4.0
        self.samples: deque[float] = deque(
            (check.interval - spread, check.interval + spread), maxlen=check.phi_window
        )
        # Being added counts as a heartbeat for phi, but not as the start of a sample.
        self.sample_from: float | None = None
        # (last arrival, mean, stddev): one tuple, so phi() reads a consistent set without a lock.
        self.phi_params = (now, 0.0, 1.0)
        self.suspect_after = math.inf


class HealthChecker:
    """Probe a set of endpoints in the background and say, in O(1), which are healthy.

    ``update(endpoints)`` sets the endpoints to watch: new ones start healthy and are probed at
    once, removed ones are forgotten (a probe in flight for them is ignored). ``status(url)``
    reads the current status without a lock ("healthy" for a URL it does not track: assume healthy
    until proven otherwise); ``version`` grows at every status or membership change.
    ``on_change(url, old, new)`` is called once per transition, in order, from the runner (a probe
    thread or the event loop): keep it fast; what it raises is logged and ignored.

    Probes use an httpx client the checker owns, with the check's timeout and no proxy from the
    environment; ``transport=`` replaces the client's transport (an ``httpx.MockTransport`` in
    tests). Time and randomness come from ``clock`` and ``random``.

    Example (threads)::

        with HealthChecker(HealthCheck(interval=2.0)) as checker:
            checker.update(discovery.current().endpoints)
            checker.start_thread()
            ...
            usable = [e for e in endpoints if checker.status(e.url) != "unhealthy"]

    Example (asyncio or trio)::

        checker = HealthChecker(HealthCheck(interval=2.0))
        checker.update(endpoints)
        async with anyio.create_task_group() as tg:
            tg.start_soon(checker.run)
            ...
            tg.cancel_scope.cancel()  # stops the checker
    """

    def __init__(
        self,
        check: HealthCheck,
        *,
        clock: Clock | None = None,
        random: Callable[[], float] | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        on_change: Callable[[str, HealthStatus, HealthStatus], object] | None = None,
    ) -> None:
        if not isinstance(check, HealthCheck):
            raise ValueError(f"check must be a HealthCheck, got {check!r}")
        if transport is not None and not isinstance(
            transport, (httpx.BaseTransport, httpx.AsyncBaseTransport)
        ):
            raise ValueError(f"transport must be an httpx transport, got {transport!r}")
        if on_change is not None and not callable(on_change):
            raise ValueError(f"on_change must be callable, got {on_change!r}")
        self.check = check
        self._clock = resolve_clock(clock)
        self._transport = transport
        self._on_change = on_change
        self._scheduler = ProbeScheduler(check.interval, check.jitter, random=random)
        # Crossing phi_threshold means elapsed > mean + z × stddev: computed once per heartbeat,
        # so the runner can wake exactly then instead of evaluating phi continuously.
        self._z = (
            None
            if check.phi_threshold is None
            else -NormalDist().inv_cdf(10.0**-check.phi_threshold)
        )
        self._lock = threading.Lock()
        # Copy on write: readers take the current dict in one attribute read, writers replace it.
        self._trackers: dict[str, _Tracker] = {}
        self._view: tuple[int, Mapping[str, HealthStatus]] = (0, MappingProxyType({}))
        self._pending: deque[tuple[str, HealthStatus, HealthStatus]] = deque()
        self._notify_lock = threading.Lock()
        self._notifying: int | None = None  # the thread calling on_change now
        self._closed = False
        self._runner: str | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._async_wake: anyio.Event | None = None
        self._loop_thread: int | None = None
        self._client: httpx.Client | None = None

    def __repr__(self) -> str:
        return (
            f"<HealthChecker {len(self._trackers)} endpoint(s) version={self.version} "
            f"runner={self._runner} closed={self._closed}>"
        )

    # -- reading (no locks) -----------------------------------------------------------------------

    def status(self, url: str) -> HealthStatus:
        """The endpoint's status; "healthy" for a URL not tracked. One dict lookup, no lock.

        Example::

            if checker.status(endpoint.url) == "unhealthy":
                ...  # skip it
        """
        return self._view[1].get(url, HEALTHY)

    def statuses(self) -> Mapping[str, HealthStatus]:
        """Every tracked URL's status: an immutable mapping, consistent with one `version`.

        Example::

            statuses = checker.statuses()
            down = [url for url, s in statuses.items() if s == "unhealthy"]
        """
        return self._view[1]

    @property
    def version(self) -> int:
        """Grows by one at every status change and every change of the tracked set.

        Example::

            if checker.version != cached_version:
                rebuild()
        """
        return self._view[0]

    def phi(self, url: str) -> float:
        """Phi accrual suspicion of the endpoint now (0.0 for a URL not tracked).

        Computed from the intervals between its recent successful probes; the window starts with
        two samples at ``interval`` ± ``interval / 4`` (Akka's first-heartbeat estimate), and being
        added counts as the first heartbeat.

        Example::

            if checker.phi(url) > 8: ...  # almost surely down, or partitioned away
        """
        tracker = self._trackers.get(url)
        if tracker is None:
            return 0.0
        last, mean, stddev = tracker.phi_params
        return phi_accrual(self._clock.monotonic() - last, mean, stddev)

    def statistics(self) -> dict[str, EndpointHealth]:
        """A snapshot of every tracked endpoint's health and probe counts, by URL.

        Example::

            stats = checker.statistics()
            assert stats[url].consecutive_failures == 0
        """
        now = self._clock.monotonic()
        with self._lock:
            return {
                url: EndpointHealth(
                    url=url,
                    status=t.status,
                    consecutive_successes=t.streak_successes,
                    consecutive_failures=t.streak_failures,
                    probes=t.probes,
                    failures=t.failures,
                    phi=phi_accrual(now - t.phi_params[0], t.phi_params[1], t.phi_params[2]),
                    changed_at=t.changed_at,
                    last_probe_at=t.last_probe_at,
                    last_success_at=t.last_success_at,
                    last_error=t.last_error,
                )
                for url, t in self._trackers.items()
            }

    # -- membership ---------------------------------------------------------------------------------

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        """Watch exactly these endpoints: add the new ones (healthy), forget the removed ones.

        Kept endpoints keep their state (and take the new ``Endpoint`` object, e.g. a new weight).
        No ``on_change`` is called for additions or removals.

        Example::

            checker.update(discovery.current().endpoints)
        """
        wanted: dict[str, Endpoint] = {}
        for endpoint in endpoints:
            if not isinstance(endpoint, Endpoint):
                raise TypeError(f"endpoints must be Endpoint objects, got {endpoint!r}")
            wanted[endpoint.url] = endpoint
        now = self._clock.monotonic()
        with self._lock:
            old = self._trackers
            if wanted.keys() == old.keys():
                for url, endpoint in wanted.items():
                    old[url].endpoint = endpoint
                return
            trackers: dict[str, _Tracker] = {}
            for url, endpoint in wanted.items():
                tracker = old.get(url)
                if tracker is None:
                    tracker = _Tracker(endpoint, self.check, now)
                    self._estimate(tracker, now)  # being added counts as the first heartbeat
                    self._scheduler.add(url, now)
                else:
                    tracker.endpoint = endpoint
                trackers[url] = tracker
            for url in old.keys() - wanted.keys():
                self._scheduler.discard(url)
            self._trackers = trackers
            self._publish()
        self._kick()

    # -- the state machine (sans-IO; the caller holds no lock) -------------------------------------

    def _begin(self, now: float) -> tuple[list[_Tracker], float | None]:
        """Apply phi suspicions due by ``now``; hand out the probes due; return the next wake-up."""
        with self._lock:
            changed = False
            if self._z is not None:
                for tracker in self._trackers.values():
                    if tracker.status == HEALTHY and now >= tracker.suspect_after:
                        self._move(tracker, SUSPECT, now, "phi above the threshold")
                        changed = True
            due = [self._trackers[url] for url in self._scheduler.due(now)]
            wake = self._next_wakeup_locked()
            if changed:
                self._publish()
        if changed:
            self._notify()
        return due, wake

    def _finish(self, tracker: _Tracker, error: str | None, now: float) -> None:
        """Record one probe's outcome (``error`` None: success) for ``tracker``."""
        check = self.check
        with self._lock:
            if self._trackers.get(tracker.url) is not tracker:
                return  # forgotten (perhaps re-added) while the probe was in flight
            self._scheduler.done(tracker.url, now)
            tracker.probes += 1
            tracker.last_probe_at = now
            new: HealthStatus | None = None
            if error is None:
                tracker.streak_successes += 1
                tracker.streak_failures = 0
                self._heartbeat(tracker, now)
                if tracker.status == SUSPECT or (
                    tracker.status == UNHEALTHY
                    and tracker.streak_successes >= check.healthy_threshold
                ):
                    new = HEALTHY
            else:
                tracker.streak_failures += 1
                tracker.streak_successes = 0
                tracker.failures += 1
                tracker.last_error = error
                tracker.sample_from = None  # a gap spanning a failure is an outage, not a sample
                if tracker.status != UNHEALTHY:
                    new = (
                        UNHEALTHY
                        if tracker.streak_failures >= check.unhealthy_threshold
                        else SUSPECT
                    )
            if new is not None and new != tracker.status:
                self._move(tracker, new, now, error)
                self._publish()
            else:
                new = None
        if new is not None:
            self._notify()

    def _heartbeat(self, tracker: _Tracker, now: float) -> None:
        tracker.last_success_at = now
        if tracker.sample_from is not None:
            tracker.samples.append(now - tracker.sample_from)
        tracker.sample_from = now
        self._estimate(tracker, now)

    def _estimate(self, tracker: _Tracker, last: float) -> None:
        """Refresh the phi parameters (and the phi deadline) after a heartbeat at ``last``."""
        samples = tracker.samples
        mean = math.fsum(samples) / len(samples)
        stddev = math.sqrt(math.fsum((x - mean) ** 2 for x in samples) / len(samples))
        stddev = max(stddev, self.check.phi_min_stddev)
        tracker.phi_params = (last, mean, stddev)
        if self._z is not None:
            tracker.suspect_after = last + mean + self._z * stddev

    def _move(self, tracker: _Tracker, new: HealthStatus, now: float, why: str | None) -> None:
        old = tracker.status
        tracker.status = new
        tracker.changed_at = now
        self._pending.append((tracker.url, old, new))
        if new == UNHEALTHY:
            _log.warning(
                "resilient: %s is unhealthy after %d failed health check(s) (last: %s)",
                redact(tracker.url),
                tracker.streak_failures,
                _clean(str(why)),
            )
        elif old == UNHEALTHY:
            _log.info("resilient: %s is healthy again", redact(tracker.url))
        else:
            _log.debug(
                "resilient: %s %s -> %s (%s)", redact(tracker.url), old, new, _clean(str(why))
            )

    def _publish(self) -> None:
        statuses = {url: t.status for url, t in self._trackers.items()}
        self._view = (self._view[0] + 1, MappingProxyType(statuses))

    def _notify(self) -> None:
        """Call on_change for the pending transitions, in order, from one thread at a time."""
        while self._pending:
            if not self._notify_lock.acquire(blocking=False):
                return  # another thread is draining; it will see ours
            try:
                while True:
                    try:
                        url, old, new = self._pending.popleft()
                    except IndexError:
                        break
                    if self._on_change is not None:
                        self._notifying = threading.get_ident()
                        try:
                            self._on_change(url, old, new)
                        except Exception:
                            _log.exception("resilient: health on_change callback failed")
                        finally:
                            self._notifying = None
            finally:
                self._notify_lock.release()

    def _next_wakeup_locked(self) -> float | None:
        wake = self._scheduler.next_wakeup()
        if self._z is not None:
            for tracker in self._trackers.values():
                if tracker.status == HEALTHY and (wake is None or tracker.suspect_after < wake):
                    wake = tracker.suspect_after
        return wake

    def _abandon_in_flight(self) -> None:
        with self._lock:
            for url in self._scheduler.in_flight():
                self._scheduler.abandon(url)

    def _kick(self) -> None:
        """Wake the runner: the schedule changed."""
        self._wake.set()
        event = self._async_wake
        if event is not None and threading.get_ident() == self._loop_thread:
            event.set()  # from another thread the async runner notices within one interval

    def _outcome(self, response: httpx.Response) -> str | None:
        if response.status_code in self.check.expected_statuses:
            return None
        return f"status {response.status_code}"

    # -- the sync driver ---------------------------------------------------------------------------

    def poll(self) -> float | None:
        """One step, in the calling thread: probe what is due now, in turn; return the next wake-up.

        The runners do this continuously; call it yourself to drive the checker on a fake clock.

        Example::

            clock = rs.testing.FakeClock()
            checker = HealthChecker(check, clock=clock, transport=httpx.MockTransport(handler))
            checker.update(endpoints)
            wake = checker.poll()            # probes every endpoint once
            clock.advance(wake - clock.monotonic())
            checker.poll()                   # the next round
        """
        client = self._sync_client()
        due, _ = self._begin(self._clock.monotonic())
        for tracker in due:
            self._probe_sync(client, tracker)
        with self._lock:
            return self._next_wakeup_locked()

    def start_thread(self) -> HealthChecker:
        """Run the checker in a daemon thread (probes in a few worker threads); `close` stops it.

        Waiting is interruptible: `close` and `update` wake the thread at once.

        Example::

            checker = HealthChecker(HealthCheck()).start_thread()
            ...
            checker.close()  # returns once every thread it started has ended
        """
        client = self._sync_client()
        self._claim("thread")
        thread = threading.Thread(
            target=self._thread_main, args=(client,), name="resilient-health", daemon=True
        )
        self._thread = thread
        thread.start()
        return self

    def _thread_main(self, client: httpx.Client) -> None:
        pool = ThreadPoolExecutor(
            max_workers=_PROBE_THREADS, thread_name_prefix="resilient-health-probe"
        )
        try:
            while not self._closed:
                self._wake.clear()
                due, wake = self._begin(self._clock.monotonic())
                try:
                    for tracker in due:
                        pool.submit(self._probe_sync, client, tracker)
                except RuntimeError:
                    return  # the interpreter is shutting down
                timeout = None if wake is None else max(0.0, wake - self._clock.monotonic())
                self._wake.wait(timeout)
        except Exception:
            _log.exception("resilient: the health check thread failed")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._abandon_in_flight()
            self._release()
            if self._closed:  # (close() may have been called from one of these threads)
                self._close_client()

    def _probe_sync(self, client: httpx.Client, tracker: _Tracker) -> None:
        try:
            error = self._outcome(client.get(tracker.probe_url, auth=tracker.auth))
        except Exception as exc:  # any failure to answer is a failed probe
            error = f"{type(exc).__name__}: {exc}"
        self._finish(tracker, error, self._clock.monotonic())
        self._wake.set()

    def _sync_client(self) -> httpx.Client:
        with self._lock:
            if self._closed:
                raise RuntimeError("the health checker is closed")
            if self._client is None:
                transport = self._transport
                if transport is not None and not isinstance(transport, httpx.BaseTransport):
                    raise TypeError(
                        f"a sync runner needs a sync httpx transport, got {transport!r}"
                    )
                self._client = httpx.Client(
                    transport=transport,
                    timeout=self.check.timeout,
                    trust_env=False,
                    headers={"User-Agent": _USER_AGENT},
                )
            return self._client

    # -- the async driver --------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the checker in the current task until cancelled (asyncio or trio, through anyio).

        Probes run concurrently in a task group of their own, with an ``httpx.AsyncClient`` that
        lives as long as this call. Cancelling the task stops it; `close` makes it return at its
        next wake-up.

        Example::

            async with anyio.create_task_group() as tg:
                tg.start_soon(checker.run)
                ...
                tg.cancel_scope.cancel()
        """
        transport = self._transport
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError(f"run() needs an async httpx transport, got {transport!r}")
        self._claim("async")
        try:
            client = httpx.AsyncClient(
                transport=transport,
                timeout=self.check.timeout,
                trust_env=False,
                headers={"User-Agent": _USER_AGENT},
            )
            try:
                self._loop_thread = threading.get_ident()
                async with anyio.create_task_group() as tg:
                    while not self._closed:
                        self._async_wake = wake = anyio.Event()
                        due, wake_at = self._begin(self._clock.monotonic())
                        for tracker in due:
                            tg.start_soon(self._probe_async, client, tracker)
                        delay = self.check.interval
                        if wake_at is not None:
                            delay = min(delay, max(0.0, wake_at - self._clock.monotonic()))
                        await _sleep_or_wake(self._clock, delay, wake)
                    tg.cancel_scope.cancel()
            finally:
                self._async_wake = None
                self._loop_thread = None
                with anyio.CancelScope(shield=True):
                    await client.aclose()
        finally:
            self._abandon_in_flight()
            self._release()

    async def _probe_async(self, client: httpx.AsyncClient, tracker: _Tracker) -> None:
        try:
            error = self._outcome(await client.get(tracker.probe_url, auth=tracker.auth))
        except Exception as exc:  # any failure to answer is a failed probe
            error = f"{type(exc).__name__}: {exc}"
        self._finish(tracker, error, self._clock.monotonic())
        if self._async_wake is not None:
            self._async_wake.set()

    # -- lifecycle -----------------------------------------------------------------------------------

    def _claim(self, runner: str) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the health checker is closed")
            if self._runner is not None:
                raise RuntimeError(f"the health checker is already running ({self._runner})")
            self._runner = runner

    def _release(self) -> None:
        with self._lock:
            self._runner = None

    def close(self) -> None:
        """Stop the thread runner and wait for its threads; close the sync client. Idempotent.

        Returns within about ``timeout`` seconds (a probe in flight finishes first). An async
        `run` returns at its next wake-up; cancel its task to stop it at once.

        Example::

            checker.close()
            assert not any(t.name.startswith("resilient-health") for t in threading.enumerate())
        """
        with self._lock:
            self._closed = True  # (for good: a closed checker never runs again)
            thread = self._thread
        self._kick()
        if thread is not None:
            if thread is threading.current_thread() or self._notifying == threading.get_ident():
                # Called from on_change, on one of the threads the runner waits for: it stops
                # and closes the client itself once this call returns (joined here, it would
                # wait for this very thread). A close() from elsewhere still joins it.
                return
            thread.join()
        self._close_client()

    def _close_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> HealthChecker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _sleep_or_wake(clock: Clock, delay: float, wake: anyio.Event) -> None:
    """Sleep ``delay`` seconds on ``clock``, or less if ``wake`` is set first."""
    async with anyio.create_task_group() as tg:

        async def sleeper() -> None:
            await clock.sleep_async(delay)
            tg.cancel_scope.cancel()

        tg.start_soon(sleeper)
        await wake.wait()
        tg.cancel_scope.cancel()
