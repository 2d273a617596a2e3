from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from resilient.balancing.health import (
    EndpointHealth,
    HealthCheck,
    HealthChecker,
    HealthStatus,
    ProbeScheduler,
    phi_accrual,
)
from resilient.discovery import Endpoint
from resilient.testing import FakeClock, Fleet

A = "http://10.0.0.1:8000"
B = "http://10.0.0.2:8000"
Change = tuple[str, HealthStatus, HealthStatus]


class Backend:
    """A MockTransport handler: every host answers 200 unless told otherwise; requests recorded."""

    def __init__(self) -> None:
        self.answers: dict[str, int | Exception] = {}
        self.requests: list[httpx.Request] = []
        self.on_request: Callable[[httpx.Request], None] | None = None

    def set(self, url: str, answer: int | Exception) -> None:
        self.answers[httpx.URL(url).host] = answer

    def probes(self, url: str) -> int:
        host = httpx.URL(url).host
        return sum(1 for r in self.requests if r.url.host == host)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.on_request is not None:
            self.on_request(request)
        answer = self.answers.get(request.url.host, 200)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, text="ok")


def make(
    check: HealthCheck,
    *,
    random: Callable[[], float] | None = None,
    backend: Backend | None = None,
) -> tuple[HealthChecker, FakeClock, Backend, list[Change]]:
    clock = FakeClock()
    backend = backend or Backend()
    changes: list[Change] = []
    checker = HealthChecker(
        check,
        clock=clock,
        random=random,
        transport=httpx.MockTransport(backend),
        on_change=lambda url, old, new: changes.append((url, old, new)),
    )
    return checker, clock, backend, changes


def advance_to(clock: FakeClock, t: float) -> None:
    while clock.monotonic() < t:
        clock.advance(t - clock.monotonic())


def step(checker: HealthChecker, clock: FakeClock, wake: float | None) -> float | None:
    """Move the clock to the wake-up time and run one poll, as a runner would."""
    assert wake is not None
    advance_to(clock, wake)
    return checker.poll()


def sequence(*values: float) -> Callable[[], float]:
    it = iter(values)
    return lambda: next(it)


# -- HealthCheck -------------------------------------------------------------------------------------


def test_health_check_defaults() -> None:
    check = HealthCheck()
    assert check.path == "/health"
    assert (check.interval, check.jitter, check.timeout) == (5.0, 0.1, 1.0)
    assert (check.healthy_threshold, check.unhealthy_threshold) == (2, 3)
    assert check.expected_statuses == frozenset(range(200, 300))
    assert check.phi_threshold is None
    assert HealthCheck(expected_statuses={200, 204}).expected_statuses == frozenset({200, 204})
    assert isinstance(HealthCheck(expected_statuses={200}).expected_statuses, frozenset)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"path": "health"}, "path"),
        ({"path": ""}, "path"),
        ({"interval": 0.0}, "interval"),
        ({"interval": math.inf}, "interval"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.0}, "jitter"),
        ({"timeout": -1.0}, "timeout"),
        ({"healthy_threshold": 0}, "healthy_threshold"),
        ({"unhealthy_threshold": 1.5}, "unhealthy_threshold"),
        ({"expected_statuses": frozenset()}, "expected_statuses"),
        ({"expected_statuses": frozenset({99})}, "expected_statuses"),
        ({"expected_statuses": "200"}, "expected_statuses"),
        ({"phi_threshold": 0.0}, "phi_threshold"),
        ({"phi_threshold": 400.0}, "phi_threshold"),
        ({"phi_window": 0}, "phi_window"),
        ({"phi_min_stddev": 0.0}, "phi_min_stddev"),
    ],
)
def test_health_check_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        HealthCheck(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_checker_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="check"):
        HealthChecker(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="transport"):
        HealthChecker(HealthCheck(), transport=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clock"):
        HealthChecker(HealthCheck(), clock=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Endpoint"):
        HealthChecker(HealthCheck()).update([A])  # type: ignore[list-item]


# -- ProbeScheduler ----------------------------------------------------------------------------------


def test_scheduler_first_probe_at_once_and_in_flight_keys_are_never_due() -> None:
    scheduler = ProbeScheduler(interval=10.0, jitter=0.0)
    assert scheduler.next_wakeup() is None and scheduler.due(100.0) == []
    scheduler.add("a", now=5.0)
    assert "a" in scheduler and len(scheduler) == 1
    assert scheduler.next_wakeup() == 5.0
    assert scheduler.due(4.9) == []
    assert scheduler.due(5.0) == ["a"]
    assert scheduler.in_flight() == {"a"}
    assert scheduler.next_wakeup() is None  # nothing to wake for until the probe is done
    assert scheduler.due(1000.0) == []  # a slow probe is not probed again meanwhile
    assert scheduler.done("a", now=5.5) == 15.5  # the next probe counts from the end of this one
    assert scheduler.next_wakeup() == 15.5
    assert scheduler.done("a", now=6.0) is None  # not in flight: ignored
    assert scheduler.next_wakeup() == 15.5


def test_scheduler_jitter_comes_from_the_injected_random() -> None:
    scheduler = ProbeScheduler(interval=10.0, jitter=0.1, random=sequence(0.0, 0.5, 0.75, 0.25))
    scheduler.add("a", now=0.0)
    now, due_times = 0.0, []
    for _ in range(4):
        assert scheduler.due(now) == ["a"]
        when = scheduler.done("a", now)
        assert when is not None
        due_times.append(when)
        assert scheduler.due(when - 1e-9) == []
        now = when
    # 10 × (1 + 0.1 × (2u - 1)) for u = 0, 0.5, 0.75, 0.25: 9, 10, 10.5, 9.5
    assert due_times == pytest.approx([9.0, 19.0, 29.5, 39.0])


def test_scheduler_intervals_stay_within_the_jitter_band() -> None:
    rng = random.Random(7)
    scheduler = ProbeScheduler(interval=2.0, jitter=0.25, random=rng.random)
    gaps = [scheduler.next_interval() for _ in range(2000)]
    assert min(gaps) >= 1.5 and max(gaps) < 2.5
    assert min(gaps) < 1.55 and max(gaps) > 2.45  # the whole band is used
    assert ProbeScheduler(interval=2.0).next_interval() == 2.0


def test_scheduler_orders_due_keys_and_forgets_discarded_ones() -> None:
    scheduler = ProbeScheduler(interval=1.0)
    scheduler.add("late", now=3.0)
    scheduler.add("early", now=1.0)
    scheduler.add("gone", now=0.0)
    scheduler.add("early", now=2.5)  # already tracked: keeps its schedule
    scheduler.discard("gone")
    assert "gone" not in scheduler
    assert scheduler.due(10.0) == ["early", "late"]
    scheduler.discard("late")
    assert scheduler.done("late", now=10.0) is None
    assert scheduler.in_flight() == {"early"}


def test_scheduler_abandon_makes_the_key_due_again() -> None:
    scheduler = ProbeScheduler(interval=1.0)
    scheduler.add("a", now=0.0)
    assert scheduler.due(0.0) == ["a"]
    scheduler.abandon("a")
    assert scheduler.in_flight() == frozenset()
    assert scheduler.next_wakeup() == 0.0
    assert scheduler.due(0.1) == ["a"]


def test_scheduler_validation() -> None:
    with pytest.raises(ValueError, match="interval"):
        ProbeScheduler(interval=0.0)
    with pytest.raises(ValueError, match="jitter"):
        ProbeScheduler(interval=1.0, jitter=1.0)


# -- the state machine, on a fake clock --------------------------------------------------------------


def test_unhealthy_after_exactly_the_threshold_and_back_after_the_healthy_threshold() -> None:
    check = HealthCheck(interval=1.0, jitter=0.0, unhealthy_threshold=3, healthy_threshold=2)
    checker, clock, backend, changes = make(check)
    checker.update([Endpoint(A), Endpoint(B)])
    assert checker.status(A) == "healthy"  # before any probe: assume healthy
    version = checker.version

    wake = checker.poll()  # t = 0: the first probes go out at once
    assert backend.probes(A) == backend.probes(B) == 1
    assert wake == 1.0
    assert changes == [] and checker.version == version

    backend.set(A, 503)
    statuses = []
    for _ in range(3):
        wake = step(checker, clock, wake)
        statuses.append(checker.status(A))
    assert statuses == ["suspect", "suspect", "unhealthy"]
    assert clock.monotonic() == 3.0
    assert changes == [(A, "healthy", "suspect"), (A, "suspect", "unhealthy")]
    assert checker.version == version + 2
    stats = checker.statistics()[A]
    assert (stats.consecutive_failures, stats.failures, stats.probes) == (3, 3, 4)
    assert stats.last_error == "status 503"
    assert stats.changed_at == 3.0

    backend.set(A, 200)
    wake = step(checker, clock, wake)
    assert checker.status(A) == "unhealthy"  # one success is not enough
    wake = step(checker, clock, wake)
    assert checker.status(A) == "healthy"
    assert changes[2:] == [(A, "unhealthy", "healthy")]
    assert checker.status(B) == "healthy" and all(c[0] == A for c in changes)
    assert checker.statuses() == {A: "healthy", B: "healthy"}


def test_failures_must_be_consecutive() -> None:
    check = HealthCheck(interval=1.0, jitter=0.0, unhealthy_threshold=3)
    checker, clock, backend, changes = make(check)
    checker.update([Endpoint(A)])
    wake = checker.poll()
    for answer in (503, 503, 200, 503, 503, 200):
        backend.set(A, answer)
        wake = step(checker, clock, wake)
        assert checker.status(A) != "unhealthy"
    assert changes == [
        (A, "healthy", "suspect"),
        (A, "suspect", "healthy"),
        (A, "healthy", "suspect"),
        (A, "suspect", "healthy"),
    ]


def test_an_unhealthy_threshold_of_one_skips_suspect() -> None:
    checker, clock, backend, changes = make(
        HealthCheck(interval=1.0, unhealthy_threshold=1, healthy_threshold=1)
    )
    checker.update([Endpoint(A)])
    backend.set(A, httpx.ConnectError("refused"))
    wake = checker.poll()
    assert checker.status(A) == "unhealthy"
    backend.set(A, 204)
    step(checker, clock, wake)
    assert changes == [(A, "healthy", "unhealthy"), (A, "unhealthy", "healthy")]


def test_probe_requests_and_outcomes() -> None:
    check = HealthCheck(
        path="/ready", interval=1.0, jitter=0.0, unhealthy_threshold=5, expected_statuses={200, 429}
    )
    checker, clock, backend, _ = make(check)
    prefixed = "http://10.0.0.3:9000/api/"
    checker.update([Endpoint(A), Endpoint(prefixed)])
    wake = checker.poll()
    assert sorted(str(r.url) for r in backend.requests) == [
        "http://10.0.0.1:8000/ready",
        "http://10.0.0.3:9000/api/ready",
    ]
    assert all(r.method == "GET" for r in backend.requests)
    assert backend.requests[0].headers["user-agent"] == "resilient-healthcheck"

    outcomes: list[tuple[int | Exception, str | None]] = [
        (429, None),  # expected, by configuration
        (200, None),
        (204, "status 204"),  # not in this check's expected statuses
        (301, "status 301"),  # redirects are not followed
        (500, "status 500"),
        (httpx.ConnectError("connection refused"), "ConnectError: connection refused"),
        (httpx.ReadTimeout("timed out"), "ReadTimeout: timed out"),
    ]
    for answer, error in outcomes:
        backend.set(A, answer)
        wake = step(checker, clock, wake)
        stats = checker.statistics()[A]
        assert stats.last_probe_at == clock.monotonic()
        if error is None:
            assert stats.consecutive_failures == 0 and stats.last_success_at == clock.monotonic()
        else:
            assert stats.consecutive_failures >= 1 and stats.last_error == error
    assert checker.statistics()[A].failures == 5


def test_endpoints_are_added_healthy_and_removed_ones_forgotten() -> None:
    check = HealthCheck(interval=1.0, jitter=0.0, unhealthy_threshold=1)
    checker, clock, backend, changes = make(check)
    checker.update([Endpoint(A)])
    backend.set(B, 503)
    wake = checker.poll()
    assert backend.probes(B) == 0

    advance_to(clock, 0.5)
    v = checker.version
    checker.update([Endpoint(A), Endpoint(B)])
    assert checker.version == v + 1
    assert checker.status(B) == "healthy"  # added: assumed healthy until proven otherwise
    assert checker.poll() == 1.0  # B's first probe goes out at once...
    assert checker.status(B) == "unhealthy"  # ... and fails
    assert backend.probes(B) == 1

    checker.update([Endpoint(A)])
    assert B not in checker.statistics() and B not in checker.statuses()
    assert checker.status(B) == "healthy"  # untracked: no opinion
    assert checker.phi(B) == 0.0
    for _ in range(3):
        wake = step(checker, clock, wake)
    assert backend.probes(B) == 1  # never probed again

    checker.update([Endpoint(B), Endpoint(A)])  # back: a fresh start
    fresh = checker.statistics()[B]
    assert fresh.status == "healthy" and fresh.probes == 0 and fresh.failures == 0
    assert changes == [(B, "healthy", "unhealthy")]  # membership changes call no on_change


def test_a_probe_in_flight_for_a_removed_endpoint_is_ignored() -> None:
    check = HealthCheck(interval=1.0, unhealthy_threshold=1)
    checker, _, backend, changes = make(check)
    backend.set(B, 503)

    def remove_b_meanwhile(request: httpx.Request) -> None:
        if request.url.host == httpx.URL(B).host:
            checker.update([Endpoint(A), Endpoint(B, weight=2.0)])  # kept: state stays
            checker.update([Endpoint(A)])  # removed while its probe is in flight
            checker.update([Endpoint(A), Endpoint(B)])  # and re-added

    backend.on_request = remove_b_meanwhile
    checker.update([Endpoint(A), Endpoint(B)])
    checker.poll()
    assert changes == [] and checker.status(B) == "healthy"
    assert checker.statistics()[B].probes == 0  # the new B's own first probe is still due


def test_update_with_the_same_urls_keeps_state_and_version() -> None:
    checker, _, backend, _ = make(HealthCheck(unhealthy_threshold=1))
    checker.update([Endpoint(A)])
    backend.set(A, 503)
    checker.poll()
    v = checker.version
    checker.update([Endpoint(A, weight=3.0), Endpoint(A, weight=3.0)])
    assert checker.version == v and checker.status(A) == "unhealthy"


def test_on_change_errors_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[Change] = []

    def broken(url: str, old: HealthStatus, new: HealthStatus) -> None:
        calls.append((url, old, new))
        raise RuntimeError("boom")

    backend = Backend()
    backend.set(A, 503)
    checker = HealthChecker(
        HealthCheck(unhealthy_threshold=1),
        clock=FakeClock(),
        transport=httpx.MockTransport(backend),
        on_change=broken,
    )
    checker.update([Endpoint(A)])
    with caplog.at_level(logging.WARNING, logger="resilient.health"):
        checker.poll()
    assert calls == [(A, "healthy", "unhealthy")]
    assert checker.status(A) == "unhealthy"
    assert "on_change callback failed" in caplog.text
    assert f"{A} is unhealthy after 1 failed health check(s) (last: status 503)" in caplog.text


# -- phi accrual --------------------------------------------------------------------------------------


def expected_phi(elapsed: float, mean: float, stddev: float) -> float:
    """The formula, written independently: -log10(1 - F(elapsed)) with F the normal CDF."""
    cdf = 0.5 * (1.0 + math.erf((elapsed - mean) / (stddev * math.sqrt(2.0))))
    return -math.log10(1.0 - cdf)


def test_phi_accrual_values() -> None:
    # By hand, mean 1.0 s and stddev 0.1 s:
    #   t = 1.0: F = 0.5,                 phi = -log10(0.5)     = 0.30103
    #   t = 1.2: 2 stddevs, 1 - F = 0.02275, phi = -log10(0.02275) = 1.64302
    #   t = 1.3: 3 stddevs, 1 - F = 0.00135, phi = -log10(0.00135) = 2.86970
    assert phi_accrual(1.0, 1.0, 0.1) == pytest.approx(0.30103, abs=1e-5)
    assert phi_accrual(1.2, 1.0, 0.1) == pytest.approx(1.64302, abs=1e-5)
    assert phi_accrual(1.3, 1.0, 0.1) == pytest.approx(2.86970, abs=1e-5)
    for elapsed in (0.0, 0.5, 0.9, 1.0, 1.05, 1.2, 1.3, 1.5):  # beyond, erf loses digits
        assert phi_accrual(elapsed, 1.0, 0.1) == pytest.approx(expected_phi(elapsed, 1.0, 0.1))
    assert phi_accrual(0.0, 1.0, 0.1) < 1e-20  # early: no suspicion (and never -0.0)
    assert math.copysign(1.0, phi_accrual(-10.0, 1.0, 0.1)) == 1.0
    # Far in the tail 1 - (1 + erf) / 2 is exactly 0; erfc keeps going, then phi is infinite.
    assert 0.5 * (1.0 + math.erf(9.0 / math.sqrt(2.0))) == 1.0  # 9 stddevs late: no digits left
    assert phi_accrual(1.9, 1.0, 0.1) == pytest.approx(18.947, abs=1e-3)  # 1 - F = 1.13e-19
    assert phi_accrual(1000.0, 1.0, 0.1) == math.inf
    with pytest.raises(ValueError, match="stddev"):
        phi_accrual(1.0, 1.0, 0.0)


def test_phi_from_heartbeats_and_the_suspect_transition() -> None:
    # u = 0.4 / 0.6 with jitter 0.5 gives gaps of 0.9 s / 1.1 s: mean 1.0 s, stddev 0.1 s; then
    # u = 0.99 delays the next probe to 1.49 s after the last, past the phi threshold of 2.
    # A window of 4: the two seed samples (0.75 s, 1.25 s) are gone after four real ones.
    check = HealthCheck(
        interval=1.0, jitter=0.5, phi_threshold=2.0, phi_window=4, phi_min_stddev=0.01
    )
    checker, clock, _, changes = make(check, random=sequence(0.4, 0.6, 0.4, 0.6, 0.99, 0.5))
    checker.update([Endpoint(A)])
    wake = checker.poll()
    for expected in (0.9, 2.0, 2.9, 4.0):
        assert wake == pytest.approx(expected)
        wake = step(checker, clock, wake)
    assert clock.monotonic() == pytest.approx(4.0)
    # The runner must wake when phi crosses 2: mean + z × stddev after the last heartbeat, with
    # 1 - F(z) = 10**-2, z = 2.3263: 4.0 + 1.0 + 0.23263 = 5.23263 s, before the probe at 5.49 s.
    assert wake == pytest.approx(5.23263, abs=1e-5)
    advance_to(clock, 5.0)
    assert checker.phi(A) == pytest.approx(0.30103, abs=1e-5)
    assert checker.phi(A) == pytest.approx(expected_phi(1.0, 1.0, 0.1))
    advance_to(clock, 5.2)
    assert checker.phi(A) == pytest.approx(1.64302, abs=1e-5)
    assert checker.statistics()[A].phi == pytest.approx(expected_phi(1.2, 1.0, 0.1))
    assert checker.status(A) == "healthy"  # phi below the threshold

    wake = step(checker, clock, wake)
    assert checker.status(A) == "suspect"
    assert checker.phi(A) == pytest.approx(2.0)
    assert changes == [(A, "healthy", "suspect")]
    assert wake == pytest.approx(5.49)

    step(checker, clock, wake)  # the late heartbeat arrives
    assert checker.status(A) == "healthy"
    assert changes[1:] == [(A, "suspect", "healthy")]
    assert checker.phi(A) < 0.1


def test_phi_without_samples_uses_the_interval_as_first_estimate() -> None:
    # Akka's first-heartbeat estimate: samples 0.75 s and 1.25 s, mean 1 s, stddev 0.25 s.
    checker, clock, _, _ = make(HealthCheck(interval=1.0))
    checker.update([Endpoint(A)])  # being added counts as the first heartbeat, at t = 0
    assert checker.phi(A) == pytest.approx(expected_phi(0.0, 1.0, 0.25))
    advance_to(clock, 1.25)
    # one stddev late: 1 - F = 0.158655, phi = 0.79955 (by hand)
    assert checker.phi(A) == pytest.approx(0.79955, abs=1e-5)


def test_phi_samples_skip_gaps_that_span_a_failed_probe() -> None:
    check = HealthCheck(
        interval=1.0, jitter=0.0, unhealthy_threshold=5, phi_window=2, phi_min_stddev=0.1
    )
    checker, clock, backend, _ = make(check)
    checker.update([Endpoint(A)])
    wake = checker.poll()  # t = 0 ok
    for answer in (200, 503, 200, 200):  # t = 1 ok, 2 fails, 3 ok, 4 ok
        backend.set(A, answer)
        wake = step(checker, clock, wake)
    # The last two samples: 0→1 and 3→4, both 1 s (the 1→3 gap spans the failure, so it is not
    # one; if it were, the window would hold 2 s and 1 s): mean 1, stddev 0 → 0.1.
    advance_to(clock, 5.1)
    assert checker.phi(A) == pytest.approx(expected_phi(1.1, 1.0, 0.1))
    assert checker.phi(A) == pytest.approx(0.79955, abs=1e-5)


def test_phi_window_is_bounded() -> None:
    # Ten 1.0 s gaps, then three of 1.4 s (u = 0.5, then 0.9, with jitter 0.5): a window of 3
    # keeps only the 1.4 s gaps, so being 1.4 s late is being exactly as late as usual.
    check = HealthCheck(interval=1.0, jitter=0.5, phi_window=3, phi_min_stddev=0.1)
    checker, clock, _, _ = make(check, random=sequence(*[0.5] * 10, *[0.9] * 4))
    checker.update([Endpoint(A)])
    wake = checker.poll()
    for _ in range(13):
        wake = step(checker, clock, wake)
    last = clock.monotonic()
    assert wake == pytest.approx(last + 1.4)
    advance_to(clock, last + 1.4)
    assert checker.phi(A) == pytest.approx(0.30103, abs=1e-5)  # mean 1.4: F = 0.5


def test_poll_after_close_raises() -> None:
    checker, _, _, _ = make(HealthCheck())
    checker.close()
    checker.close()
    with pytest.raises(RuntimeError, match="closed"):
        checker.poll()
    with pytest.raises(RuntimeError, match="closed"):
        checker.start_thread()


def test_endpoint_health_is_a_frozen_value() -> None:
    checker, _, _, _ = make(HealthCheck())
    checker.update([Endpoint(A)])
    stats = checker.statistics()[A]
    assert isinstance(stats, EndpointHealth)
    with pytest.raises(AttributeError):
        stats.status = "unhealthy"  # type: ignore[misc]


# -- the thread runner ---------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Poll until ``predicate()``; return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


def health_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("resilient-health")]


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    with Fleet(2, seed=99) as running:
        yield running


@pytest.mark.slow
def test_thread_runner_kill_and_restart(fleet: Fleet) -> None:
    a, b = fleet.urls
    changes: list[Change] = []
    check = HealthCheck(interval=0.05, timeout=1.0, healthy_threshold=2, unhealthy_threshold=2)
    before = set(threading.enumerate())
    with HealthChecker(check, on_change=lambda *c: changes.append(c)) as checker:
        checker.update([Endpoint(a), Endpoint(b)])
        assert checker.start_thread() is checker
        with pytest.raises(RuntimeError, match="already running"):
            checker.start_thread()
        wait_for(lambda: all(s.probes >= 3 for s in checker.statistics().values()))
        assert fleet[0].counts().health_checks >= 3  # the probes really reach the replica
        assert checker.statuses() == {a: "healthy", b: "healthy"}

        fleet[0].kill()
        took = wait_for(lambda: checker.status(a) == "unhealthy")
        assert took < 3.0  # two failed probes 0.05 s apart, refused at once
        assert checker.statistics()[a].last_error is not None

        fleet[0].restart()
        wait_for(lambda: checker.status(a) == "healthy")
        assert [c for c in changes if c[0] == a] == [
            (a, "healthy", "suspect"),
            (a, "suspect", "unhealthy"),
            (a, "unhealthy", "healthy"),
        ]
        assert checker.status(b) != "unhealthy"
        assert health_threads()
    assert health_threads() == []
    assert set(threading.enumerate()) - before == set()  # (threads of earlier tests may end)
    probes = fleet[1].counts().health_checks
    time.sleep(0.2)
    assert fleet[1].counts().health_checks == probes  # closed means no more probes


def test_a_replica_url_s_userinfo_goes_as_basic_auth_and_never_reaches_the_logs(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200)

    checker = HealthChecker(HealthCheck(), transport=httpx.MockTransport(answer))
    checker.update([Endpoint("http://svc:pw@10.0.0.7:8080")])
    checker.poll()
    assert seen == ["Basic c3ZjOnB3"]  # base64("svc:pw"), as httpx would send the userinfo
    # Against a real replica that goes down: the checker's and httpx's own log lines.
    caplog.set_level(logging.DEBUG)
    port = fleet[0].port
    check = HealthCheck(interval=0.05, timeout=1.0, unhealthy_threshold=1)
    url = f"http://svc:pw5ecret@127.0.0.1:{port}"
    with HealthChecker(check) as real:
        real.update([Endpoint(url)])
        real.poll()
        fleet[0].kill()

        def down() -> bool:
            real.poll()
            return real.status(url) == "unhealthy"

        wait_for(down)
    assert any("unhealthy" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if "pw5ecret" in r.getMessage()]


def test_close_called_from_on_change_returns_and_stops_every_thread(fleet: Fleet) -> None:
    # on_change runs on a probe thread, which the runner thread waits for as it stops: close()
    # called there must not wait for the runner (each would wait for the other, for good).
    a, _ = fleet.urls
    closed = threading.Event()

    def on_change(url: str, old: str, new: str) -> None:
        checker.close()  # e.g. "stop checking once the replica is gone"
        closed.set()

    fleet[0].kill()
    check = HealthCheck(interval=0.05, timeout=1.0, unhealthy_threshold=1)
    checker = HealthChecker(check, on_change=on_change)
    checker.update([Endpoint(a)])
    checker.start_thread()
    assert closed.wait(5.0)  # close() returned
    checker.close()  # the owner's close, from another thread, still waits for every thread
    assert health_threads() == []
    assert checker._client is None  # the runner closed the client on its way out


def test_thread_runner_close_is_prompt_and_update_wakes_it() -> None:
    backend = Backend()
    checker = HealthChecker(HealthCheck(interval=30.0), transport=httpx.MockTransport(backend))
    checker.start_thread()
    time.sleep(0.05)
    assert backend.requests == []  # nothing to probe: the thread waits
    checker.update([Endpoint(A)])
    wait_for(lambda: backend.probes(A) == 1, timeout=2.0)  # at once, not after 30 s
    assert len(health_threads()) >= 1
    started = time.monotonic()
    checker.close()
    assert time.monotonic() - started < 1.0  # the 30 s wait was interrupted
    assert health_threads() == []
    assert backend.probes(A) == 1


# -- the async runner ----------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            if predicate():
                return
            await anyio.sleep(0.01)


@pytest.mark.slow
@pytest.mark.anyio
async def test_async_runner_frozen_replica_becomes_unhealthy(fleet: Fleet) -> None:
    a, b = fleet.urls
    changes: list[Change] = []
    # (A 0.5 s probe timeout: a healthy replica answers well within it even on a busy machine.)
    check = HealthCheck(interval=0.05, timeout=0.5, healthy_threshold=1, unhealthy_threshold=2)
    checker = HealthChecker(check, on_change=lambda *c: changes.append(c))
    checker.update([Endpoint(a), Endpoint(b)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(checker.run)
        await wait_until(lambda: all(s.probes >= 2 for s in checker.statistics().values()))
        await anyio.to_thread.run_sync(fleet[0].freeze)
        await wait_until(lambda: checker.status(a) == "unhealthy")
        error = checker.statistics()[a].last_error
        assert error is not None and "Timeout" in error
        await anyio.to_thread.run_sync(fleet[0].thaw)
        await wait_until(lambda: checker.status(a) == "healthy")
        tg.cancel_scope.cancel()
    assert [c for c in changes if c[0] == a] == [
        (a, "healthy", "suspect"),
        (a, "suspect", "unhealthy"),
        (a, "unhealthy", "healthy"),
    ]
    checker.close()


@pytest.mark.slow
@pytest.mark.anyio
async def test_async_runner_stops_on_cancellation_and_can_run_again(fleet: Fleet) -> None:
    a, b = fleet.urls
    checker = HealthChecker(HealthCheck(interval=0.02, timeout=3.0))
    checker.update([Endpoint(a), Endpoint(b)])

    def server_probes() -> int:
        return fleet.counts().health_checks

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(checker.run)
            await wait_until(lambda: all(s.probes >= 3 for s in checker.statistics().values()))
            tg.cancel_scope.cancel()
    seen = await anyio.to_thread.run_sync(server_probes)
    assert seen >= 6
    await anyio.sleep(0.2)
    assert await anyio.to_thread.run_sync(server_probes) == seen  # stopped: no more probes

    # Cancelled mid-probe: replica 0 hangs (frozen), so its probe is in flight when run() is
    # cancelled. It must not stay "in flight" for ever: the next run probes it again.
    await anyio.to_thread.run_sync(fleet[0].freeze)
    before = checker.statistics()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(checker.run)
            await wait_until(lambda: checker.statistics()[b].probes >= before[b].probes + 3)
            with pytest.raises(RuntimeError, match="already running"):
                checker.start_thread()
            tg.cancel_scope.cancel()
    assert checker.statistics()[a].probes == before[a].probes  # cancelled, not failed
    await anyio.to_thread.run_sync(fleet[0].thaw)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(checker.run)
            await wait_until(lambda: checker.statistics()[a].probes > before[a].probes)
            tg.cancel_scope.cancel()
    assert checker.status(a) == "healthy"
    checker.close()


@pytest.mark.anyio
async def test_async_runner_on_a_mock_transport() -> None:
    backend = Backend()
    backend.set(B, 503)
    changes: list[Change] = []
    checker = HealthChecker(
        HealthCheck(interval=0.01, unhealthy_threshold=3),
        transport=httpx.MockTransport(backend),
        on_change=lambda *c: changes.append(c),
    )
    checker.update([Endpoint(A)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(checker.run)
        await wait_until(lambda: backend.probes(A) >= 2)
        checker.update([Endpoint(A), Endpoint(B)])  # from the loop's thread: wakes it at once
        await wait_until(lambda: checker.status(B) == "unhealthy")
        tg.cancel_scope.cancel()
    assert changes == [(B, "healthy", "suspect"), (B, "suspect", "unhealthy")]
    assert checker.status(A) == "healthy"
    checker.close()
