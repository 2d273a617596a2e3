"""Shared state for breakers and retry budgets: one fleet-wide view through an external store.

Example::

    store = rs.stores.RedisStore("redis://127.0.0.1:6379/0")
    breaker = rs.CircuitBreaker(name="payments", store=store)   # one breaker for every process
    budget = rs.RetryBudget(name="payments", store=store)       # one budget for every process

redis-py (the ``redis`` extra) is imported only when a `RedisStore` is built.
"""

from __future__ import annotations

from resilient.events import StoreRecovered, StoreUnavailable
from resilient.stores._redis import RedisStore

__all__ = ["RedisStore", "StoreRecovered", "StoreUnavailable"]
