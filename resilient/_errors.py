"""The exceptions `resilient` raises, in one tree.

::

    Exception
    └── ResilienceError                 anything raised by resilient itself
        ├── RejectedError               a policy refused to start the call (nothing was sent)
        │   ├── CircuitOpenError        the breaker is open, or half-open with every probe taken
        │   ├── BulkheadFullError       no permit, and no room (or no time left) in the queue
        │   ├── RetryBudgetExhausted    RetryBudget.withdraw() found no tokens
        │   ├── NoHealthyEndpoints      discovery or health left no replica to try
        │   └── ThrottledError          AdaptiveThrottle shed the call (the backend keeps refusing)
        └── DeadlineExceeded            a Timeout or deadline expired (also a TimeoutError)

When retries run out, `Retry` raises the last real exception itself, not a wrapper; the number of
attempts is added to its ``__notes__``. Cancellation (``asyncio.CancelledError``, ``trio.Cancelled``,
``KeyboardInterrupt``) is never wrapped, retried or swallowed.
"""

from __future__ import annotations

__all__ = [
    "BulkheadFullError",
    "CircuitOpenError",
    "DeadlineExceeded",
    "NoHealthyEndpoints",
    "RejectedError",
    "ResilienceError",
    "RetryBudgetExhausted",
    "ThrottledError",
]


class ResilienceError(Exception):
    """Base class of every exception raised by `resilient` itself.

    Example::

        try:
            payments.call(charge, order)
        except rs.ResilienceError:
            ...  # resilient refused or cut the call; the dependency's own errors pass through
    """


class RejectedError(ResilienceError):
    """A policy refused to start the call: the wrapped function was not called.

    ``policy`` names the policy that refused (``"circuit_breaker"``, ``"bulkhead"``, ...) and ``name``
    the instance's name.

    Example::

        except rs.RejectedError as exc:
            log.warning("shed by %s %s", exc.policy, exc.name)
    """

    policy: str = "policy"

    def __init__(self, message: str, *, name: str = "") -> None:
        super().__init__(message)
        self.name = name


class CircuitOpenError(RejectedError):
    """The circuit breaker is open (or half-open with all its probes in flight).

    ``retry_after`` is the number of seconds until the breaker lets a probe through, when known.

    Example::

        except rs.CircuitOpenError as exc:
            return cached_answer()
    """

    policy = "circuit_breaker"

    def __init__(self, message: str, *, name: str = "", retry_after: float | None = None) -> None:
        super().__init__(message, name=name)
        self.retry_after = retry_after


class BulkheadFullError(RejectedError):
    """The bulkhead had no free permit and no room or time left in its queue.

    Example::

        except rs.BulkheadFullError:
            return Response(status_code=503)
    """

    policy = "bulkhead"


class RetryBudgetExhausted(RejectedError):
    """``RetryBudget.withdraw()`` found no token.

    ``Retry`` itself never raises this: when its budget is empty it gives up and raises the last real
    exception, with a note saying the budget was exhausted.

    Example::

        budget.withdraw()  # raises RetryBudgetExhausted when the fleet is retrying too much
    """

    policy = "retry_budget"


class NoHealthyEndpoints(RejectedError):
    """Discovery and health checks left no replica to send the request to.

    Example::

        except rs.NoHealthyEndpoints:
            ...
    """

    policy = "load_balancer"


class ThrottledError(RejectedError):
    """`AdaptiveThrottle` shed the call locally: the backend has been refusing requests.

    ``probability`` is the rejection probability the throttle drew against.

    Example::

        try:
            search.call(query, text)
        except rs.ThrottledError as exc:
            return cached_results(text)  # exc.probability: how hard the client is shedding
    """

    policy = "adaptive_throttle"

    def __init__(self, message: str, *, name: str = "", probability: float = 0.0) -> None:
        super().__init__(message, name=name)
        self.probability = probability


class DeadlineExceeded(ResilienceError, TimeoutError):
    """A ``Timeout`` or deadline expired before the call finished.

    It is also a ``TimeoutError``, so code that already catches that keeps working.

    Example::

        try:
            await rs.Timeout(0.5).call_async(fetch)
        except TimeoutError:
            ...
    """

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout


# Show the public path in tracebacks and telemetry (``resilient.CircuitOpenError``), as httpx does.
for _cls in (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceeded,
    NoHealthyEndpoints,
    RejectedError,
    ResilienceError,
    RetryBudgetExhausted,
    ThrottledError,
):
    _cls.__module__ = "resilient"
