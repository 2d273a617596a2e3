from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import resilient as rs
from resilient.events import Event, HedgeLaunched, Hook, RetryScheduled
from resilient.telemetry import LoggingHook, OpenTelemetryHook, redact
from resilient.testing import FakeClock

Points = dict[frozenset[tuple[str, object]], float]


@dataclass
class Otel:
    reader: InMemoryMetricReader
    exporter: InMemorySpanExporter
    tracer_provider: TracerProvider
    hook: OpenTelemetryHook

    def counter(self, name: str) -> Points:
        """The counter's data points: attribute set -> value (empty if never incremented)."""
        points: Points = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                assert sm.scope.name == "resilient"
                for metric in sm.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            key = frozenset((point.attributes or {}).items())
                            points[key] = point.value  # type: ignore[union-attr]
        return points

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()


@pytest.fixture
def otel() -> Iterator[Otel]:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    hook = OpenTelemetryHook(meter_provider=meter_provider, tracer_provider=tracer_provider)
    yield Otel(reader, exporter, tracer_provider, hook)
    meter_provider.shutdown()
    tracer_provider.shutdown()


def attrs(**kw: object) -> frozenset[tuple[str, object]]:
    return frozenset((k.replace("__", "."), v) for k, v in kw.items())


class Flaky:
    """Raises ``make()`` ``failures`` times, then returns "ok"."""

    def __init__(self, failures: int, make: type[BaseException] = OSError, msg: str = "down"):
        self.failures = failures
        self.make = make
        self.msg = msg
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.make(self.msg)
        return "ok"


# --- redact ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "GET http://alice:s3cret@host/x?token=abc&page=2",
            "GET http://***@host/x?token=***&page=2",
        ),
        ("redis://:hunter2@cache:6379/0", "redis://***@cache:6379/0"),
        ("https://tok@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
        ("http://u:p@ss@host/", "http://***@host/"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=f00d&v=1",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&v=1",
        ),
        ("?api_key=k1;access_token=t2#frag", "?api_key=***;access_token=***#frag"),
        ("Authorization: Bearer xyz", "Authorization: Bearer ***"),
        ("proxy-authorization: Basic dXNlcjpw", "proxy-authorization: Basic ***"),
        ("Cookie: sid=1; csrf=2\nnext line", "Cookie: ***\nnext line"),
        (
            "{'Authorization': 'Digest u=\"a\", r=\"b\"', 'Accept': '*/*'}",
            "{'Authorization': '***', 'Accept': '*/*'}",
        ),
        ('{"password": "correct horse", "user": "bob"}', '{"password": "***", "user": "bob"}'),
        ("client_secret = s1 and X-Api-Key: k2", "client_secret = *** and X-Api-Key: ***"),
        (
            "connection refused: http://host:8080/a?b=c",
            "connection refused: http://host:8080/a?b=c",
        ),
        # The reprs of header mappings and lists of pairs (httpx, h11, aiohttp), bytes or str.
        ("{b'authorization': b'Bearer t1'}", "{b'authorization': b'***'}"),
        (
            "[(b'authorization', b'Bearer t2'), (b'accept', b'*/*')]",
            "[(b'authorization', b'***'), (b'accept', b'*/*')]",
        ),
        ("<CIMultiDict('Authorization': 'Bearer t3')>", "<CIMultiDict('Authorization': '***')>"),
        ("('Cookie', 'sid=t4')", "('Cookie', '***')"),
        (
            "[(b'X-Api-Key', b'k3y'), (b'Accept', b'*/*')]",
            "[(b'X-Api-Key', b'***'), (b'Accept', b'*/*')]",
        ),
        (
            "Authorization, Cookie and Set-Cookie headers",
            "Authorization, Cookie and Set-Cookie headers",
        ),
        # h11's refusal of a token read with its newline names the value, not the header.
        ("Illegal header value b'Bearer t5\\n'", "Illegal header value b'***'"),
        ("//user:t6@host/x", "//***@host/x"),
        ("see https://example.com//path@x", "see https://example.com//path@x"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected


# --- OpenTelemetryHook ----------------------------------------------------------------------------


def test_retries_are_counted_and_added_to_the_current_span(otel: Otel) -> None:
    retry = rs.Retry(on=OSError, wait=0, name="fetch", hooks=[otel.hook])
    flaky = Flaky(2)
    with otel.tracer_provider.get_tracer("test").start_as_current_span("op"):
        assert retry.call(flaky) == "ok"

    assert otel.counter("resilient.retries") == {attrs(resilient__policy__name="fetch"): 2}
    assert otel.counter("resilient.retry.give_ups") == {}
    (span,) = otel.spans()
    assert [e.name for e in span.events] == ["resilient.retry_scheduled"] * 2
    assert [dict(e.attributes or {}) for e in span.events] == [
        {
            "resilient.policy.name": "fetch",
            "resilient.policy.kind": "retry",
            "resilient.retry.attempt": attempt,
            "resilient.retry.wait": 0.0,
            "exception.type": "OSError",
            "exception.message": "down",
        }
        for attempt in (1, 2)
    ]


def test_give_ups_are_counted_with_their_reason(otel: Otel) -> None:
    retry = rs.Retry(on=OSError, attempts=2, wait=0, name="fetch", hooks=[otel.hook])
    with pytest.raises(OSError, match="down"):
        retry.call(Flaky(5))
    assert otel.counter("resilient.retries") == {attrs(resilient__policy__name="fetch"): 1}
    assert otel.counter("resilient.retry.give_ups") == {
        attrs(resilient__policy__name="fetch", resilient__retry__reason="attempts"): 1
    }


def test_retrying_a_result_records_its_type_not_its_value(otel: Otel) -> None:
    answers = iter([{"password": "p"}, {}])
    retry = rs.Retry(on=OSError, result=bool, wait=0, hooks=[otel.hook])
    with otel.tracer_provider.get_tracer("test").start_as_current_span("op"):
        assert retry.call(lambda: next(answers)) == {}
    (event,) = otel.spans()[0].events
    assert event.attributes is not None
    assert event.attributes["resilient.retry.result_type"] == "dict"
    assert "exception.type" not in event.attributes


def test_breaker_transitions_and_rejections(otel: Otel) -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(
        name="payments", consecutive_failures=2, open_for=5.0, clock=clock, hooks=[otel.hook]
    )
    with otel.tracer_provider.get_tracer("test").start_as_current_span("op"):
        for _ in range(2):
            with pytest.raises(OSError):
                breaker.call(Flaky(1))
        with pytest.raises(rs.CircuitOpenError):
            breaker.call(Flaky(0))
        clock.advance(5.0)
        assert breaker.call(Flaky(0)) == "ok"

    name = {"resilient.policy.name": "payments"}
    assert otel.counter("resilient.circuit.transitions") == {
        attrs(**name, resilient__circuit__from=old, resilient__circuit__to=new): 1
        for old, new in [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    }
    assert otel.counter("resilient.rejections") == {
        attrs(**name, resilient__policy__kind="circuit_breaker"): 1
    }
    (span,) = otel.spans()
    assert [e.name for e in span.events] == [
        "resilient.circuit_state_changed",
        "resilient.call_rejected",
        "resilient.circuit_state_changed",
        "resilient.circuit_state_changed",
    ]
    opened, rejected = (dict(e.attributes or {}) for e in span.events[:2])
    assert opened == {
        **name,
        "resilient.policy.kind": "circuit_breaker",
        "resilient.circuit.from": "closed",
        "resilient.circuit.to": "open",
        "resilient.circuit.open_for": 5.0,
    }
    assert rejected == {
        **name,
        "resilient.policy.kind": "circuit_breaker",
        "resilient.rejection.reason": "open",
    }


def test_fallbacks_timeouts_and_hedges_are_counted(otel: Otel) -> None:
    clock = FakeClock()

    def slow() -> str:
        clock.advance(2.0)
        return "late"

    pipeline = rs.Pipeline(
        rs.Fallback(value="cached", name="prices", hooks=[otel.hook]),
        rs.Timeout(1.0, name="prices-timeout", clock=clock, hooks=[otel.hook]),
    )
    with otel.tracer_provider.get_tracer("test").start_as_current_span("op"):
        assert pipeline.call(slow) == "cached"
        otel.hook(HedgeLaunched("search", 1, 0.05))  # no policy emits it yet

    assert otel.counter("resilient.timeouts") == {
        attrs(resilient__policy__name="prices-timeout"): 1
    }
    assert otel.counter("resilient.fallbacks") == {attrs(resilient__policy__name="prices"): 1}
    assert otel.counter("resilient.hedges") == {attrs(resilient__policy__name="search"): 1}
    (span,) = otel.spans()
    timed_out, fell_back, hedged = (dict(e.attributes or {}) for e in span.events)
    assert timed_out["resilient.timeout.seconds"] == 1.0
    assert fell_back["exception.type"] == "resilient.DeadlineExceeded"
    assert hedged["resilient.hedge.number"] == 1
    assert hedged["resilient.hedge.after"] == 0.05


def test_outside_a_span_only_breaker_transitions_get_a_span(otel: Otel) -> None:
    rs.Retry(on=OSError, wait=0, hooks=[otel.hook]).call(Flaky(1))
    assert otel.counter("resilient.retries") == {attrs(resilient__policy__name="retry"): 1}
    assert otel.spans() == ()

    breaker = rs.CircuitBreaker(name="db", consecutive_failures=1, hooks=[otel.hook])
    with pytest.raises(OSError):
        breaker.call(Flaky(1))
    (span,) = otel.spans()
    assert span.name == "resilient.circuit_state_changed"
    assert span.parent is None
    assert span.attributes is not None
    assert span.attributes["resilient.circuit.to"] == "open"
    assert [e.name for e in span.events] == ["resilient.circuit_state_changed"]


def test_exception_messages_can_be_left_out(otel: Otel) -> None:
    hook = OpenTelemetryHook(tracer_provider=otel.tracer_provider, exception_messages=False)
    with otel.tracer_provider.get_tracer("test").start_as_current_span("op"):
        rs.Retry(on=OSError, wait=0, hooks=[hook]).call(Flaky(1))
    (event,) = otel.spans()[0].events
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "OSError"
    assert "exception.message" not in event.attributes


def test_global_hook_sees_every_policy(otel: Otel) -> None:
    rs.add_hook(otel.hook)
    try:
        rs.Retry(on=OSError, wait=0, name="a").call(Flaky(1))
        rs.Retry(on=OSError, wait=0, name="b").call(Flaky(1))
    finally:
        rs.remove_hook(otel.hook)
    rs.Retry(on=OSError, wait=0, name="c").call(Flaky(1))
    assert otel.counter("resilient.retries") == {
        attrs(resilient__policy__name="a"): 1,
        attrs(resilient__policy__name="b"): 1,
    }


def test_without_an_sdk_the_hook_is_a_no_op() -> None:
    hook = OpenTelemetryHook()  # the API's global providers: no-op unless an SDK was installed
    assert rs.Retry(on=OSError, wait=0, hooks=[hook]).call(Flaky(2)) == "ok"


@pytest.mark.anyio
async def test_async_calls_annotate_the_current_span(otel: Otel) -> None:
    retry = rs.Retry(on=OSError, wait=0.5, clock=FakeClock(), hooks=[otel.hook])
    flaky = Flaky(1)

    async def call() -> str:
        return flaky()

    with otel.tracer_provider.get_tracer("test").start_as_current_span("op"):
        assert await retry.call_async(call) == "ok"
    (span,) = otel.spans()
    (event,) = span.events
    assert event.name == "resilient.retry_scheduled"
    assert event.attributes is not None
    assert event.attributes["resilient.retry.wait"] == 0.5


@dataclass(frozen=True, slots=True)
class EndpointEjected(Event):
    kind: ClassVar[str] = "endpoint_ejected"
    policy: ClassVar[str] = "balancer"
    url: str
    failures: int
    exception: BaseException | None = None


def test_unknown_events_are_recorded_from_their_fields(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resilient")
    event = EndpointEjected("orders", "http://u:pw@10.0.0.1/", 3, OSError("reset"))
    with otel.tracer_provider.get_tracer("test").start_as_current_span("op"):
        otel.hook(event)
    LoggingHook()(event)

    (span_event,) = otel.spans()[0].events
    assert span_event.name == "resilient.endpoint_ejected"
    assert dict(span_event.attributes or {}) == {
        "resilient.policy.name": "orders",
        "resilient.policy.kind": "balancer",
        "resilient.endpoint_ejected.url": "http://***@10.0.0.1/",
        "resilient.endpoint_ejected.failures": 3,
        "exception.type": "OSError",
        "exception.message": "reset",
    }
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "resilient: balancer 'orders': endpoint_ejected url='http://***@10.0.0.1/', failures=3, "
        "exception.type='OSError', exception.message='reset'"
    )


# --- LoggingHook ----------------------------------------------------------------------------------


def test_logging_hook_levels_messages_and_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient")
    retry = rs.Retry(
        on=OSError, attempts=2, wait=0.25, clock=FakeClock(), name="fetch", hooks=[LoggingHook()]
    )
    with pytest.raises(ConnectionError):
        retry.call(Flaky(5, ConnectionError, "line one\nline two"))
    scheduled, gave_up = caplog.records
    assert scheduled.name == "resilient"
    assert scheduled.levelno == logging.INFO
    assert scheduled.getMessage() == (
        "resilient: retry 'fetch': attempt 1 failed with ConnectionError: line one\\nline two; "
        "retrying in 0.25 s"
    )
    assert scheduled.__dict__["resilient_event"] == "retry_scheduled"
    assert scheduled.__dict__["resilient_policy_name"] == "fetch"
    assert scheduled.__dict__["resilient_policy_kind"] == "retry"
    assert scheduled.__dict__["resilient_retry_attempt"] == 1
    assert scheduled.__dict__["resilient_retry_wait"] == 0.25
    assert scheduled.__dict__["resilient_exception_type"] == "ConnectionError"
    assert scheduled.exc_info is None
    assert gave_up.levelno == logging.WARNING
    assert gave_up.getMessage() == (
        "resilient: retry 'fetch' gave up after 2 attempt(s) (attempts): "
        "ConnectionError: line one\\nline two"
    )
    assert gave_up.__dict__["resilient_retry_reason"] == "attempts"


def test_logging_hook_breaker_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="resilient")
    breaker = rs.CircuitBreaker(
        name="db", consecutive_failures=1, clock=FakeClock(), hooks=[LoggingHook()]
    )
    with pytest.raises(OSError):
        breaker.call(Flaky(1))
    with pytest.raises(rs.CircuitOpenError):
        breaker.call(Flaky(0))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "resilient: circuit breaker 'db': closed -> open for 5 s"),
        (logging.WARNING, "resilient: circuit breaker 'db' rejected a call (open)"),
    ]
    assert caplog.records[0].__dict__["resilient_circuit_to"] == "open"


def test_logging_hook_logger_and_levels_are_configurable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("app.db")
    caplog.set_level(logging.DEBUG, logger="app.db")
    hook = LoggingHook(logger, logging.ERROR, routine_level=logging.DEBUG)
    rs.Pipeline(
        rs.Fallback(value=None, hooks=[hook]),
        rs.Retry(on=OSError, attempts=2, wait=0, hooks=[hook]),
    ).call(Flaky(5))
    assert [(r.name, r.levelno, r.__dict__["resilient_event"]) for r in caplog.records] == [
        ("app.db", logging.DEBUG, "retry_scheduled"),
        ("app.db", logging.ERROR, "retry_gave_up"),
        ("app.db", logging.ERROR, "fallback_used"),
    ]


def test_logging_hook_skips_disabled_levels(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resilient")
    rs.Retry(on=OSError, wait=0, hooks=[LoggingHook()]).call(Flaky(2))
    assert caplog.records == []


# --- credentials never leak -----------------------------------------------------------------------

SECRETS = ("s3cret", "abc", "xyz")


def test_credentials_reach_neither_logs_nor_spans(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    message = "GET http://alice:s3cret@host/x?token=abc&page=2 failed; Authorization: Bearer xyz"
    hooks: list[Hook] = [otel.hook, LoggingHook()]
    policy = rs.Pipeline(
        rs.Fallback(value="cached", hooks=hooks),
        rs.Retry(on=OSError, attempts=2, wait=0, hooks=hooks),
    )
    with otel.tracer_provider.get_tracer("test").start_as_current_span("op"):
        assert policy.call(Flaky(5, ConnectionError, message)) == "cached"

    assert len(caplog.records) == 3
    for record in caplog.records:
        text = record.getMessage() + " " + " ".join(map(repr, record.__dict__.values()))
        assert "page=2" in record.getMessage()
        for secret in SECRETS:
            assert secret not in text, (secret, text)

    (span,) = otel.spans()
    assert len(span.events) == 3
    exported = [dict(span.attributes or {})] + [dict(e.attributes or {}) for e in span.events]
    for attributes in exported:
        for secret in SECRETS:
            assert secret not in repr(attributes), (secret, attributes)
    for event in span.events:
        assert event.attributes is not None
        assert event.attributes["exception.message"] == (
            "GET http://***@host/x?token=***&page=2 failed; Authorization: Bearer ***"
        )

    for name in ("resilient.retries", "resilient.retry.give_ups", "resilient.fallbacks"):
        for secret in SECRETS:
            assert secret not in repr(otel.counter(name))


# --- a failing hook -------------------------------------------------------------------------------


def test_a_failing_hook_does_not_break_the_call(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="resilient")

    def broken(event: Event) -> None:
        raise RuntimeError("hook bug")

    seen: list[Event] = []
    retry = rs.Retry(on=OSError, wait=0, hooks=[broken, LoggingHook(), seen.append])
    assert retry.call(Flaky(1)) == "ok"

    assert [type(e) for e in seen] == [RetryScheduled]
    failed, logged = caplog.records
    assert failed.levelno == logging.ERROR
    assert "broken" in failed.getMessage()
    assert "RuntimeError" in failed.getMessage()
    assert "hook bug" not in failed.getMessage()  # messages may carry credentials: type only
    assert logged.__dict__["resilient_event"] == "retry_scheduled"
