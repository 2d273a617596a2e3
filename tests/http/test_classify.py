"""The HTTP rules of `ResilientTransport`: Retry-After, exception kinds, idempotency, validation."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import httpx
import pytest

import resilient as rs
from resilient.http import Classifier, parse_retry_after

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def make_request(method: str = "GET", headers: dict[str, str] | None = None) -> httpx.Request:
    return httpx.Request(method, "http://127.0.0.1:9/x", headers=headers)


def answer(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return httpx.Response(status, headers=headers, request=make_request())


# parse_retry_after


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("1", 1.0),
        ("1.5", 1.5),
        ("0.25", 0.25),
        (" 2 ", 2.0),
        ("120", 120.0),
        ("3600", 3600.0),
    ],
)
def test_parse_retry_after_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 01 Jan 2025 12:00:03 GMT",  # IMF-fixdate
        "Wednesday, 01-Jan-25 12:00:03 GMT",  # obsolete RFC 850 form, which recipients must accept
        "Wed Jan  1 12:00:03 2025",  # obsolete asctime form
    ],
)
def test_parse_retry_after_http_dates_in_every_form(value: str) -> None:
    assert parse_retry_after(value, NOW) == pytest.approx(3.0)


def test_parse_retry_after_date_is_relative_to_now() -> None:
    date = "Wed, 01 Jan 2025 12:01:00 GMT"
    assert parse_retry_after(date, NOW) == pytest.approx(60.0)
    assert parse_retry_after(date, NOW + timedelta(seconds=45)) == pytest.approx(15.0)


def test_parse_retry_after_date_in_the_past_is_zero() -> None:
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", NOW) == 0.0


@pytest.mark.parametrize("value", ["-1", "-0.5", "-3600"])
def test_parse_retry_after_negative_is_none(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "nan", "NaN"])
def test_parse_retry_after_non_finite_is_none(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize(
    "value", ["", "   ", "soon", "1.5s", "5 seconds", "Wed, 99 Foo 2025", "2025-01-01T12:00:03Z"]
)
def test_parse_retry_after_garbage_is_none(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


# exception kinds


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.ConnectError("refused"), "not_sent"),
        (httpx.ConnectTimeout("connect"), "not_sent"),
        (httpx.PoolTimeout("pool"), "not_sent"),
        (httpx.ReadTimeout("read"), "maybe_processed"),
        (httpx.WriteTimeout("write"), "maybe_processed"),
        (httpx.ReadError("reset"), "maybe_processed"),
        (httpx.WriteError("broken pipe"), "maybe_processed"),
        (httpx.CloseError("close"), "maybe_processed"),
        (httpx.RemoteProtocolError("peer closed"), "maybe_processed"),
        (httpx.LocalProtocolError("bad header"), "not_retryable"),
        (httpx.UnsupportedProtocol("ftp"), "not_retryable"),
        (httpx.DecodingError("gzip"), "not_retryable"),
        (httpx.InvalidURL("bad"), "not_retryable"),
        (ValueError("ours"), "not_retryable"),
        (RuntimeError("ours"), "not_retryable"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_exception_kind(exc: BaseException, kind: str) -> None:
    assert Classifier().exception_kind(exc) == kind


def test_connect_timeout_is_not_sent_although_it_is_a_timeout() -> None:
    # ConnectTimeout subclasses TimeoutException, which as a whole means "maybe processed"
    assert issubclass(httpx.ConnectTimeout, httpx.TimeoutException)
    assert Classifier().exception_kind(httpx.ConnectTimeout("x")) == "not_sent"
    assert Classifier().exception_kind(httpx.ReadTimeout("x")) == "maybe_processed"


# idempotency


@pytest.mark.parametrize(
    ("method", "idempotent"),
    [
        ("GET", True),
        ("HEAD", True),
        ("OPTIONS", True),
        ("PUT", True),
        ("DELETE", True),
        ("TRACE", True),
        ("POST", False),
        ("PATCH", False),
        ("CONNECT", False),
    ],
)
def test_idempotent_by_method(method: str, idempotent: bool) -> None:
    assert Classifier().is_idempotent(make_request(method)) is idempotent


@pytest.mark.parametrize("header", ["Idempotency-Key", "idempotency-key", "IDEMPOTENCY-KEY"])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_idempotency_key_header_makes_any_method_idempotent(header: str, method: str) -> None:
    assert Classifier().is_idempotent(make_request(method, {header: "order-1"}))


def test_other_headers_do_not_make_a_post_idempotent() -> None:
    assert not Classifier().is_idempotent(make_request("POST", {"X-Request-Id": "r-1"}))


def test_custom_idempotency_header() -> None:
    classifier = Classifier(idempotency_header="X-Idem")
    assert classifier.is_idempotent(make_request("POST", {"x-idem": "1"}))
    assert not classifier.is_idempotent(make_request("POST", {"Idempotency-Key": "1"}))


def test_custom_idempotent_methods_are_case_insensitive() -> None:
    classifier = Classifier(idempotent_methods=frozenset({"get", "post"}))
    assert classifier.is_idempotent(make_request("POST"))
    assert classifier.is_idempotent(make_request("GET"))
    assert not classifier.is_idempotent(make_request("PUT"))


# statuses and Retry-After


def test_default_retry_statuses() -> None:
    assert Classifier().retry_statuses == frozenset({429, 502, 503, 504})


@pytest.mark.parametrize(
    ("status", "failure"),
    [
        (200, False),
        (204, False),
        (301, False),
        (400, False),
        (404, False),
        (409, False),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
    ],
)
def test_is_failure(status: int, failure: bool) -> None:
    assert Classifier().is_failure(status) is failure


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_read_for_429_and_503(status: int) -> None:
    assert Classifier().retry_after(answer(status, "1.5"), NOW) == 1.5


@pytest.mark.parametrize("status", [200, 500, 502, 504])
def test_retry_after_ignored_for_other_statuses(status: int) -> None:
    assert Classifier().retry_after(answer(status, "1.5"), NOW) is None


def test_retry_after_absent_or_invalid_is_none() -> None:
    assert Classifier().retry_after(answer(503), NOW) is None
    assert Classifier().retry_after(answer(503, "-3"), NOW) is None
    assert Classifier().retry_after(answer(503, "later"), NOW) is None


def test_retry_after_capped_at_max_retry_after() -> None:
    assert Classifier().max_retry_after == 30.0
    assert Classifier().retry_after(answer(503, "3600"), NOW) == 30.0
    assert Classifier().retry_after(answer(503, "29.5"), NOW) == 29.5
    assert Classifier(max_retry_after=2.0).retry_after(answer(429, "3"), NOW) == 2.0
    assert Classifier(max_retry_after=0).retry_after(answer(429, "3"), NOW) == 0.0


def test_retry_after_date_capped_too() -> None:
    date = "Wed, 01 Jan 2025 13:00:00 GMT"  # an hour from NOW
    assert Classifier().retry_after(answer(503, date), NOW) == 30.0


def test_retry_after_statuses_configurable() -> None:
    classifier = Classifier(retry_after_statuses=frozenset({502}))
    assert classifier.retry_after(answer(502, "4"), NOW) == 4.0
    assert classifier.retry_after(answer(503, "4"), NOW) is None


# validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"retry_statuses": frozenset({600})}, "retry_statuses"),
        ({"retry_statuses": frozenset({99})}, "retry_statuses"),
        ({"retry_statuses": frozenset({"503"})}, "retry_statuses"),
        ({"retry_statuses": "503"}, "retry_statuses"),
        ({"retry_after_statuses": frozenset({0})}, "retry_after_statuses"),
        ({"max_retry_after": -1.0}, "max_retry_after"),
        ({"max_retry_after": float("nan")}, "max_retry_after"),
        ({"max_retry_after": "30"}, "max_retry_after"),
    ],
)
def test_classifier_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Classifier(**kwargs)  # type: ignore[arg-type]


def test_classifier_is_frozen_and_keyword_only() -> None:
    classifier = Classifier()
    with pytest.raises(dataclasses.FrozenInstanceError):
        classifier.max_retry_after = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        Classifier(frozenset({503}))  # type: ignore[call-arg]


def test_exported_names() -> None:
    assert rs.http.Classifier is Classifier
    assert rs.http.parse_retry_after is parse_retry_after
