"""A replica as the balancer and the transport see it: its endpoint plus live load and health."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from resilient.discovery._base import Endpoint
from resilient.policies._common import check_count
from resilient.telemetry import redact

if TYPE_CHECKING:
    from resilient.policies.breaker import CircuitBreaker

__all__ = ["LatencyWindow", "Replica"]

#: Peak-EWMA decay time. Finagle and Linkerd use 10 s; here the cost also decays while a replica
#: is not chosen (see `Replica.cost`), and 2 s lets a replica that was slow once be tried again
#: within seconds instead of being starved.
DECAY_SECONDS = 2.0

#: Seconds charged per in-flight request to a replica with no measured latency yet.
UNMEASURED_PENALTY = 1.0


def _origin_swapped(
    logical: httpx.URL, scheme: str, host: str, port: int | None, prefix: str
) -> httpx.URL:
    """``logical`` on another origin, without parsing anything again.

    ``URL.copy_with`` validates and re-encodes every part (~19 µs, more than the rest of our
    work on a request), and caching its result per URL fills memory and the garbage collector's
    old generation when paths carry ids. Both URLs are parsed and valid already, so their parts
    are combined directly. This reaches into httpx's parsed form (``_uri_reference``, a named
    tuple): `_ORIGIN_SWAP_WORKS` checks it once at import, and `Replica.url_for` falls back to
    ``copy_with`` if a future httpx changes it.
    """
    ref = logical._uri_reference
    url: httpx.URL = object.__new__(httpx.URL)
    url._uri_reference = ref._replace(
        scheme=scheme, host=host, port=port, path=prefix + (ref.path or "/")
    )
    return url


def _origin_swap_works() -> bool:
    try:
        made = _origin_swapped(httpx.URL("http://a/p%20q?x=1#f"), "https", "b", 2, "/pre")
    except Exception:
        return False
    return str(made) == "https://b:2/pre/p%20q?x=1#f" and made.raw_path == b"/pre/p%20q?x=1"


_ORIGIN_SWAP_WORKS = _origin_swap_works()


class Replica:
    """One replica's live state: in-flight requests, peak-EWMA latency, outcomes, ejection.

    Balancers read ``in_flight`` and ``cost()``; the transport updates them around each attempt.
    ``ejected`` is True while the replica's breaker is not closed (``ejected_until`` is when it may
    be probed); ``unhealthy`` while active health checks say so.

    Example::

        replica = rs.balancing.Replica(rs.discovery.Endpoint("http://127.0.0.1:8001"))
        replica.cost(now=0.0)  # 0.0 until it has answered
    """

    __slots__ = (
        "_stamp",
        "attributes",
        "breaker",
        "ejected",
        "ejected_until",
        "endpoint",
        "ewma",
        "failures",
        "in_flight",
        "route",
        "successes",
        "unhealthy",
        "url",
    )

    def __init__(self, endpoint: Endpoint, breaker: CircuitBreaker | None = None) -> None:
        self.endpoint = endpoint
        self.url = endpoint.url
        base = httpx.URL(endpoint.url)
        port = base.port or (443 if base.scheme == "https" else 80)
        # What routing needs, without keeping an httpx.URL (a third of a replica's memory):
        # scheme, host (as parsed: IDNA-encoded, IPv6 without brackets), port, path prefix
        # (percent-encoded), and the Host header value.
        host = base.host
        raw_host = base.raw_host.decode("ascii")
        if raw_host == host:
            raw_host = host  # one string rather than two: ~60 bytes of a replica's 2 KB budget
        self.route: tuple[str, str, int | None, str, str] = (
            base.scheme,
            raw_host,
            base.port,
            base.raw_path.partition(b"?")[0].decode("ascii").rstrip("/"),
            base.netloc.decode("ascii"),
        )
        self.attributes: dict[str, str | int] = {
            "server.address": host,
            "server.port": port,
        }
        self.breaker = breaker
        self.in_flight = 0
        self.ewma = 0.0
        self._stamp = -1.0  # never measured
        self.successes = 0
        self.failures = 0
        self.ejected = False
        self.ejected_until = 0.0
        self.unhealthy = False

    def __repr__(self) -> str:
        url = redact(self.url)  # (userinfo masked)
        return f"Replica({url!r}, in_flight={self.in_flight}, ewma={self.ewma:.4f})"

    def url_for(self, logical: httpx.URL) -> httpx.URL:
        """``logical`` (a service's URL) sent to this replica: its scheme, host and port, and its
        path prefix before the path; the query and fragment are kept.

        Example::

            replica = rs.balancing.Replica(rs.discovery.Endpoint("http://127.0.0.1:8001/api"))
            replica.url_for(httpx.URL("http://orders/v1/items?q=1"))
            # URL('http://127.0.0.1:8001/api/v1/items?q=1')
        """
        scheme, host, port, prefix, _ = self.route
        if _ORIGIN_SWAP_WORKS:
            return _origin_swapped(logical, scheme, host, port, prefix)
        return logical.copy_with(
            scheme=scheme, host=host, port=port, raw_path=prefix.encode("ascii") + logical.raw_path
        )

    @property
    def name(self) -> str:
        """``host:port``: how breakers and telemetry name the replica (derived, not stored)."""
        return f"{self.attributes['server.address']}:{self.attributes['server.port']}"

    def available(self, now: float) -> bool:
        """May the balancer choose it (outside panic mode)? An ejected replica may be chosen
        again once its ejection time is over: that attempt is its breaker's half-open probe."""
        return self.ejected_until <= now and not self.unhealthy

    def cost(self, now: float) -> float:
        """Finagle's P2C cost: peak-EWMA latency × (in-flight + 1).

        The latency decays with the time since it was last measured, so a replica that answered
        slowly once is measured again later rather than never chosen again.

        A replica whose ejection time is over costs nothing while idle: the next pick that draws
        it sends its probe at once, rather than once the slow answers that ejected it (a frozen
        replica's timeouts) have decayed. Not while ejected, so panic mode, which may choose
        ejected replicas, still prefers the fast ones.
        """
        if self.ejected and self.ejected_until <= now and not self.in_flight and not self.unhealthy:
            return 0.0
        if self._stamp < 0:
            # Never measured: free while idle (so it gets measured), expensive once requests
            # wait on it (Finagle's penalty), so a new or always-failing replica is not flooded.
            return UNMEASURED_PENALTY * self.in_flight
        ewma = self.ewma
        if now > self._stamp:
            ewma *= math.exp(-(now - self._stamp) / DECAY_SECONDS)
        return ewma * (self.in_flight + 1)

    def observe(self, seconds: float, now: float) -> None:
        """Fold one latency into the peak EWMA: spikes count at once, decay is gradual."""
        if seconds > self.ewma or self._stamp < 0:
            self.ewma = seconds
        else:
            weight = math.exp(-(now - self._stamp) / DECAY_SECONDS)
            self.ewma = self.ewma * weight + seconds * (1.0 - weight)
        self._stamp = now

    def observe_failure(self, seconds: float, now: float) -> None:
        """A failed attempt can only raise the estimate (a timeout is slow; a refusal is not
        fast service); a replica never measured stays unmeasured, keeping its in-flight
        penalty."""
        if self._stamp >= 0 and seconds > self.ewma:
            self.ewma = seconds
            self._stamp = now


class LatencyWindow:
    """Recent successful latencies (a ring of ``size``), their quantiles, and a value learned
    from them.

    ``learn(window)``, if given, is called again every 128 samples (sorting 512 samples costs
    ~140k instructions, too much for every request): its answer is kept in ``learned``, so a
    reader on the request path pays one attribute read.

    Example::

        window = rs.balancing.LatencyWindow(learn=lambda w: w.quantile(0.9, min_samples=50))
        for _ in range(100):
            window.add(0.002)
        window.p95(min_samples=50)  # 0.002
        window.learned  # 0.002
    """

    __slots__ = ("_i", "_learn", "_samples", "_size", "_sorted", "_stale", "learned")

    def __init__(
        self, size: int = 512, learn: Callable[[LatencyWindow], float | None] | None = None
    ) -> None:
        check_count("size", size)
        self._samples: list[float] = []
        self._size = size
        self._i = 0
        self._sorted: list[float] | None = None
        self._stale = 0
        self._learn = learn
        self.learned: float | None = None

    def add(self, seconds: float) -> None:
        if len(self._samples) < self._size:
            self._samples.append(seconds)
        else:
            self._samples[self._i] = seconds
            self._i = (self._i + 1) % self._size
        self._stale += 1
        if self._learn is not None and (self._stale >= 128 or self.learned is None):
            self._sorted = None  # learn from every sample
            self.learned = self._learn(self)
            if self.learned is not None:
                self._stale = 0

    def quantile(self, q: float, min_samples: int) -> float | None:
        """The ``q`` quantile of the window (None before ``min_samples`` samples)."""
        samples = self._samples
        if len(samples) < min_samples or not samples:
            return None
        if self._sorted is None or self._stale >= 32:  # re-sorted every 32 samples, not every call
            self._sorted = sorted(samples)
            self._stale = 0
        ordered = self._sorted
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]

    def p95(self, min_samples: int) -> float | None:
        """The 95th percentile (None before ``min_samples`` samples)."""
        return self.quantile(0.95, min_samples)
