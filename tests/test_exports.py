from __future__ import annotations

import inspect

import resilient as rs
import resilient.balancing
import resilient.discovery
import resilient.events
import resilient.http
import resilient.stores
import resilient.telemetry
import resilient.testing

MODULES = (
    rs,
    resilient.balancing,
    resilient.discovery,
    resilient.events,
    resilient.http,
    resilient.stores,
    resilient.telemetry,
    resilient.testing,
)


def _isort_style(name: str) -> tuple[int, str]:
    # ruff's RUF022 order: CONSTANTS, then Classes, then functions and modules
    if name.isupper():
        return (0, name)
    return (1, name) if name[:1].isupper() else (2, name)


def test_all_is_sorted_and_complete() -> None:
    for module in MODULES:
        names = module.__all__
        assert names == sorted(names, key=_isort_style), module.__name__
        for name in names:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_public_names_have_docstrings_with_an_example() -> None:
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                assert obj.__doc__, name
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # constants
            doc = inspect.getdoc(obj) or ""
            assert "Example" in doc or ">>>" in doc, (
                f"{module.__name__}.{name} needs a docstring with an example"
            )


def test_exception_tree() -> None:
    for cls in (
        rs.CircuitOpenError,
        rs.BulkheadFullError,
        rs.RetryBudgetExhausted,
        rs.NoHealthyEndpoints,
        rs.ThrottledError,
    ):
        assert issubclass(cls, rs.RejectedError)
        assert cls.__module__ == "resilient"
    assert issubclass(rs.RejectedError, rs.ResilienceError)
    assert issubclass(rs.DeadlineExceeded, rs.ResilienceError)
    assert issubclass(rs.DeadlineExceeded, TimeoutError)


def test_every_policy_is_a_policy() -> None:
    for cls in (
        rs.Retry,
        rs.CircuitBreaker,
        rs.Bulkhead,
        rs.Timeout,
        rs.Fallback,
        rs.Hedge,
        rs.AdaptiveThrottle,
        rs.Pipeline,
    ):
        assert issubclass(cls, rs.Policy)
