"""Tools for testing code that uses resilient: a fake clock and a fleet of faulty replicas.

Example::

    clock = rs.testing.FakeClock()
    breaker = rs.CircuitBreaker(open_for=5.0, clock=clock)

    with rs.testing.Fleet(n=3, seed=1) as fleet:
        fleet[0].set_faults(error_rate=0.5)
        httpx.get(fleet.urls[0] + "/items")
"""

from __future__ import annotations

from resilient.testing._fakeclock import FakeClock
from resilient.testing.fleet import (
    Counts,
    Fleet,
    FleetCounts,
    FleetError,
    PortInUseError,
    Replica,
    ReplicaUnavailableError,
)

__all__ = [
    "Counts",
    "FakeClock",
    "Fleet",
    "FleetCounts",
    "FleetError",
    "PortInUseError",
    "Replica",
    "ReplicaUnavailableError",
]
