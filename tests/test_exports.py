from __future__ import annotations

import inspect

import resilient as rs
import resilient.events
import resilient.testing


def test_all_is_sorted_and_complete() -> None:
    for module in (rs, resilient.events, resilient.testing):
        names = module.__all__
        assert names == sorted(names), module.__name__
        for name in names:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_public_names_have_docstrings_with_an_example() -> None:
    for name in rs.__all__:
        obj = getattr(rs, name)
        if inspect.ismodule(obj):
            assert obj.__doc__, name
            continue
        doc = inspect.getdoc(obj) or ""
        assert "Example" in doc or ">>>" in doc, f"{name} needs a docstring with an example"


def test_exception_tree() -> None:
    for cls in (
        rs.CircuitOpenError,
        rs.BulkheadFullError,
        rs.RetryBudgetExhausted,
        rs.NoHealthyEndpoints,
    ):
        assert issubclass(cls, rs.RejectedError)
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
        rs.Pipeline,
    ):
        assert issubclass(cls, rs.Policy)
