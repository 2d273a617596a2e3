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
from resilient.balancing.health import (
    EndpointHealth,
    HealthCheck,
    HealthChecker,
    HealthStatus,
    ProbeScheduler,
    phi_accrual,
)

__all__ = [
    "Balancer",
    "EndpointHealth",
    "HealthCheck",
    "HealthChecker",
    "HealthStatus",
    "LatencyWindow",
    "LeastRequests",
    "PowerOfTwo",
    "ProbeScheduler",
    "Random",
    "Replica",
    "ReplicaStatistics",
    "RoundRobin",
    "Service",
    "ServiceRuntime",
    "Weighted",
    "phi_accrual",
]
