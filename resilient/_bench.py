"""``resilient bench``: the goodput scenarios of PEERS.md, resilient beside the peers, in one run.

Every (scenario, client) run gets a fresh ``rs.testing.Fleet(3, seed=...)`` on loopback with the
scenario's faults, then 4,000 GETs from 8 threads through one client object built for that run and
shared by the threads. Every client has an httpx timeout of 1 s and sees the same seed and the same
faults; a fresh fleet per run keeps one run from affecting the next.

Scenarios (the replica index in brackets)::

    crash   every replica up ~Exp(0.5/s), down ~Exp(4.5/s): available 90 % of the time
    gray    [0] answers 503 half the time; [1] answers 10 % of requests 200 ms late
    hang    [0] is frozen (SIGSTOP) 0.5 s into the run, for the rest of it
    tail    all healthy; 5 % of the answers of every replica come 60 ms late
    outage  every replica answers 503

Clients: ``plain`` httpx round-robin; ``httpx-retries``; ``tenacity`` failover; ``pyresilience``
retry + breaker; ``resilient`` (``ResilientTransport`` with its defaults: nothing is tuned per
scenario). A peer that is not installed is reported and skipped (``pip install 'resilient[peers]'``).

Columns: success % (2xx answers), p50/p99/max latency of every request (failed ones too),
amplification = requests the replicas received (exact fleet counts) ÷ requests made, and wall
time. A replica frozen in the hang scenario is counted as of its freeze: what queued in its socket
afterwards was never served. For crash, ``model %`` is the Markov prediction of
``resilient.availability`` (when that module is present) for the client's attempts on distinct
replicas. While a run lasts, a global hook (``rs.add_hook``) counts resilient's events (retries,
hedges and their delays, breaker moves, rejections); it observes and changes nothing.

Before each run the harness collects its garbage and freezes its own heap out of the collector
(``gc.freeze``): by the tail scenario it holds the samples of every earlier run, and each full
collection walking them stalled all 8 threads of the client under test for 20-45 ms. What the
client built before the run is frozen with it; the objects it makes while the run lasts are
collected as usual.

Run::

    resilient bench                        # all five scenarios, every client, then the TARGETS
    resilient bench crash gray --clients plain,resilient --json out.json --plot cdf.png
    resilient bench --check                # exit 1 when a target is missed
    resilient bench overhead               # the success-path cost benchmark
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import itertools
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import httpx

from resilient import _benchkit as kit
from resilient import events
from resilient.testing.fleet import Fleet

__all__ = [
    "CLIENTS",
    "SCENARIOS",
    "TARGETS",
    "BenchClient",
    "ClientSpec",
    "Outcome",
    "Progress",
    "RunResult",
    "Sample",
    "Scenario",
    "Settings",
    "Target",
    "TargetResult",
    "add_arguments",
    "check_targets",
    "markov_prediction",
    "plot",
    "render",
    "render_details",
    "run",
    "run_bench",
    "run_one",
    "to_json",
]

#: The httpx timeout of every client, seconds (connect, read, write and pool).
TIMEOUT = 1.0
REPLICAS = 3
#: The hang scenario freezes its replica this long after the run starts, seconds.
FREEZE_AFTER = 0.5
#: The crash scenario's two-state Markov rates, per second: failure ``LAM``, repair ``MU``.
LAM, MU = 0.5, 4.5


# -- scenarios -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A fault setting: ``setup`` runs on the fresh fleet; ``during`` (if any) as the run starts,
    returning what to call once it is over, before the requests are counted (it returns a warning
    when the fault did not happen as described, else None).

    Example::

        with rs.testing.Fleet(3, seed=1) as fleet:
            SCENARIOS["gray"].setup(fleet)
    """

    name: str
    description: str
    setup: Callable[[Fleet], None]
    during: Callable[[Fleet], Callable[[], str | None]] | None = None


def _crash(fleet: Fleet) -> None:
    for replica in fleet:
        replica.set_markov(LAM, MU)


def _gray(fleet: Fleet) -> None:
    fleet[0].set_faults(error_rate=0.5)
    fleet[1].set_faults(slow_fraction=0.1, slow_latency=0.2)


def _tail(fleet: Fleet) -> None:
    for replica in fleet:
        replica.set_faults(slow_fraction=0.05, slow_latency=0.06)


def _outage(fleet: Fleet) -> None:
    for replica in fleet:
        replica.set_faults(error_rate=1.0)


def _healthy(fleet: Fleet) -> None:
    pass


def _freeze_later(fleet: Fleet) -> Callable[[], str | None]:
    failed: list[BaseException] = []

    def freeze() -> None:
        try:
            fleet[0].freeze()
        except Exception as exc:
            failed.append(exc)

    timer = threading.Timer(FREEZE_AFTER, freeze)
    timer.daemon = True
    timer.start()

    def stop() -> str | None:
        timer.cancel()
        timer.join()  # a freeze under way completes, so the counts are taken after it
        if failed:
            return f"replica 0 could not be frozen: {failed[0]!r}"
        if fleet[0].state != "frozen":
            return f"the run ended before replica 0 was frozen ({FREEZE_AFTER:g} s in)"
        return None

    return stop


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("crash", "each replica up ~Exp(0.5/s), down ~Exp(4.5/s) (A = 0.9)", _crash, None),
        Scenario("gray", "one replica 50 % 503, one 10 % slow (200 ms)", _gray),
        Scenario("hang", "one replica frozen (SIGSTOP) after 0.5 s", _healthy, _freeze_later),
        Scenario("tail", "all healthy, 5 % of requests 60 ms slower", _tail),
        Scenario("outage", "every replica answers 503", _outage),
    )
}
OVERHEAD = "overhead"


# -- clients ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one logical GET came to: ``ok`` for a 2xx answer; the final ``status`` or ``error``
    (exception class name); the ``replica`` that gave the final answer or error, and the
    ``attempts`` made, where the client lets us know.

    Example::

        Outcome(ok=False, status=503, replica=2, attempts=3).kind == "503"
    """

    ok: bool
    status: int | None = None
    error: str | None = None
    replica: int | None = None
    attempts: int | None = None

    @property
    def kind(self) -> str:
        """The status code as text, or the exception class name."""
        return self.error if self.error is not None else str(self.status)


class BenchClient(Protocol):
    """What the runner drives: ``get(path)`` makes one logical GET and never raises.

    Example::

        client = CLIENTS["resilient"].build(fleet.urls, 1.0)
        outcome = client.get("/bench/1")
        client.close()
    """

    def get(self, path: str) -> Outcome: ...

    def close(self) -> None: ...


class _RoundRobin:
    """The next replica URL, in turn, shared by the threads."""

    def __init__(self, urls: Sequence[str]) -> None:
        self._cycle = itertools.cycle(list(urls))
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            return next(self._cycle)


class _Client:
    """One client under test: ``get(path)`` makes one logical GET and never raises."""

    def __init__(self, urls: Sequence[str], timeout: float) -> None:
        self._replica_of = {
            (httpx.URL(url).host, httpx.URL(url).port): i for i, url in enumerate(urls)
        }
        self._next = _RoundRobin(urls)
        self._http = httpx.Client(transport=self._transport(urls), timeout=timeout)

    def _transport(self, urls: Sequence[str]) -> httpx.BaseTransport | None:
        """The client's transport; None: httpx's default."""
        return None

    def close(self) -> None:
        self._http.close()

    def _answer(self, response: httpx.Response, attempts: int | None) -> Outcome:
        replica = response.headers.get("x-replica", "")
        return Outcome(
            ok=response.is_success,
            status=response.status_code,
            replica=int(replica) if replica.isdigit() else None,
            attempts=attempts,
        )

    def _failure(self, exc: BaseException, attempts: int | None) -> Outcome:
        if isinstance(exc, httpx.HTTPStatusError):
            return self._answer(exc.response, attempts)
        replica = None
        if isinstance(exc, httpx.RequestError):
            try:
                url = exc.request.url
            except RuntimeError:
                pass
            else:
                replica = self._replica_of.get((url.host, url.port))
        return Outcome(ok=False, error=type(exc).__name__, replica=replica, attempts=attempts)


class _Plain(_Client):
    def get(self, path: str) -> Outcome:
        try:
            response = self._http.get(self._next() + path)
        except Exception as exc:
            return self._failure(exc, 1)
        return self._answer(response, 1)


class _HttpxRetries(_Client):
    def _transport(self, urls: Sequence[str]) -> httpx.BaseTransport | None:
        import httpx_retries

        retry = httpx_retries.Retry(total=2, backoff_factor=0.05)
        transport: httpx.BaseTransport = httpx_retries.RetryTransport(retry=retry)
        return transport

    def get(self, path: str) -> Outcome:
        try:
            response = self._http.get(self._next() + path)
        except Exception as exc:
            return self._failure(exc, None)
        made = getattr(response.extensions.get("retry"), "attempts_made", None)
        return self._answer(response, None if made is None else made + 1)


def _server_error(response: httpx.Response) -> bool:
    return response.status_code >= 500


class _Tenacity(_Client):
    def __init__(self, urls: Sequence[str], timeout: float) -> None:
        super().__init__(urls, timeout)
        import tenacity

        def last_outcome(state: tenacity.RetryCallState) -> httpx.Response:
            assert state.outcome is not None
            response: httpx.Response = state.outcome.result()  # the last response, or raises
            return response

        self._call = tenacity.retry(
            stop=tenacity.stop_after_attempt(3),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1),
            retry=tenacity.retry_if_exception_type(httpx.HTTPError)
            | tenacity.retry_if_result(_server_error),
            retry_error_callback=last_outcome,
        )(self._attempt)

    def _attempt(self, path: str, tried: list[int]) -> httpx.Response:
        tried[0] += 1
        return self._http.get(self._next() + path)  # the next replica on every attempt

    def get(self, path: str) -> Outcome:
        tried = [0]
        try:
            response = self._call(path, tried)
        except Exception as exc:
            return self._failure(exc, tried[0])
        return self._answer(response, tried[0])


class _Pyresilience(_Client):
    def __init__(self, urls: Sequence[str], timeout: float) -> None:
        super().__init__(urls, timeout)
        import pyresilience

        decorate = pyresilience.resilient(
            retry=pyresilience.RetryConfig(
                max_attempts=3, delay=0.05, backoff_factor=2.0, max_delay=1.0
            ),
            circuit_breaker=pyresilience.CircuitBreakerConfig(),
        )
        self._call: Callable[[str, list[int]], httpx.Response] = decorate(self._attempt)

    def _attempt(self, path: str, tried: list[int]) -> httpx.Response:
        tried[0] += 1
        response = self._http.get(self._next() + path)  # the next replica on every attempt
        response.raise_for_status()  # a 5xx must be an exception to reach the breaker
        return response

    def get(self, path: str) -> Outcome:
        tried = [0]
        try:
            response = self._call(path, tried)
        except Exception as exc:
            return self._failure(exc, tried[0])
        return self._answer(response, tried[0])


class _Resilient(_Client):
    def _transport(self, urls: Sequence[str]) -> httpx.BaseTransport | None:
        import resilient as rs

        return rs.ResilientTransport(services={"fleet": list(urls)})  # the defaults, untuned

    def get(self, path: str) -> Outcome:
        try:
            response = self._http.get("http://fleet" + path)
        except Exception as exc:
            return self._failure(exc, None)
        info = response.extensions.get("resilient")
        attempts = info.get("attempts") if isinstance(info, dict) else None
        return self._answer(response, attempts if isinstance(attempts, int) else None)


@dataclass(frozen=True)
class ClientSpec:
    """A client under test: how it is built and configured, and what it needs installed.

    ``model_attempts`` is the number of attempts it makes on distinct replicas, for the Markov
    prediction (None: the model does not apply, e.g. retries on the same replica).

    Example::

        client = CLIENTS["plain"].build(fleet.urls, 1.0)
        assert client.get("/x").ok
        client.close()
    """

    name: str
    label: str
    configuration: str
    build: Callable[[Sequence[str], float], BenchClient]
    requires: tuple[str, ...] = ()
    model_attempts: int | None = None


CLIENTS: dict[str, ClientSpec] = {
    c.name: c
    for c in (
        ClientSpec(
            "plain",
            "plain",
            "httpx.Client, round-robin over the 3 URLs",
            _Plain,
            model_attempts=1,
        ),
        ClientSpec(
            "httpx-retries",
            "httpx-retries",
            "RetryTransport(retry=Retry(total=2, backoff_factor=0.05)), round-robin; "
            "retries go to the same replica",
            _HttpxRetries,
            ("httpx_retries",),
        ),
        ClientSpec(
            "tenacity",
            "tenacity failover",
            "@retry(stop_after_attempt(3), wait_exponential(multiplier=0.05, max=1), "
            "retry_if_exception_type(httpx.HTTPError) | retry_if_result(status >= 500)); "
            "the next replica on every attempt",
            _Tenacity,
            ("tenacity",),
            model_attempts=3,
        ),
        ClientSpec(
            "pyresilience",
            "pyresilience",
            "@resilient(retry=RetryConfig(max_attempts=3, delay=0.05, backoff_factor=2, "
            "max_delay=1), circuit_breaker=CircuitBreakerConfig()); raise_for_status(); "
            "the next replica on every attempt",
            _Pyresilience,
            ("pyresilience",),
            model_attempts=3,
        ),
        ClientSpec(
            "resilient",
            "resilient",
            'httpx.Client(transport=ResilientTransport(services={"fleet": urls})), defaults',
            _Resilient,
            model_attempts=3,
        ),
    )
}


# -- running ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """One bench run's shape: ``requests`` GETs from ``threads`` threads, fleets seeded ``seed``.

    Example::

        Settings(requests=4000, threads=8, seed=1)
    """

    requests: int = 4000
    threads: int = 8
    seed: int = 1
    timeout: float = TIMEOUT


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: when it started (seconds into the run), how long it took, what it came to.

    Example::

        slow = [s for s in result.samples if s.latency > 0.02 and s.outcome.replica == 1]
    """

    start: float
    latency: float
    outcome: Outcome


@dataclass
class RunResult:
    """The measurements of one (scenario, client) run; ``skipped`` says why there are none.

    Example::

        result = run_one(SCENARIOS["outage"], CLIENTS["plain"], Settings(requests=100))
        assert result.success_pct == 0.0
    """

    scenario: str
    client: str
    label: str
    requests: int = 0
    succeeded: int = 0
    success_pct: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    seen: int | None = None
    seen_by_replica: list[int] = field(default_factory=list)
    amplification: float | None = None
    wall_s: float | None = None
    model_pct: float | None = None
    skipped: str | None = None
    warnings: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    slow: dict[str, Any] = field(default_factory=dict)
    slowest: list[dict[str, Any]] = field(default_factory=list)
    events: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Everything but the per-request samples."""
        return {
            name: getattr(self, name) for name in self.__dataclass_fields__ if name != "samples"
        }


class Progress(Protocol):
    """Where the runner reports: a run begins, ``done`` requests so far, the run's summary.

    Example::

        run_one(SCENARIOS["tail"], CLIENTS["plain"], Settings(), progress=_PlainProgress(sys.stderr))
    """

    def begin(self, label: str, total: int) -> None: ...

    def update(self, done: int) -> None: ...

    def end(self, summary: str) -> None: ...

    def close(self) -> None: ...


class _PlainProgress:
    """One line as a run starts and one as it ends; a line every 30 s in between."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._label = ""
        self._total = 0
        self._next_line = 0.0

    def begin(self, label: str, total: int) -> None:
        self._label, self._total = label, total
        self._next_line = time.monotonic() + 30.0
        print(f"{label}: {total} requests ...", file=self._out, flush=True)

    def update(self, done: int) -> None:
        if time.monotonic() >= self._next_line:
            self._next_line += 30.0
            print(f"{self._label}: {done}/{self._total}", file=self._out, flush=True)

    def end(self, summary: str) -> None:
        print(f"{self._label}: {summary}", file=self._out, flush=True)

    def close(self) -> None:
        pass


class _RichProgress:
    """A rich progress bar per run (only when stderr is a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as RichProgress

        self._progress = RichProgress(
            TextColumn("{task.description:<26}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[summary]}"),
            console=Console(stderr=True),
        )
        self._progress.start()
        self._task: Any = None

    def begin(self, label: str, total: int) -> None:
        self._task = self._progress.add_task(label, total=total, summary="")

    def update(self, done: int) -> None:
        self._progress.update(self._task, completed=done)

    def end(self, summary: str) -> None:
        self._progress.update(self._task, summary=summary)

    def close(self) -> None:
        self._progress.stop()


def _progress(out: TextIO) -> Progress:
    if out.isatty() and importlib.util.find_spec("rich") is not None:
        return _RichProgress()
    return _PlainProgress(out)


def _drive(
    client: BenchClient,
    settings: Settings,
    progress: Progress | None,
    on_start: Callable[[], None],
) -> tuple[list[Sample], float]:
    """``settings.requests`` GETs from ``settings.threads`` threads; returns (samples, wall s)."""
    gc.collect()
    gc.freeze()  # the harness's heap is not the client's (see the module's docstring)
    try:
        return _drive_frozen(client, settings, progress, on_start)
    finally:
        gc.unfreeze()


def _drive_frozen(
    client: BenchClient,
    settings: Settings,
    progress: Progress | None,
    on_start: Callable[[], None],
) -> tuple[list[Sample], float]:
    n = settings.requests
    samples: list[Sample | None] = [None] * n
    lock = threading.Lock()
    indices = itertools.count()
    done = [0]
    stop = threading.Event()
    t0 = 0.0  # set as the threads start

    def worker() -> None:
        while not stop.is_set():
            with lock:
                i = next(indices)
            if i >= n:
                return
            start = time.perf_counter()
            outcome = client.get(f"/bench/{i}")
            end = time.perf_counter()
            samples[i] = Sample(start - t0, end - start, outcome)
            with lock:
                done[0] += 1

    with ThreadPoolExecutor(settings.threads, thread_name_prefix="resilient-bench") as pool:
        t0 = time.perf_counter()
        on_start()
        futures = [pool.submit(worker) for _ in range(settings.threads)]
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
                if progress is not None:
                    progress.update(done[0])
                for future in finished:
                    future.result()  # a worker that died: re-raise here
        finally:
            stop.set()
        wall = time.perf_counter() - t0
    return [s for s in samples if s is not None], wall


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted data."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _histogram(values: Iterable[object]) -> dict[str, int]:
    """Counts by value, in numeric order where the values are numbers; ``None`` counts as "?"."""
    counted = Counter("?" if v is None else str(v) for v in values)
    return dict(sorted(counted.items(), key=lambda kv: (not kv[0].isdigit(), len(kv[0]), kv[0])))


def _by_time(starts: Iterable[float], wall: float) -> dict[str, int]:
    """Counts by when the requests started, in at most ~10 buckets of whole seconds ("12s": from
    12 s into the run to the next bucket)."""
    width = max(1, math.ceil(wall / 10))
    counted = Counter(int(start // width) * width for start in starts)
    return {f"{at}s": n for at, n in sorted(counted.items())}


def _sample_json(sample: Sample) -> dict[str, Any]:
    return {
        "start_s": round(sample.start, 3),
        "latency_ms": round(sample.latency * 1e3, 2),
        "outcome": sample.outcome.kind,
        "replica": sample.outcome.replica,
        "attempts": sample.outcome.attempts,
    }


def _summarize(result: RunResult, samples: list[Sample], wall: float, seen: list[int]) -> None:
    result.samples = samples
    result.requests = len(samples)
    result.wall_s = wall
    result.seen_by_replica = seen
    result.seen = sum(seen)
    if not samples:
        return
    result.succeeded = sum(1 for s in samples if s.outcome.ok)
    result.success_pct = 100.0 * result.succeeded / len(samples)
    result.amplification = result.seen / len(samples)
    ordered = sorted(s.latency for s in samples)
    result.p50_ms = _percentile(ordered, 0.50) * 1e3
    result.p99_ms = p99 = _percentile(ordered, 0.99) * 1e3
    result.max_ms = ordered[-1] * 1e3
    result.outcomes = _histogram(s.outcome.kind for s in samples)
    result.attempts = _histogram(s.outcome.attempts for s in samples)
    # Where the tail comes from: the requests at or above p99, by what they came to.
    slow = [s for s in samples if s.latency * 1e3 >= p99]
    result.slow = {
        "threshold_ms": round(p99, 2),
        "count": len(slow),
        "by_outcome": _histogram(s.outcome.kind for s in slow),
        "by_replica": _histogram(s.outcome.replica for s in slow),
        "by_attempts": _histogram(s.outcome.attempts for s in slow),
        "by_start": _by_time((s.start for s in slow), wall),
        "failed_by_start": _by_time((s.start for s in samples if not s.outcome.ok), wall),
    }
    result.slowest = [_sample_json(s) for s in sorted(samples, key=lambda s: -s.latency)[:10]]


class _EventTally:
    """Counts resilient's events (retries, hedges, breaker moves...) while a run lasts.

    A global hook: it observes and changes nothing (hooks are never on the success path).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._hedge_after: list[float] = []

    def __call__(self, event: events.Event) -> None:
        name = type(event).__name__
        if isinstance(event, events.CircuitStateChanged):
            name = f"{name}->{event.new}"
        with self._lock:
            self._counts[name] += 1
            if isinstance(event, events.HedgeLaunched):
                self._hedge_after.append(event.after)

    def __enter__(self) -> _EventTally:
        events.add_hook(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        events.remove_hook(self)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(sorted(self._counts.items()))
            after = sorted(self._hedge_after)
        if after:
            out["hedge_after_ms"] = {
                "min": round(after[0] * 1e3, 1),
                "p50": round(_percentile(after, 0.5) * 1e3, 1),
                "max": round(after[-1] * 1e3, 1),
            }
        return out


def run_one(
    scenario: Scenario,
    spec: ClientSpec,
    settings: Settings,
    progress: Progress | None = None,
) -> RunResult:
    """One client against one scenario on a fresh fleet; a missing peer gives a skipped result.

    Example::

        result = run_one(SCENARIOS["crash"], CLIENTS["resilient"], Settings(requests=500))
        print(result.success_pct, result.p99_ms, result.amplification)
    """
    result = RunResult(scenario.name, spec.name, spec.label)
    absent = [m for m in spec.requires if importlib.util.find_spec(m) is None]
    if absent:
        result.skipped = (
            f"not installed (pip install 'resilient[peers]'; missing {', '.join(absent)})"
        )
        return result
    tally = _EventTally()
    with Fleet(REPLICAS, seed=settings.seed) as fleet, tally:
        scenario.setup(fleet)
        client = spec.build(fleet.urls, settings.timeout)
        stoppers: list[Callable[[], str | None]] = []

        def on_start() -> None:
            if scenario.during is not None:
                stoppers.append(scenario.during(fleet))

        if progress is not None:
            progress.begin(f"{scenario.name} / {spec.label}", settings.requests)
        try:
            samples, wall = _drive(client, settings, progress, on_start)
        finally:
            for stop in stoppers:
                warning = stop()
                if warning is not None:
                    result.warnings.append(warning)
            client.close()
        counts = fleet.counts()  # a frozen replica reports what it had received when frozen
    _summarize(result, samples, wall, [c.total for c in counts.replicas])
    result.events = tally.summary()
    if scenario.name == "crash" and spec.model_attempts is not None:
        result.model_pct = markov_prediction(spec.model_attempts)
    if progress is not None:
        progress.end(_one_line(result))
    return result


def _one_line(result: RunResult) -> str:
    return (
        f"{_fmt_pct(result.success_pct)} % ok, p99 {_fmt_ms(result.p99_ms)} ms, "
        f"amplification {_fmt_amp(result.amplification)}, {_fmt_wall(result.wall_s)} s"
    )


def markov_prediction(attempts: int) -> float | None:
    """The success % that ``resilient.availability`` predicts for the crash scenario, if present.

    Example::

        markov_prediction(3)   # e.g. 99.9, or None while resilient.availability is absent
    """
    try:
        module = importlib.import_module("resilient.availability")
    except ModuleNotFoundError as exc:
        if exc.name == "resilient.availability":
            return None
        raise
    predict = getattr(module, "predict", None)
    if predict is None:
        return None
    try:
        value = predict(LAM, MU, replicas=REPLICAS, attempts=attempts)
    except Exception:  # a model under construction must not sink the benchmark
        return None
    return _as_percent(value)


def _as_percent(value: object) -> float | None:
    for name in ("success", "success_rate", "availability", "probability", "p_success"):
        if not isinstance(value, (int, float)) and hasattr(value, name):
            value = getattr(value, name)
            break
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return 100.0 * value if value <= 1.0 else float(value)


def run_bench(
    scenarios: Sequence[str],
    clients: Sequence[str],
    settings: Settings,
    progress: Progress | None = None,
) -> list[RunResult]:
    """Every client against every scenario, in that order (scenario by scenario).

    Example::

        results = run_bench(["crash", "outage"], ["plain", "resilient"], Settings(requests=200))
        print(render(results, check_targets(results)))
    """
    return [
        run_one(SCENARIOS[name], CLIENTS[client], settings, progress)
        for name in scenarios
        for client in clients
    ]


# -- targets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``resilient``'s ``metric`` in ``scenario`` must be at most (or ``at_least``) ``limit``.

    The metric ``wall_vs_crash`` is the run's wall time ÷ resilient's crash wall time.

    Example::

        Target("gray", "p99_ms", 30.0).name == "gray: p99 <= 30 ms"
    """

    scenario: str
    metric: str
    limit: float
    at_least: bool = False

    @property
    def name(self) -> str:
        """E.g. ``"crash: success >= 99.95 %"``."""
        op = ">=" if self.at_least else "<="
        what = {
            "success_pct": ("success", " %"),
            "p99_ms": ("p99", " ms"),
            "amplification": ("amplification", ""),
            "wall_vs_crash": ("wall", "x its crash wall"),
        }[self.metric]
        return f"{self.scenario}: {what[0]} {op} {self.limit:g}{what[1]}"


#: The issue's Done-when, for the ``resilient`` client.
TARGETS: tuple[Target, ...] = (
    Target("crash", "success_pct", 99.95, at_least=True),
    Target("crash", "amplification", 1.05),
    Target("gray", "success_pct", 99.9, at_least=True),
    Target("gray", "p99_ms", 30.0),
    Target("gray", "amplification", 1.10),
    Target("hang", "success_pct", 99.9, at_least=True),
    Target("hang", "p99_ms", 100.0),
    Target("hang", "wall_vs_crash", 1.5),
    Target("tail", "p99_ms", 20.0),
    Target("tail", "amplification", 1.10),
    Target("outage", "amplification", 0.5),
    Target("outage", "p99_ms", 20.0),
)


@dataclass(frozen=True)
class TargetResult:
    """A target's verdict: ``"PASS"``, ``"FAIL"`` or ``"SKIP"`` (scenario not run), the value.

    Example::

        [r.verdict for r in check_targets(results)]
    """

    target: Target
    verdict: str
    value: float | None = None
    note: str = ""


def check_targets(
    results: Sequence[RunResult], targets: Sequence[Target] = TARGETS
) -> list[TargetResult]:
    """Judge resilient's runs; a target whose scenario (or resilient) was not run is SKIP.

    Example::

        failed = [r for r in check_targets(results) if r.verdict == "FAIL"]
    """
    mine = {r.scenario: r for r in results if r.client == "resilient"}
    judged = []
    for target in targets:
        run = mine.get(target.scenario)
        if run is None:
            judged.append(TargetResult(target, "SKIP", note="not run"))
            continue
        value: float | None
        if run.skipped is not None:
            value = None
        elif target.metric == "wall_vs_crash":
            crash = mine.get("crash")
            if crash is None:
                judged.append(TargetResult(target, "SKIP", note="crash not run"))
                continue
            value = None if run.wall_s is None or not crash.wall_s else run.wall_s / crash.wall_s
        else:
            value = getattr(run, target.metric)
        if value is None:
            judged.append(TargetResult(target, "FAIL", note="not measured"))
            continue
        passed = value >= target.limit if target.at_least else value <= target.limit
        judged.append(TargetResult(target, "PASS" if passed else "FAIL", value))
    return judged


# -- reporting -------------------------------------------------------------------------------------


def _fmt_pct(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 100.0:
        return "100"
    return f"{value:.2f}"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _fmt_amp(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_wall(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _fmt_value(target: Target, value: float) -> str:
    if target.metric == "success_pct":
        return f"{value:.2f} %"
    if target.metric == "p99_ms":
        return f"{value:.1f} ms"
    if target.metric == "wall_vs_crash":
        return f"{value:.2f}x"
    return f"{value:.3f}"


def render(results: Sequence[RunResult], targets: Sequence[TargetResult]) -> str:
    """The table (one row per run, grouped by scenario), the scenario legend, then the targets.

    Example::

        print(render(results, check_targets(results)))
    """
    with_model = any(r.model_pct is not None for r in results)
    header = ["scenario", "client", "success %", "p50 ms", "p99 ms", "max ms", "amplif.", "wall s"]
    if with_model:
        header.append("model %")
    body: list[list[str] | None] = []
    notes: dict[str, int] = {}

    def note(text: str) -> int:
        return notes.setdefault(text, len(notes) + 1)

    scenario = None
    for r in results:
        if r.scenario != scenario:
            if scenario is not None:
                body.append(None)
            scenario = r.scenario
            first = r.scenario
        else:
            first = ""
        if r.skipped is not None:
            line = [first, r.label, f"skipped [{note(f'{r.label}: {r.skipped}')}]", *[""] * 5]
        else:
            line = [
                first,
                r.label,
                _fmt_pct(r.success_pct),
                _fmt_ms(r.p50_ms),
                _fmt_ms(r.p99_ms),
                _fmt_ms(r.max_ms),
                _fmt_amp(r.amplification),
                _fmt_wall(r.wall_s),
            ]
        for warning in r.warnings:
            line[1] += f" [{note(f'{r.scenario} / {r.label}: {warning}')}]"
        if with_model:
            line.append("" if r.model_pct is None else f"{r.model_pct:.2f}")
        body.append(line)
    out = kit.table(header, body, left=2)
    out += [f"[{i}] {text}" for text, i in notes.items()]
    seen = list(dict.fromkeys(r.scenario for r in results))
    out += [f"{name:<8} {SCENARIOS[name].description}" for name in seen]
    if with_model:
        out.append(
            f"model %: resilient.availability.predict({LAM}, {MU}, replicas={REPLICAS}, "
            "attempts=the client's attempts on distinct replicas)"
        )
    if any(t.verdict != "SKIP" for t in targets):
        out += ["", "TARGETS (resilient)"]
        for t in targets:
            if t.verdict == "SKIP":
                continue
            shown = t.note if t.value is None else _fmt_value(t.target, t.value)
            out.append(kit.verdict_line(t.verdict, t.target.name, shown))
    return "\n".join(out)


def render_details(results: Sequence[RunResult]) -> str:
    """Per run: outcomes, attempts, what each replica received and where the p99 tail came from.

    Example::

        print(render_details(run_bench(["gray"], ["resilient"], Settings())))
    """
    out = []
    for r in results:
        if r.skipped is not None or not r.samples:
            continue
        slow = r.slow
        out += [
            f"{r.scenario} / {r.label}",
            f"  outcomes {r.outcomes}  attempts {r.attempts}  replicas saw {r.seen_by_replica}",
            f"  >= p99 ({slow['threshold_ms']} ms, {slow['count']} requests): "
            f"outcome {slow['by_outcome']} replica {slow['by_replica']} "
            f"attempts {slow['by_attempts']} started at {slow['by_start']}",
        ]
        if slow["failed_by_start"]:
            out.append(f"  failures started at {slow['failed_by_start']}")
        slowest = ", ".join(
            f"{s['latency_ms']:.0f} ms @{s['start_s']:.1f}s {s['outcome']} r{s['replica']} "
            f"x{s['attempts']}"
            for s in r.slowest[:5]
        )
        out.append(f"  slowest: {slowest}")
        if r.events:
            out.append(f"  events {r.events}")
    return "\n".join(out)


_DISTRIBUTIONS = ("resilient", "httpx", "httpx-retries", "tenacity", "pyresilience", "rich")


def to_json(
    results: Sequence[RunResult], targets: Sequence[TargetResult], settings: Settings
) -> dict[str, Any]:
    """Everything measured, as plain data (``--json``); per-request samples are left out.

    Example::

        json.dump(to_json(results, check_targets(results), Settings()), fh, indent=2)
    """
    return {
        **kit.environment(),
        "versions": kit.installed_versions(_DISTRIBUTIONS),
        "settings": {
            "requests": settings.requests,
            "threads": settings.threads,
            "seed": settings.seed,
            "timeout_s": settings.timeout,
            "replicas": REPLICAS,
        },
        "scenarios": {
            name: SCENARIOS[name].description for name in dict.fromkeys(r.scenario for r in results)
        },
        "clients": {
            name: CLIENTS[name].configuration for name in dict.fromkeys(r.client for r in results)
        },
        "runs": [r.to_json() for r in results],
        "targets": [
            {
                "name": t.target.name,
                "scenario": t.target.scenario,
                "metric": t.target.metric,
                "limit": t.target.limit,
                "at_least": t.target.at_least,
                "verdict": t.verdict,
                "value": t.value,
                "note": t.note,
            }
            for t in targets
        ],
    }


def _load_pyplot() -> Any | None:
    """matplotlib's pyplot on a file backend, or None when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def plot(results: Sequence[RunResult], path: str, pyplot: Any) -> None:
    """Latency CDFs, one row of panels per scenario (all requests; the slowest 10 %), one line
    per client, written to ``path``.

    Example::

        plot(results, "cdf.png", _load_pyplot())
    """
    scenarios = list(dict.fromkeys(r.scenario for r in results if r.samples))
    if not scenarios:
        return
    fig, axes = pyplot.subplots(
        len(scenarios), 2, figsize=(13, 3.4 * len(scenarios)), squeeze=False
    )
    for row, name in zip(axes, scenarios, strict=True):
        for r in results:
            if r.scenario != name or not r.samples:
                continue
            ms = sorted(s.latency * 1e3 for s in r.samples)
            fraction = [(i + 1) / len(ms) for i in range(len(ms))]
            label = f"{r.label} ({_fmt_pct(r.success_pct)} % ok, p99 {_fmt_ms(r.p99_ms)} ms)"
            for ax in row:
                ax.step(ms, fraction, where="post", label=label)
        for ax, bottom, what in ((row[0], 0.0, "all requests"), (row[1], 0.9, "slowest 10 %")):
            ax.set_xscale("log")
            ax.set_ylim(bottom, 1.0 + (1.0 - bottom) * 0.005)
            ax.set_title(f"{name}: {SCENARIOS[name].description} ({what})", fontsize=9)
            ax.set_xlabel("latency, ms (log)")
            ax.set_ylabel("fraction of requests")
            ax.grid(True, which="both", alpha=0.3)
        row[1].axhline(0.99, color="grey", linewidth=0.8, linestyle=":")
        row[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


# -- command line ----------------------------------------------------------------------------------


def _scenario_name(text: str) -> str:
    if text not in SCENARIOS and text != OVERHEAD:
        names = ", ".join([*SCENARIOS, OVERHEAD])
        raise argparse.ArgumentTypeError(f"unknown scenario {text!r} (choose from {names})")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _client_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CLIENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown client {', '.join(unknown) or text!r} (choose from {', '.join(CLIENTS)})"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``resilient bench``.

    Example::

        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["crash", "--requests", "200"])
    """
    parser.add_argument(
        "scenarios",
        nargs="*",
        type=_scenario_name,
        metavar="SCENARIO",
        help=f"{', '.join(SCENARIOS)} (default: all five) and/or {OVERHEAD} "
        "(the success-path cost benchmark)",
    )
    parser.add_argument(
        "--requests", type=_positive, default=4000, help="GETs per run (default 4000)"
    )
    parser.add_argument(
        "--threads", type=_positive, default=8, help="client threads per run (default 8)"
    )
    parser.add_argument("--seed", type=int, default=1, help="the fleet seed (default 1)")
    parser.add_argument(
        "--clients",
        type=_client_names,
        action="append",
        metavar="A,B",
        help=f"a subset of {','.join(CLIENTS)} (default: all)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--plot", metavar="PNG", help="latency CDFs per client and scenario (needs matplotlib)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--details", action="store_true", help="per run: outcomes, attempts, the p99 tail"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{OVERHEAD}: 2 short repeats (a smoke test)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``resilient bench``: the scenarios, the table, the targets; 1 if ``--check`` fails.

    Example::

        from resilient.cli import main
        main(["bench", "outage", "--clients", "plain,resilient", "--requests", "200"])
    """
    chosen: list[str] = list(dict.fromkeys(args.scenarios or SCENARIOS))
    scenarios = [name for name in chosen if name in SCENARIOS]
    clients = list(
        dict.fromkeys(name for group in (args.clients or [list(CLIENTS)]) for name in group)
    )
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        # Found out now, not after the minutes of the run it was to keep.
        problem = kit.unwritable(path) if path else None
        if problem is not None:
            print(f"resilient bench: {option} {path}: {problem}; nothing was run", file=sys.stderr)
            return 2
    pyplot = None
    if args.plot and scenarios:
        pyplot = _load_pyplot()
        if pyplot is None:
            print(
                "resilient bench: --plot needs matplotlib, which is not installed "
                "(pip install matplotlib); nothing was run",
                file=sys.stderr,
            )
            return 2
    settings = Settings(requests=args.requests, threads=args.threads, seed=args.seed)
    failed = False
    data: dict[str, Any] = {}
    if scenarios:
        versions = kit.installed_versions(_DISTRIBUTIONS)
        peers = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "resilient")
        print(
            f"resilient bench: {REPLICAS} replicas on loopback, {settings.requests} GETs from "
            f"{settings.threads} threads per run, httpx timeout {settings.timeout:g} s, "
            f"seed {settings.seed}; a fresh fleet per run"
        )
        print(kit.banner(f"resilient {versions['resilient']} ({peers})") + "\n", flush=True)
        progress = _progress(sys.stderr)
        try:
            results = run_bench(scenarios, clients, settings, progress)
        finally:
            progress.close()
        targets = check_targets(results)
        print(render(results, targets))
        if args.details:
            print()
            print(render_details(results))
        failed = any(t.verdict == "FAIL" for t in targets)
        data = to_json(results, targets, settings)
        if pyplot is not None:
            plot(results, args.plot, pyplot)
            print(f"\nlatency CDFs written to {args.plot}")
    if OVERHEAD in chosen:
        from resilient import _bench_overhead

        if scenarios:
            print()
        status, data[OVERHEAD] = _bench_overhead.measure(quick=args.quick, check=True)
        failed = failed or status != 0
    if args.json:
        kit.write_json(args.json, data)
    return 1 if args.check and failed else 0
