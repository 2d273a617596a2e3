"""resilient: retries, circuit breakers, bulkheads, timeouts, fallbacks and hedging for Python.

Every policy is a decorator for sync and ``async def`` functions (asyncio and trio), and composes
with others in a `Pipeline`, the first given being the outermost.

Example::

    import resilient as rs

    @rs.Pipeline(
        rs.Fallback(value=None),
        rs.Retry(on=ConnectionError, attempts=3),
        rs.CircuitBreaker(name="orders"),
    )
    def fetch_order(order_id: str) -> dict: ...
"""

from __future__ import annotations

from resilient import balancing, discovery, events, http, stores, telemetry, testing
from resilient._clock import Clock, SystemClock
from resilient._deadline import time_left
from resilient._errors import (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceeded,
    NoHealthyEndpoints,
    RejectedError,
    ResilienceError,
    RetryBudgetExhausted,
    ThrottledError,
)
from resilient._policy import Policy
from resilient.events import add_hook, remove_hook
from resilient.http import ResilientTransport
from resilient.pipeline import Pipeline
from resilient.policies.breaker import CircuitBreaker
from resilient.policies.budget import RetryBudget
from resilient.policies.bulkhead import Bulkhead, BulkheadStatistics
from resilient.policies.fallback import Fallback
from resilient.policies.hedge import Hedge
from resilient.policies.limits import AIMDLimit
from resilient.policies.retry import Retry
from resilient.policies.throttle import AdaptiveThrottle, ThrottleStatistics
from resilient.policies.timeout import Timeout
from resilient.stores import RedisStore

__version__ = "0.1.0.dev0"

__all__ = [
    "AIMDLimit",
    "AdaptiveThrottle",
    "Bulkhead",
    "BulkheadFullError",
    "BulkheadStatistics",
    "CircuitBreaker",
    "CircuitOpenError",
    "Clock",
    "DeadlineExceeded",
    "Fallback",
    "Hedge",
    "NoHealthyEndpoints",
    "Pipeline",
    "Policy",
    "RedisStore",
    "RejectedError",
    "ResilienceError",
    "ResilientTransport",
    "Retry",
    "RetryBudget",
    "RetryBudgetExhausted",
    "SystemClock",
    "ThrottleStatistics",
    "ThrottledError",
    "Timeout",
    "add_hook",
    "balancing",
    "discovery",
    "events",
    "http",
    "remove_hook",
    "stores",
    "telemetry",
    "testing",
    "time_left",
]
