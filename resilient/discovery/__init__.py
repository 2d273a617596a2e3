"""Where the replicas of a service are: static lists, DNS and ZooKeeper.

Every source keeps its last good list when its backend fails (static stability).

Example::

    rs.ResilientTransport(services={
        "orders": rs.discovery.Static(["http://127.0.0.1:8001", "http://127.0.0.1:8002"]),
    })
"""

from __future__ import annotations

from resilient.discovery._base import Discovery, Endpoint, Snapshot, Source
from resilient.discovery.dns import DNS
from resilient.discovery.static import Static
from resilient.discovery.zookeeper import ZooKeeper, register_zookeeper

__all__ = [
    "DNS",
    "Discovery",
    "Endpoint",
    "Snapshot",
    "Source",
    "Static",
    "ZooKeeper",
    "register_zookeeper",
]
