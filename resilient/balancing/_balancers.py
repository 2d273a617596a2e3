"""Balancers: small pure picks over an immutable tuple of replicas.

A pick skips replicas already tried by this request and, unless the service is in panic mode,
replicas that are ejected or unhealthy. Picks sample a bounded number of random candidates, so they
cost the same with 10 replicas or 10,000; only when most replicas are unavailable does a pick fall
back to one scan of the list.
"""

from __future__ import annotations

import bisect
import itertools
import random as _random
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from resilient.balancing._replica import Replica

__all__ = ["Balancer", "LeastRequests", "PowerOfTwo", "Random", "RoundRobin", "Weighted"]

#: Random candidates drawn before falling back to a scan.
_SAMPLES = 4


class Balancer(Protocol):
    """Chooses a replica for one attempt.

    Example::

        class First:
            def pick(self, replicas, tried, panic, now):
                return next((r for r in replicas if r not in tried), None)
    """

    def pick(
        self, replicas: Sequence[Replica], tried: Collection[Replica], panic: bool, now: float
    ) -> Replica | None:
        """A replica not in ``tried`` and, unless ``panic``, available at ``now``
        (`Replica.available`); None if there is none."""
        ...


def _usable(replica: Replica, tried: Collection[Replica], panic: bool, now: float) -> bool:
    if replica in tried:
        return False
    return panic or (replica.ejected_until <= now and not replica.unhealthy)


def _scan(
    replicas: Sequence[Replica],
    tried: Collection[Replica],
    panic: bool,
    now: float,
    rand: Callable[[], float],
    key: Callable[[Replica], float] | None = None,
) -> Replica | None:
    """When random draws keep missing: choose among all usable replicas, still at random (or the
    cheaper of two random ones), so the first usable one in the list does not take the load."""
    usable = [r for r in replicas if _usable(r, tried, panic, now)]
    if not usable:
        return None
    a = usable[int(rand() * len(usable))]
    if key is None or len(usable) == 1:
        return a
    b = usable[int(rand() * len(usable))]
    return a if key(a) <= key(b) else b


class _Sampling:
    """What the random balancers share: the injected source of randomness."""

    __slots__ = ("_rand",)

    def __init__(self, *, random: Callable[[], float] | None = None) -> None:
        self._rand = random or _random.random

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PowerOfTwo(_Sampling):
    """Power of two choices over peak-EWMA latency × in-flight requests (Finagle's default).

    Two replicas are drawn at random and the cheaper is chosen: load spreads almost as well as
    with a full scan, at the cost of two draws.

    Example::

        rs.balancing.PowerOfTwo(random=random.Random(7).random)
    """

    __slots__ = ()

    @staticmethod
    def _cost(replica: Replica, now: float) -> float:
        return replica.cost(now)

    def pick(
        self, replicas: Sequence[Replica], tried: Collection[Replica], panic: bool, now: float
    ) -> Replica | None:
        n = len(replicas)
        if n == 0:
            return None
        if n == 1:
            only = replicas[0]
            return only if _usable(only, tried, panic, now) else None
        rand = self._rand
        cost = self._cost
        for _ in range(_SAMPLES):
            i = int(rand() * n)
            j = (i + 1 + int(rand() * (n - 1))) % n  # a distinct second draw
            a, b = replicas[i], replicas[j]
            ok_a, ok_b = _usable(a, tried, panic, now), _usable(b, tried, panic, now)
            if ok_a and ok_b:
                return a if cost(a, now) <= cost(b, now) else b
            if ok_a:
                return a
            if ok_b:
                return b
        return _scan(replicas, tried, panic, now, rand, lambda r: cost(r, now))


class LeastRequests(PowerOfTwo):
    """Power of two choices over in-flight requests alone (Envoy's least-request).

    Example::

        rs.balancing.LeastRequests()
    """

    __slots__ = ()

    @staticmethod
    def _cost(replica: Replica, now: float) -> float:
        return float(replica.in_flight)


class Random(_Sampling):
    """Uniformly at random.

    Example::

        rs.balancing.Random(random=random.Random(1).random)
    """

    __slots__ = ()

    def pick(
        self, replicas: Sequence[Replica], tried: Collection[Replica], panic: bool, now: float
    ) -> Replica | None:
        n = len(replicas)
        if n == 0:
            return None
        for _ in range(_SAMPLES):
            candidate = replicas[int(self._rand() * n)]
            if _usable(candidate, tried, panic, now):
                return candidate
        return _scan(replicas, tried, panic, now, self._rand)


class RoundRobin(_Sampling):
    """Each replica in turn, skipping those that may not be used.

    Example::

        rs.balancing.RoundRobin()
    """

    __slots__ = ("_counter",)

    def __init__(self, *, random: Callable[[], float] | None = None) -> None:
        super().__init__(random=random)  # for the scan when most replicas are out
        self._counter = itertools.count()

    def pick(
        self, replicas: Sequence[Replica], tried: Collection[Replica], panic: bool, now: float
    ) -> Replica | None:
        n = len(replicas)
        if n == 0:
            return None
        start = next(self._counter)  # itertools.count is atomic under the GIL
        for k in range(min(n, _SAMPLES)):
            candidate = replicas[(start + k) % n]
            if _usable(candidate, tried, panic, now):
                return candidate
        return _scan(replicas, tried, panic, now, self._rand)


class Weighted(_Sampling):
    """At random in proportion to each replica's ``Endpoint.weight`` (DNS SRV weights, payloads).

    The cumulative weights are computed once per list of replicas (the list is rebuilt only when
    membership changes), so a pick is one binary search.

    Example::

        rs.balancing.Weighted()
    """

    __slots__ = ("_cache",)

    def __init__(self, *, random: Callable[[], float] | None = None) -> None:
        super().__init__(random=random)
        self._cache: tuple[Sequence[Replica] | None, list[float]] = (None, [])

    def _cumulative(self, replicas: Sequence[Replica]) -> list[float]:
        cached, cumulative = self._cache
        if cached is not replicas:
            cumulative = list(itertools.accumulate(r.endpoint.weight for r in replicas))
            self._cache = (replicas, cumulative)
        return cumulative

    def pick(
        self, replicas: Sequence[Replica], tried: Collection[Replica], panic: bool, now: float
    ) -> Replica | None:
        if not replicas:
            return None
        cumulative = self._cumulative(replicas)
        if cumulative[-1] <= 0:
            return _scan(replicas, tried, panic, now, self._rand)
        for _ in range(_SAMPLES):
            candidate = self._draw(replicas, cumulative)
            if _usable(candidate, tried, panic, now):
                return candidate
        # The draws kept missing (the heavy replicas tried or ejected): still in proportion to
        # weight among the usable ones, so a weight-0 record stays the last resort it is.
        usable = [r for r in replicas if _usable(r, tried, panic, now)]
        if not usable:
            return None
        weights = list(itertools.accumulate(r.endpoint.weight for r in usable))
        if weights[-1] <= 0:
            return usable[int(self._rand() * len(usable))]
        return self._draw(usable, weights)

    def _draw(self, replicas: Sequence[Replica], cumulative: list[float]) -> Replica:
        """One of ``replicas`` at random in proportion to weight (``cumulative``: their running
        sums, the last one positive)."""
        i = bisect.bisect_right(cumulative, self._rand() * cumulative[-1])
        return replicas[min(i, len(replicas) - 1)]
