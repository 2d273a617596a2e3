"""What every discovery source is: a current, immutable list of endpoints that survives failures.

A source publishes snapshots; readers take the current one without locking (an attribute read)
and compare its ``version`` to know whether to rebuild their own per-endpoint state. When its
backend fails (DNS server down, ZooKeeper session lost) a source keeps serving the last good list
— static stability — and logs the failure once per episode, not once per retry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx

from resilient.policies._common import check_positive
from resilient.telemetry import _clean, redact

__all__ = ["Discovery", "Endpoint", "Snapshot", "Source"]

_log = logging.getLogger("resilient.discovery")


@dataclass(frozen=True, slots=True, repr=False)
class Endpoint:
    """One replica of a service: where it is and how to weigh it.

    ``url`` is the replica's base URL (``scheme://host:port``, optionally a path prefix);
    ``priority`` follows DNS SRV (lower is preferred: higher priorities are used only when no
    replica of a lower one is healthy); ``weight`` is relative within a priority; ``zone`` enables
    zone preference; ``id`` names the replica in its registry (a ZooKeeper instance id).

    Example::

        Endpoint("http://10.0.0.7:8080", weight=2.0, zone="eu-west-1a")
    """

    url: str
    weight: float = 1.0
    priority: int = 0
    zone: str | None = None
    id: str | None = None
    # (Not in the repr: registries' metadata may hold credentials, e.g. an actuator's password.)
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        parsed = httpx.URL(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"url must be an http(s) URL with a host, got {redact(self.url)!r}")
        check_positive("weight", self.weight, allow_zero=True)
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise ValueError(f"priority must be an integer, got {self.priority!r}")
        if self.zone is not None and not isinstance(self.zone, str):
            raise ValueError(f"zone must be a string or None, got {self.zone!r}")

    def __repr__(self) -> str:
        # The URL's userinfo (health checks send it as Basic auth) is masked.
        return (
            f"Endpoint(url={redact(self.url)!r}, weight={self.weight!r}, "
            f"priority={self.priority!r}, zone={self.zone!r}, id={self.id!r})"
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The endpoints a source knows now; ``version`` grows by one at every change.

    Example::

        snapshot = source.current()
        if snapshot.version != seen:
            rebuild(snapshot.endpoints)
    """

    version: int
    endpoints: tuple[Endpoint, ...]


@runtime_checkable
class Discovery(Protocol):
    """A source of endpoints for one logical service.

    ``start()`` begins watching (idempotent; the first resolution may happen in it, so the first
    request has replicas), ``current()`` never blocks and never raises, ``close()`` stops every
    thread or watch the source started.

    Example::

        class FromFile(rs.discovery.Source):
            def start(self) -> None:
                self._publish(rs.discovery.Endpoint(line.strip()) for line in open("replicas"))
    """

    def start(self) -> None: ...

    def current(self) -> Snapshot: ...

    def close(self) -> None: ...


class Source:
    """Shared plumbing for discovery sources: publishing snapshots and failing quietly.

    Subclasses call `_publish` with each new list and `_failed` when their backend fails.

    Example::

        source = rs.discovery.Static(["http://127.0.0.1:8001"])
        source.current().endpoints[0].url  # "http://127.0.0.1:8001"
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._snapshot = Snapshot(0, ())
        self._lock = threading.Lock()
        self._failing = False
        self._listeners: list[Callable[[Snapshot], None]] = []

    def current(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        """Call ``listener(snapshot)`` after every change (from the source's own thread)."""
        self._listeners.append(listener)

    def _publish(self, endpoints: Iterable[Endpoint]) -> None:
        new = tuple(endpoints)
        with self._lock:
            if self._failing:
                self._failing = False
                _log.warning("resilient: discovery %s recovered", self.name)
            if set(new) == set(self._snapshot.endpoints):
                return
            self._snapshot = snapshot = Snapshot(self._snapshot.version + 1, new)
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:
                _log.exception("resilient: discovery listener failed")

    def _failed(self, exc: BaseException) -> None:
        """The backend failed: keep the last good list, say so once per episode."""
        with self._lock:
            first = not self._failing
            self._failing = True
            kept = len(self._snapshot.endpoints)
        if first:
            _log.warning(
                "resilient: discovery %s failed (%s: %s); keeping the last %d endpoint(s)",
                self.name,
                type(exc).__name__,
                _clean(str(exc)),  # a backend's error may name a URL with its credentials
                kept,
            )

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> Source:
        try:
            self.start()
        except BaseException:  # interrupted half-way: what it started is stopped
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
