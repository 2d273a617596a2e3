"""What a shared-state store reports: it stopped answering, and it answers again.

Defined here for now, in the style of `resilient.events` (where they may move).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from resilient.events import Event

__all__ = ["StoreRecovered", "StoreUnavailable"]


@dataclass(frozen=True, slots=True)
class StoreUnavailable(Event):
    """The store named ``name`` (``host:port/db``) failed with ``error`` (an exception type name);
    the breakers and budgets using it run on local state until it answers again.

    Example::

        if isinstance(event, StoreUnavailable):
            alert(f"shared breaker state down: {event.name} ({event.error})")
    """

    kind: ClassVar[str] = "store_unavailable"
    policy: ClassVar[str] = "store"
    error: str


@dataclass(frozen=True, slots=True)
class StoreRecovered(Event):
    """The store named ``name`` answers again after ``down_for`` seconds; sharing resumed.

    Example::

        if isinstance(event, StoreRecovered):
            log.info("shared state back after %.1f s", event.down_for)
    """

    kind: ClassVar[str] = "store_recovered"
    policy: ClassVar[str] = "store"
    down_for: float
