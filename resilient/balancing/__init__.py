"""Client-side load balancing: balancers, replicas' live state, logical services.

Example::

    transport = rs.ResilientTransport(services={
        "orders": rs.balancing.Service(
            discovery=rs.discovery.Static(["http://127.0.0.1:8001", "http://127.0.0.1:8002"]),
            balancer=rs.balancing.PowerOfTwo(),
        ),
    })
    httpx.Client(transport=transport).get("http://orders/v1/items")
"""

from __future__ import annotations

from resilient.balancing._balancers import (
    Balancer,
    LeastRequests,
    PowerOfTwo,
    Random,
    RoundRobin,
    Weighted,
)
from resilient.balancing._replica import LatencyWindow, Replica
from resilient.balancing._service import ReplicaStatistics, Service, ServiceRuntime

__all__ = [
    "Balancer",
    "LatencyWindow",
    "LeastRequests",
    "PowerOfTwo",
    "Random",
    "Replica",
    "ReplicaStatistics",
    "RoundRobin",
    "Service",
    "ServiceRuntime",
    "Weighted",
]
