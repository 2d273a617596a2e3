"""Telemetry hooks: structured logging and OpenTelemetry, plus `redact` for anything that may hold
credentials.

Policies report what they do through frozen event objects (`resilient.events`) handed to hooks.
This module provides two hooks. Install one for every policy in the process::

    import resilient as rs

    rs.add_hook(rs.telemetry.OpenTelemetryHook())   # counters + span events, via the OTel API
    rs.add_hook(rs.telemetry.LoggingHook())         # one log line per event on logger "resilient"

or for one policy only::

    rs.Retry(on=OSError, hooks=[rs.telemetry.LoggingHook()])

Events are emitted only off the success path, so neither hook costs anything while calls succeed.

Credentials are kept out of log lines and spans: exception messages and rejection reasons pass
through `redact` (URL userinfo, secret-looking parameters, ``Authorization`` and cookie headers) and
are cut to one line of at most 500 characters; retried results are recorded by type only; tracebacks
are not logged (they would carry the raw message). Policy names are configuration, recorded as given.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping

from opentelemetry import metrics, trace
from opentelemetry.util.types import AttributeValue

from resilient.events import (
    CallRejected,
    CircuitStateChanged,
    Event,
    FallbackUsed,
    HedgeLaunched,
    RetryGaveUp,
    RetryScheduled,
    TimedOut,
)

__all__ = ["LoggingHook", "OpenTelemetryHook", "redact"]

_MASK = "***"
_MAX_TEXT = 500

# --- redaction ------------------------------------------------------------------------------------

# scheme://userinfo@host: the userinfo runs to the last "@" before the path, query or fragment, so
# an unescaped "@" inside a password is still covered.
# (Also a network-path reference, "//user:pass@host", with no scheme.)
# (The scheme starts where no scheme character precedes it, not at any word boundary: "\b"
# would rescan "a+a+a+..." from every "a", quadratic in the text's length.)
_USERINFO = re.compile(
    r"(?P<scheme>(?:(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*:)?(?<![\w/])//)[^\s/?#'\"<>]+@",
    re.IGNORECASE,
)

_AUTH_SCHEME = r"(?:Bearer|Basic|Digest|Token|Negotiate|NTLM|AWS4-HMAC-SHA256)\s+"

# Headers whose whole value is secret and may hold spaces and ";" (cookies, Digest parameters): the
# value runs to the closing quote or the end of the line.
# Also in the reprs of header mappings and lists of pairs: {b'authorization': b'...'},
# [(b'authorization', b'...')] (a comma after a quoted name, before a quoted value).
_SECRET_HEADER = re.compile(
    r"(?P<key>(?<![\w-])(?:proxy-)?(?:authorization|(?:set-)?cookie)"
    r"(?:[\"']?\s*[:=]|[\"']\s*,(?=\s*b?[\"']))\s*)"
    rf"(?P<value>b?\"[^\"\r\n]*\"|b?'[^'\r\n]*'|(?P<scheme>{_AUTH_SCHEME})?[^\r\n'\"]*)",
    re.IGNORECASE,
)

# key=value or key: value where the key looks secret (access_token, api_key, X-Amz-Signature,
# client_secret, password, sig...). Deliberately broad: over-redacting "keyword=" costs little.
_SECRET_WORDS = r"(?:token|key|secret|pass|pwd|sig|auth|credential|session|cookie|jwt)"
_SECRET_PAIR = re.compile(
    rf"(?P<key>(?<![\w.-])[\w.-]{{0,40}}{_SECRET_WORDS}[\w.-]{{0,40}}"
    r"(?:[\"']?\s*[:=]|[\"']\s*,(?=\s*b?[\"']))\s*)"
    rf"(?P<value>b?\"[^\"\r\n]*\"|b?'[^'\r\n]*'|(?P<scheme>{_AUTH_SCHEME})?[^\s&#'\",;]*)",
    re.IGNORECASE,
)

# h11 rejects a header value (a token read with its trailing newline) naming the value, not the
# header: "Illegal header value b'Bearer abc\n'". Any such value is masked whole.
_ILLEGAL_HEADER = re.compile(
    r"(?P<key>illegal header (?:value|name)\s*)(?P<value>b?\"[^\"\r\n]*\"|b?'[^'\r\n]*'|\S+)",
    re.IGNORECASE,
)


def _mask_value(match: re.Match[str]) -> str:
    value = match["value"]
    prefix = "b" if value[:1] == "b" and value[1:2] in ("'", '"') else ""
    quote = value[len(prefix) : len(prefix) + 1]
    if quote in ("'", '"'):
        return f"{match['key']}{prefix}{quote}{_MASK}{quote}"
    return f"{match['key']}{match.groupdict().get('scheme') or ''}{_MASK}"


def redact(text: str) -> str:
    """Mask credentials in ``text``: URL userinfo, secret-looking parameters and auth headers.

    Masked: the userinfo of any ``scheme://user:pass@host`` URL; the value of every ``key=value``
    or ``key: value`` whose key contains token, key, secret, pass, pwd, sig, auth, credential,
    session, cookie or jwt (so ``access_token``, ``api_key``, ``X-Amz-Signature``,
    ``client_secret``, ``password``); and the whole value of ``Authorization``,
    ``Proxy-Authorization``, ``Cookie`` and ``Set-Cookie`` headers (an auth scheme such as
    ``Bearer`` is kept). Everything else is left as it was. It is a safety net for text that was
    never meant to hold secrets, not a guarantee for text that is made of them.

    Example::

        >>> redact("GET http://alice:s3cret@host/x?token=abc&page=2")
        'GET http://***@host/x?token=***&page=2'
        >>> redact("Authorization: Bearer xyz")
        'Authorization: Bearer ***'
    """
    text = _USERINFO.sub(rf"\g<scheme>{_MASK}@", text)
    text = _ILLEGAL_HEADER.sub(_mask_value, text)
    text = _SECRET_HEADER.sub(_mask_value, text)
    return _SECRET_PAIR.sub(_mask_value, text)


def _clean(text: str) -> str:
    """Redacted, on one line (no forged log lines), and at most `_MAX_TEXT` characters."""
    text = redact(text).replace("\r", "\\r").replace("\n", "\\n")
    if len(text) > _MAX_TEXT:
        text = text[: _MAX_TEXT - 3] + "..."
    return text


def _type_name(obj: object) -> str:
    """``module.QualName``, or just ``QualName`` for builtins (as OpenTelemetry's SDK writes it)."""
    cls = type(obj)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _exception_message(exc: BaseException) -> str:
    try:
        return _clean(str(exc))
    except Exception:  # a broken __str__ must not break telemetry
        return "<unprintable>"


# --- the attributes of an event -------------------------------------------------------------------


def _attributes(event: Event, *, messages: bool = True) -> dict[str, AttributeValue]:
    """Everything worth recording about ``event``, keyed by OpenTelemetry-style attribute names."""
    attrs: dict[str, AttributeValue] = {
        "resilient.policy.name": event.name,
        "resilient.policy.kind": event.policy,
    }
    if isinstance(event, RetryScheduled):
        attrs["resilient.retry.attempt"] = event.attempt
        attrs["resilient.retry.wait"] = event.wait
        if event.exception is None:
            attrs["resilient.retry.result_type"] = _type_name(event.result)
    elif isinstance(event, RetryGaveUp):
        attrs["resilient.retry.attempts"] = event.attempts
        attrs["resilient.retry.reason"] = event.reason
    elif isinstance(event, CircuitStateChanged):
        attrs["resilient.circuit.from"] = event.old
        attrs["resilient.circuit.to"] = event.new
        if event.open_for is not None:
            attrs["resilient.circuit.open_for"] = event.open_for
    elif isinstance(event, CallRejected):
        attrs["resilient.policy.kind"] = event.rejected_by
        if event.reason:
            attrs["resilient.rejection.reason"] = _clean(event.reason)
    elif isinstance(event, HedgeLaunched):
        attrs["resilient.hedge.number"] = event.hedge
        attrs["resilient.hedge.after"] = event.after
    elif isinstance(event, TimedOut):
        attrs["resilient.timeout.seconds"] = event.timeout
    elif not isinstance(event, FallbackUsed) and dataclasses.is_dataclass(event):
        # An event this module does not know yet: its plain fields, redacted.
        for f in dataclasses.fields(event):
            value = getattr(event, f.name, None)
            if f.name == "name" or value is None or isinstance(value, BaseException):
                continue
            key = f"resilient.{event.kind}.{f.name}"
            if isinstance(value, (bool, int, float)):
                attrs[key] = value
            elif isinstance(value, str):
                attrs[key] = _clean(value)
    exc = getattr(event, "exception", None)
    if isinstance(exc, BaseException):
        attrs["exception.type"] = _type_name(exc)
        if messages:
            attrs["exception.message"] = _exception_message(exc)
    return attrs


# --- logging --------------------------------------------------------------------------------------


def _outcome(event: RetryScheduled | RetryGaveUp | FallbackUsed) -> str:
    exc = event.exception
    if exc is not None:
        message = _exception_message(exc)
        return f"{_type_name(exc)}: {message}" if message else _type_name(exc)
    if isinstance(event, RetryScheduled):
        return f"a result to retry ({_type_name(event.result)})"
    return "a failure"


class LoggingHook:
    """A hook that logs each event as one line, with structured fields in ``extra``.

    Levels: a scheduled retry and a launched hedge are routine (``routine_level``, INFO by
    default); everything else — a retry given up, a rejected call, a breaker state change (both
    opening and closing, so a log filtered at WARNING shows when it recovered too), a timeout, a
    fallback used, an unknown event — is logged at ``level`` (WARNING by default).

    Every record carries ``resilient_event`` (the event kind) and the event's attributes as flat
    ``extra`` fields named like the OpenTelemetry attributes with ``.`` turned into ``_``:
    ``resilient_policy_name``, ``resilient_policy_kind``, ``resilient_retry_attempt``,
    ``resilient_retry_wait``, ``resilient_circuit_from``, ``resilient_exception_type``,
    ``resilient_exception_message`` (redacted) and so on, ready for a JSON formatter. Exception
    messages are redacted with `redact` and tracebacks are not logged.

    ``logger`` must be a `logging.Logger` (a ``LoggerAdapter`` would replace the ``extra`` fields).

    Example::

        rs.add_hook(rs.telemetry.LoggingHook())
        rs.Retry(on=OSError, hooks=[rs.telemetry.LoggingHook(logging.getLogger("app.db"))])
    """

    __slots__ = ("level", "logger", "routine_level")

    def __init__(
        self,
        logger: logging.Logger | None = None,
        level: int = logging.WARNING,
        *,
        routine_level: int = logging.INFO,
    ) -> None:
        self.logger = logger if logger is not None else logging.getLogger("resilient")
        self.level = level
        self.routine_level = routine_level

    def __repr__(self) -> str:
        return f"LoggingHook(logger={self.logger.name!r}, level={logging.getLevelName(self.level)})"

    def __call__(self, event: Event) -> None:
        routine = isinstance(event, (RetryScheduled, HedgeLaunched))
        level = self.routine_level if routine else self.level
        if not self.logger.isEnabledFor(level):
            return
        msg, args = self._message(event)
        extra: dict[str, object] = {"resilient_event": event.kind}
        for key, value in _attributes(event).items():
            extra[_extra_key(key)] = value
        self.logger.log(level, msg, *args, extra=extra)

    @staticmethod
    def _message(event: Event) -> tuple[str, tuple[object, ...]]:
        who = (event.policy.replace("_", " "), event.name)
        if isinstance(event, RetryScheduled):
            return (
                "resilient: %s %r: attempt %d failed with %s; retrying in %.3g s",
                (*who, event.attempt, _outcome(event), event.wait),
            )
        if isinstance(event, RetryGaveUp):
            return (
                "resilient: %s %r gave up after %d attempt(s) (%s): %s",
                (*who, event.attempts, event.reason, _outcome(event)),
            )
        if isinstance(event, CircuitStateChanged):
            if event.open_for is not None:
                return (
                    "resilient: %s %r: %s -> %s for %.3g s",
                    (*who, event.old, event.new, event.open_for),
                )
            return "resilient: %s %r: %s -> %s", (*who, event.old, event.new)
        if isinstance(event, CallRejected):
            kind = event.rejected_by.replace("_", " ")
            if event.reason:
                return "resilient: %s %r rejected a call (%s)", (
                    kind,
                    event.name,
                    _clean(event.reason),
                )
            return "resilient: %s %r rejected a call", (kind, event.name)
        if isinstance(event, HedgeLaunched):
            return "resilient: %s %r: hedge %d launched after %.3g s", (
                *who,
                event.hedge,
                event.after,
            )
        if isinstance(event, TimedOut):
            return "resilient: %s %r: the call did not finish within %.3g s", (
                *who,
                event.timeout,
            )
        if isinstance(event, FallbackUsed):
            return "resilient: %s %r replaced %s", (*who, _outcome(event))
        own = f"resilient.{event.kind}."
        detail = ", ".join(
            f"{key.removeprefix(own)}={value!r}"
            for key, value in _attributes(event).items()
            if not key.startswith("resilient.policy.")
        )
        return "resilient: %s %r: %s %s", (*who, event.kind, detail)


def _extra_key(attribute: str) -> str:
    key = attribute.replace(".", "_")
    return key if key.startswith("resilient_") else f"resilient_{key}"


# --- OpenTelemetry --------------------------------------------------------------------------------


class OpenTelemetryHook:
    """A hook that counts events with OpenTelemetry metrics and adds them to the current span.

    Counters (meter ``resilient``), with their attributes:

    - ``resilient.retries``: retries scheduled; ``resilient.policy.name``.
    - ``resilient.retry.give_ups``: calls whose retrying stopped while still failing;
      ``resilient.policy.name``, ``resilient.retry.reason`` (attempts, deadline, budget, stop).
    - ``resilient.rejections``: calls a policy refused; ``resilient.policy.kind``,
      ``resilient.policy.name``.
    - ``resilient.circuit.transitions``: breaker state changes; ``resilient.policy.name``,
      ``resilient.circuit.from``, ``resilient.circuit.to``.
    - ``resilient.hedges``, ``resilient.fallbacks``, ``resilient.timeouts``: hedges launched,
      fallbacks used, calls timed out; ``resilient.policy.name``.

    Every event also becomes a span event named ``resilient.<kind>`` (``resilient.retry_scheduled``,
    ``resilient.circuit_state_changed``...) on the current span, with the policy's name and kind,
    the event's fields (``resilient.retry.attempt``, ``resilient.retry.wait`` in seconds...) and,
    for a failure, ``exception.type`` and a redacted ``exception.message`` (left out with
    ``exception_messages=False``). A breaker state change that happens outside any span gets a short
    span of its own from ``tracer_provider``, as it concerns every later call, not one; other events
    outside a span are only counted.

    Only the OpenTelemetry API is used: without an SDK installed everything is a no-op. Providers
    default to the global ones; instruments are created once, here.

    Example::

        rs.add_hook(rs.telemetry.OpenTelemetryHook())
        hook = rs.telemetry.OpenTelemetryHook(meter_provider=provider)
        rs.CircuitBreaker(name="payments", hooks=[hook])
    """

    __slots__ = (
        "_exception_messages",
        "_fallbacks",
        "_give_ups",
        "_hedges",
        "_rejections",
        "_retries",
        "_timeouts",
        "_tracer",
        "_transitions",
    )

    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        exception_messages: bool = True,
    ) -> None:
        from resilient import __version__  # here, not at import: resilient imports this module

        meter = metrics.get_meter("resilient", __version__, meter_provider=meter_provider)
        self._tracer = trace.get_tracer("resilient", __version__, tracer_provider=tracer_provider)
        self._exception_messages = exception_messages
        counter = meter.create_counter
        self._retries = counter(
            "resilient.retries", unit="{retry}", description="Retries scheduled after a failure."
        )
        self._give_ups = counter(
            "resilient.retry.give_ups",
            unit="{call}",
            description="Calls whose retrying stopped while they were still failing.",
        )
        self._rejections = counter(
            "resilient.rejections", unit="{call}", description="Calls a policy refused to start."
        )
        self._transitions = counter(
            "resilient.circuit.transitions",
            unit="{transition}",
            description="Circuit breaker state changes.",
        )
        self._hedges = counter(
            "resilient.hedges", unit="{hedge}", description="Hedged attempts launched."
        )
        self._fallbacks = counter(
            "resilient.fallbacks",
            unit="{call}",
            description="Failures replaced by a fallback answer.",
        )
        self._timeouts = counter(
            "resilient.timeouts", unit="{call}", description="Calls that ran out of time."
        )

    def __repr__(self) -> str:
        return "OpenTelemetryHook()"

    def __call__(self, event: Event) -> None:
        self._count(event)
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                f"resilient.{event.kind}",
                _attributes(event, messages=self._exception_messages),
            )
        elif isinstance(event, CircuitStateChanged) and not span.get_span_context().is_valid:
            attrs = _attributes(event, messages=self._exception_messages)
            orphan = self._tracer.start_span(f"resilient.{event.kind}", attributes=attrs)
            orphan.add_event(f"resilient.{event.kind}", attrs)
            orphan.end()

    def _count(self, event: Event) -> None:
        name: Mapping[str, AttributeValue] = {"resilient.policy.name": event.name}
        if isinstance(event, RetryScheduled):
            self._retries.add(1, name)
        elif isinstance(event, RetryGaveUp):
            self._give_ups.add(1, {**name, "resilient.retry.reason": event.reason})
        elif isinstance(event, CallRejected):
            self._rejections.add(1, {**name, "resilient.policy.kind": event.rejected_by})
        elif isinstance(event, CircuitStateChanged):
            self._transitions.add(
                1, {**name, "resilient.circuit.from": event.old, "resilient.circuit.to": event.new}
            )
        elif isinstance(event, HedgeLaunched):
            self._hedges.add(1, name)
        elif isinstance(event, FallbackUsed):
            self._fallbacks.add(1, name)
        elif isinstance(event, TimedOut):
            self._timeouts.add(1, name)
