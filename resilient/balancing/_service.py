"""A logical service: its discovery, its replicas' live state, ejection and panic mode.

The list of replicas is immutable and rebuilt only when discovery's snapshot version changes; a
replica is the same object, with its state (breaker, latency, counts, requests in flight), across
rebuilds while its URL stays (a new weight, zone or priority included), and a URL listed twice is
one replica.
Replicas are grouped in tiers — by SRV priority, then the client's zone first — and a pick uses the
first tier that has a usable replica.

Passive ejection is a breaker per replica: while it is open the replica is skipped, and once its
open time is over the next pick of it is the half-open probe. At most ``max_ejection`` of the
replicas may be out (ejected or unhealthy): beyond that the service is in panic mode and the
balancer ignores health, because sending to a maybe-bad replica beats refusing every request
(Envoy's panic threshold, Finagle's ``maxEffort``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from resilient._clock import Clock
from resilient.balancing._balancers import Balancer, PowerOfTwo
from resilient.balancing._replica import LatencyWindow, Replica
from resilient.balancing.health import HealthCheck, HealthChecker
from resilient.discovery._base import Discovery, Endpoint
from resilient.events import CircuitStateChanged, Event, Hook
from resilient.policies._common import check_fraction
from resilient.policies.breaker import CircuitBreaker

__all__ = ["ReplicaStatistics", "Service", "ServiceRuntime", "default_replica_breaker"]


def default_replica_breaker(name: str, clock: Clock, hooks: Sequence[Hook]) -> CircuitBreaker:
    """The breaker that ejects a replica: 5 failures in a row, or 30 % of its last 20 calls
    (with at least 10 made).

    Ejection lasts 5 s and doubles on each failed probe, up to 60 s. A count window, not a time
    window: a fleet may have thousands of replicas, and it is a fifth of the memory.
    """
    return CircuitBreaker(
        name=name,
        consecutive_failures=5,
        failure_rate=0.3,
        min_calls=10,
        window_calls=20,
        open_for=5.0,
        clock=clock,
        hooks=hooks,
    )


class _BreakerLink:
    """Which URL a replica breaker belongs to, and the breaker itself (set once it exists)."""

    __slots__ = ("breaker", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self.breaker: CircuitBreaker | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """How to reach one logical service: where its replicas are, and how to choose among them.

    ``balancer`` defaults to `PowerOfTwo`; ``zone`` is the client's zone (replicas there are
    preferred while any is usable); ``tls_server_name`` makes requests carry that name as ``Host``
    and in TLS (SNI and certificate checks) instead of each replica's address; ``max_ejection`` is
    the share of replicas that may be ejected before panic mode; ``breaker`` builds a replica's
    breaker from its name (``"service/host:port"``).

    Example::

        rs.ResilientTransport(services={
            "orders": rs.balancing.Service(
                discovery=rs.discovery.DNS("_http._tcp.orders.internal"),
                balancer=rs.balancing.LeastRequests(),
                zone="eu-west-1a",
            ),
        })
    """

    discovery: Discovery
    balancer: Balancer | None = None
    zone: str | None = None
    tls_server_name: str | None = None
    max_ejection: float = 0.5
    breaker: Callable[[str], CircuitBreaker] | None = None
    service_breaker: CircuitBreaker | Literal["default"] | None = "default"
    health_check: HealthCheck | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.discovery, Discovery):
            raise ValueError(f"discovery must be a discovery source, got {self.discovery!r}")
        check_fraction("max_ejection", self.max_ejection, allow_zero=True)
        if self.balancer is not None and not callable(getattr(self.balancer, "pick", None)):
            raise ValueError(
                f"balancer must be a Balancer (with a pick method), got {self.balancer!r}"
            )
        for name in ("zone", "tls_server_name"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        if self.breaker is not None and not callable(self.breaker):
            raise ValueError(
                f"breaker must build a CircuitBreaker from a name (a callable), got {self.breaker!r}"
            )
        if self.service_breaker not in (None, "default") and not isinstance(
            self.service_breaker, CircuitBreaker
        ):
            raise ValueError(
                f"service_breaker must be a CircuitBreaker, None or 'default', "
                f"got {self.service_breaker!r}"
            )
        if self.health_check is not None and not isinstance(self.health_check, HealthCheck):
            raise ValueError(f"health_check must be a HealthCheck, got {self.health_check!r}")


@dataclass(frozen=True, slots=True)
class ReplicaStatistics:
    """One replica as `ResilientTransport.statistics` reports it.

    ``state`` is ``"healthy"``, ``"ejected"``, ``"half_open"`` (ejection over, next pick probes it)
    or ``"unhealthy"`` (active health checks); ``breaker`` is its breaker's own state.

    Example::

        [s.state for s in transport.statistics()["orders"]]  # ["healthy", "ejected", "healthy"]
    """

    url: str
    state: str
    in_flight: int
    ewma_ms: float
    successes: int
    failures: int
    breaker: str


class ServiceRuntime:
    """The live state of one `Service` inside a transport: replicas, tiers, ejection, panic.

    Example::

        runtime = ServiceRuntime("orders", service, clock=rs.SystemClock(), hooks=(),
                                 default_breaker=default_replica_breaker)
        replica = runtime.pick(tried=())
    """

    def __init__(
        self,
        name: str,
        service: Service,
        *,
        clock: Clock,
        hooks: Sequence[Hook],
        default_breaker: Callable[[str, Clock, Sequence[Hook]], CircuitBreaker],
        learn: Callable[[LatencyWindow], float | None] | None = None,
    ) -> None:
        self.name = name
        self.service = service
        self.balancer: Balancer = service.balancer or PowerOfTwo()
        self.clock = clock
        self.hooks = tuple(hooks)
        self._default_breaker = default_breaker
        self._lock = threading.Lock()
        self.version = -1
        self.replicas: tuple[Replica, ...] = ()
        self.tiers: tuple[tuple[Replica, ...], ...] = ()
        self.down = 0
        self._tier_of: dict[str, int] = {}
        self._tier_down: list[int] = []
        self._layout: tuple[tuple[tuple[Replica, ...], ...], list[int]] = ((), [])
        self.latency = LatencyWindow(learn=learn)  # what the transport learns its hedge delay from
        self._by_url: dict[str, Replica] = {}
        spec = service.service_breaker
        self.breaker: CircuitBreaker | None = (
            CircuitBreaker(name=f"service:{name}", clock=clock, hooks=self.hooks)
            if spec == "default"
            else spec
            if isinstance(spec, CircuitBreaker)
            else None
        )
        self.health: HealthChecker | None = None
        self._health_started = False
        if service.health_check is not None:
            self.health = HealthChecker(service.health_check, on_change=self._health_changed)

    # -- membership ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rebuild the replica list if discovery has a new snapshot (cheap when it has not)."""
        snapshot = self.service.discovery.current()
        if snapshot.version == self.version:
            return
        with self._lock:
            if snapshot.version != self.version:
                self._rebuild(snapshot.endpoints)
                self.version = snapshot.version

    def _make_breaker(self, replica: Replica) -> CircuitBreaker:
        name = f"{self.name}/{replica.name}"
        link = _BreakerLink(replica.url)
        hook = functools.partial(self._breaker_event, link)
        if self.service.breaker is not None:
            breaker = self.service.breaker(name)
            object.__setattr__(breaker, "hooks", (*breaker.hooks, hook, *self.hooks))
        else:
            breaker = self._default_breaker(name, self.clock, (hook, *self.hooks))
        link.breaker = breaker
        return breaker

    def _rebuild(self, endpoints: Iterable[Endpoint]) -> None:
        old = self._by_url
        replicas: list[Replica] = []
        by_url: dict[str, Replica] = {}
        for endpoint in endpoints:
            if endpoint.url in by_url:
                # Listed twice (a restarted server's old ZooKeeper node still alive, two SRV
                # targets on one address): one server, one replica, as first listed. Two would
                # share its load twice over, and only one of them could be ejected.
                continue
            replica = old.get(endpoint.url)
            if replica is None:
                replica = Replica(endpoint)
                replica.breaker = self._make_breaker(replica)
            elif replica.endpoint != endpoint:
                # Same URL, new weight, zone or priority: the same replica, so that what it has
                # learned and the requests in flight to it stay with it.
                replica.endpoint = endpoint
            replicas.append(replica)
            by_url[endpoint.url] = replica
        zone = self.service.zone
        groups: dict[tuple[int, bool], list[Replica]] = {}
        for replica in replicas:
            key = (replica.endpoint.priority, zone is not None and replica.endpoint.zone != zone)
            groups.setdefault(key, []).append(replica)
        tiers = tuple(tuple(groups[key]) for key in sorted(groups))
        tier_down = [sum(1 for r in tier if r.ejected or r.unhealthy) for tier in tiers]
        self.replicas = tuple(replicas)
        self._by_url = by_url
        self.tiers = tiers
        self._tier_of = {r.url: i for i, tier in enumerate(tiers) for r in tier}
        self._tier_down = tier_down
        # What `pick` reads, unlocked, in one attribute: a rebuild between reads of `tiers` and
        # `_tier_down` could leave it indexing one list with the other's positions.
        self._layout = (tiers, tier_down)
        self.down = sum(tier_down)
        if self.health is not None:
            self.health.update(r.endpoint for r in replicas)

    # -- ejection and health ------------------------------------------------------------------------

    def _breaker_event(self, link: _BreakerLink, event: Event) -> None:
        if not isinstance(event, CircuitStateChanged):
            return
        with self._lock:
            # The replica listed now for this URL, if this breaker is still its breaker: a
            # replica whose weight changed keeps it; a removed one's breaker is moot.
            replica = self._by_url.get(link.url)
            if replica is None or replica.breaker is not link.breaker:
                return
            was_down = replica.ejected or replica.unhealthy
            if event.new == "open":
                replica.ejected = True
                replica.ejected_until = self.clock.monotonic() + (event.open_for or 0.0)
            elif event.new == "closed":
                replica.ejected = False
                replica.ejected_until = 0.0
            self._count(replica, was_down)

    def probe_refused(self, replica: Replica, wait: float) -> None:
        """``replica``'s ejection time is over but its breaker refused the probe (another process
        holds the probe of a breaker shared through a store, or it was opened by hand): it stays
        out of the choice ``wait`` seconds more. Idle past its time it costs nothing
        (`Replica.cost`), and every pick would draw it only to be refused."""
        with self._lock:
            if replica.ejected:
                replica.ejected_until = max(replica.ejected_until, self.clock.monotonic() + wait)

    def _health_changed(self, url: str, old: str, new: str) -> None:
        self.set_health(url, new == "unhealthy")

    def close(self) -> None:
        """Stop health checks and the discovery source."""
        if self.health is not None:
            self.health.close()
        self.service.discovery.close()

    def set_health(self, url: str, unhealthy: bool) -> None:
        """Active health checks say ``url`` is (un)healthy."""
        with self._lock:
            replica = self._by_url.get(url)
            if replica is None:
                return
            was_down = replica.ejected or replica.unhealthy
            replica.unhealthy = unhealthy
            self._count(replica, was_down)

    def _count(self, replica: Replica, was_down: bool) -> None:
        if self._by_url.get(replica.url) is not replica:
            return
        down = replica.ejected or replica.unhealthy
        if down != was_down:
            step = 1 if down else -1
            self.down += step
            self._tier_down[self._tier_of[replica.url]] += step

    @property
    def panic(self) -> bool:
        """More replicas are out than ``max_ejection`` allows: health is ignored."""
        return self.down > self.service.max_ejection * len(self.replicas)

    # -- picking ------------------------------------------------------------------------------------

    def pick(self, tried: Collection[Replica]) -> Replica | None:
        """A replica for the next attempt, preferring ones this request has not tried."""
        self.refresh()
        if not self.replicas:
            return None
        if self.health is not None and not self._health_started:
            self._start_health()
        now = self.clock.monotonic()
        balancer = self.balancer
        # Tiers in order of preference; a tier with too many replicas out spills its load over to
        # the next, and only when no tier has a usable replica does the first panicking tier take
        # it, ignoring health (Envoy's per-priority panic).
        panicking: list[tuple[Replica, ...]] = []
        tiers, tier_down = self._layout
        max_ejection = self.service.max_ejection
        for index, tier in enumerate(tiers):
            if tier_down[index] > max_ejection * len(tier):  # the tier panics
                panicking.append(tier)
                continue
            replica = balancer.pick(tier, tried, False, now)
            if replica is not None:
                return replica
        for tier in panicking:  # in order of preference, each before going round again
            replica = balancer.pick(tier, tried, True, now)
            if replica is not None:
                return replica
        if tried:  # every replica has been tried: go round again rather than give up
            return self.pick(())
        return None

    def _start_health(self) -> None:
        # Heartbeats run in the checker's own thread for sync and async clients alike: a
        # transport owns no task group to start a task in (see HealthChecker.run for that).
        with self._lock:
            if self._health_started or self.health is None:
                return
            self._health_started = True
        self.health.start_thread()

    def statistics(self) -> list[ReplicaStatistics]:
        now = self.clock.monotonic()
        out = []
        for r in self.replicas:
            breaker = r.breaker.state if r.breaker is not None else "closed"
            if r.unhealthy:
                state = "unhealthy"
            elif breaker == "half_open" or (r.ejected and r.ejected_until <= now):
                state = "half_open"
            elif r.ejected:
                state = "ejected"
            else:
                state = "healthy"
            out.append(
                ReplicaStatistics(
                    r.url, state, r.in_flight, r.ewma * 1000.0, r.successes, r.failures, breaker
                )
            )
        return out
