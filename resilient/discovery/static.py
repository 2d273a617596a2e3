"""A fixed list of replicas."""

from __future__ import annotations

from collections.abc import Iterable

from resilient.discovery._base import Endpoint, Source
from resilient.telemetry import redact

__all__ = ["Static"]


class Static(Source):
    """Replicas given by hand: URLs or `Endpoint` objects.

    Example::

        rs.discovery.Static(["http://127.0.0.1:8001", "http://127.0.0.1:8002"])
    """

    def __init__(self, urls: Iterable[str | Endpoint], *, name: str = "static") -> None:
        super().__init__(name)
        endpoints = [u if isinstance(u, Endpoint) else Endpoint(u) for u in urls]
        if not endpoints:
            raise ValueError("urls must name at least one replica, got none")
        self._publish(endpoints)

    def __repr__(self) -> str:
        return f"Static({[redact(e.url) for e in self.current().endpoints]!r})"
