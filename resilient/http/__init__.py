"""resilient for httpx: `ResilientTransport`, its HTTP rules and its degraded answers.

Example::

    import httpx, resilient as rs

    client = httpx.Client(transport=rs.ResilientTransport(deadline=5.0))
"""

from __future__ import annotations

from resilient.http._cache import STALE_HEADER, StaleIfError
from resilient.http._classify import Classifier, parse_retry_after
from resilient.http._transport import Hedging, ResilientTransport

__all__ = [
    "STALE_HEADER",
    "Classifier",
    "Hedging",
    "ResilientTransport",
    "StaleIfError",
    "parse_retry_after",
]
