"""HTTP rules in one place: what was sent, what may be retried, what counts as a failure.

Three kinds of trouble, from the client's side:

- **not sent** — connect errors, connect and pool timeouts: the server never saw the request, so
  retrying is safe for every method, POST included;
- **maybe processed** — read/write errors and timeouts, a dropped connection, a 5xx answer: the
  server may have acted, so only idempotent requests are retried (GET, HEAD, OPTIONS, PUT, DELETE,
  TRACE, or any request carrying an ``Idempotency-Key`` header);
- **not retryable** — everything else (a bad URL, a protocol error on our side).
"""

from __future__ import annotations

import email.utils
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

import httpx

__all__ = ["Classifier", "parse_retry_after"]

Kind = Literal["not_sent", "maybe_processed", "not_retryable"]

_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_MAYBE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def parse_retry_after(value: str, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds (fractions too) or an HTTP-date.

    Negative, infinite or malformed values give None (the caller falls back to its backoff); a date
    in the past gives 0.

    Example::

        >>> parse_retry_after("1.5", datetime.now(timezone.utc))
        1.5
        >>> parse_retry_after("soon", datetime.now(timezone.utc)) is None
        True
    """
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):  # (a year past datetime's)
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - now).total_seconds())
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _frozen_upper(values: frozenset[str]) -> frozenset[str]:
    return frozenset(v.upper() for v in values)


@dataclass(frozen=True, slots=True, kw_only=True)
class Classifier:
    """The HTTP rules of `ResilientTransport`; every set is configurable.

    Example::

        rs.http.Classifier(retry_statuses=frozenset({502, 503, 504}))  # never retry 429
    """

    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    retry_after_statuses: frozenset[int] = frozenset({429, 503})
    idempotent_methods: frozenset[str] = frozenset(
        {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}
    )
    idempotency_header: str = "Idempotency-Key"
    max_retry_after: float = 30.0
    _methods: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("retry_statuses", "retry_after_statuses"):
            statuses = getattr(self, name)
            if not all(isinstance(s, int) and 100 <= s <= 599 for s in statuses):
                raise ValueError(f"{name} must be HTTP status codes, got {statuses!r}")
        if not (isinstance(self.max_retry_after, (int, float)) and self.max_retry_after >= 0):
            raise ValueError(f"max_retry_after must be >= 0, got {self.max_retry_after!r}")
        object.__setattr__(self, "_methods", _frozen_upper(self.idempotent_methods))

    def is_idempotent(self, request: httpx.Request) -> bool:
        """May this request be sent again after the server may have acted on it? (Its method
        is idempotent, or it carries a non-empty ``idempotency_header``.)"""
        return request.method in self._methods or bool(
            request.headers.get(self.idempotency_header, "").strip()
        )

    def may_hedge(self, request: httpx.Request) -> bool:
        """May a second copy of this request go out while the first still runs? Only if its
        method is idempotent: an ``Idempotency-Key`` makes a retry after a failure safe, not a
        concurrent copy (a server still processing the key answers the copy 409 Conflict)."""
        return request.method in self._methods

    def exception_kind(self, exc: BaseException) -> Kind:
        """Classify a transport exception."""
        if isinstance(exc, _NOT_SENT):
            return "not_sent"
        if isinstance(exc, _MAYBE):
            return "maybe_processed"
        return "not_retryable"

    def is_failure(self, status: int) -> bool:
        """Does this status count against the server's health (breakers, ejection)?"""
        return status >= 500 or status == 429

    def retry_after(self, response: httpx.Response, now: datetime) -> float | None:
        """The server's ``Retry-After`` for a 429/503, capped at ``max_retry_after``; else None."""
        if response.status_code not in self.retry_after_statuses:
            return None
        value = response.headers.get("retry-after")
        if value is None:
            return None
        seconds = parse_retry_after(value, now)
        if seconds is None:
            return None
        return min(seconds, self.max_retry_after)
