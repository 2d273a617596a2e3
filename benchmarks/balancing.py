"""What client-side load balancing costs: a pick, a membership change, the memory of a replica.

Three measurements, one run:

1. **Pick cost.** ``balancer.pick(replicas, (), False, now)`` for each balancer over 10, 1,000 and
   10,000 replicas, every replica usable, each with its own peak-EWMA latency (1-20 ms, decaying)
   and none in flight; then ``ServiceRuntime.pick(())`` (what the transport calls: the snapshot
   version check, the tiers, P2C), and P2C with 50 % of the replicas ejected (the most allowed
   before panic mode) and with 90 % ejected (a tier mostly down: picks fall back to a scan). A cell
   is nanoseconds per pick: the minimum over repeats of N picks (N sized so that one repeat takes
   ``target`` time), ``time.perf_counter_ns``, the garbage collector off, randomness seeded.
2. **Membership change.** A service of 10,000 replicas whose source publishes a new snapshot;
   the time ``ServiceRuntime.refresh()`` takes to apply it (the list, lookup and tiers rebuilt,
   state of unchanged replicas kept): one replica replaced (the common case) and 1,000 replaced;
   the source's own ``_publish`` and the first build (10,000 new replicas and breakers) for
   information. Minimum and median over repeats.
3. **Memory per replica.** ``tracemalloc`` around ``ServiceRuntime.refresh()`` building 10,000
   replicas — each a `Replica`, its default replica `CircuitBreaker`, the breaker's hook, the
   lookup entry and tier slot — divided by 10,000; then the parts built alone for the breakdown.
   The endpoints belong to the discovery source and are not counted.

Run::

    python benchmarks/balancing.py                      # the tables, then the targets
    python benchmarks/balancing.py --check              # exit 1 when a target is missed
    python benchmarks/balancing.py --quick --json out.json
"""

from __future__ import annotations

import gc
import itertools
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from resilient import _benchkit as kit
from resilient._benchkit import TargetResult
from resilient._clock import system_clock
from resilient.balancing import (
    Balancer,
    LeastRequests,
    PowerOfTwo,
    Random,
    Replica,
    RoundRobin,
    Service,
    ServiceRuntime,
    Weighted,
)
from resilient.balancing._service import default_replica_breaker
from resilient.discovery import Endpoint, Source
from resilient.policies._windows import CountWindow

__all__ = [
    "SIZES",
    "TARGETS",
    "Settings",
    "check_targets",
    "main",
    "measure_membership",
    "measure_memory",
    "measure_picks",
    "render",
]

SIZES = (10, 1_000, 10_000)
SERVICE_SIZE = 10_000
#: Picks see the replicas at this time; each replica's latency was measured at time 1.0.
NOW = 1.5


@dataclass(frozen=True)
class Settings:
    """``repeats`` timed runs per cell; a pick cell's run lasts about ``target_ns``."""

    repeats: int
    target_ns: int
    membership_repeats: int


# -- building --------------------------------------------------------------------------------------


def endpoints(n: int, start: int = 0) -> list[Endpoint]:
    """``n`` distinct endpoints (10.x.y.z:8000), never contacted."""
    return [
        Endpoint(f"http://10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8000")
        for i in range(start, start + n)
    ]


def replicas(n: int, *, ejected: float = 0.0, seed: int = 1) -> list[Replica]:
    """``n`` replicas with latencies of 1-20 ms; a share ``ejected`` of them, spread, ejected."""
    rng = random.Random(seed)
    pool = [Replica(e) for e in endpoints(n)]
    for r in pool:
        r.observe(rng.uniform(0.001, 0.020), now=1.0)
    if ejected:
        for r in rng.sample(pool, round(n * ejected)):
            r.ejected, r.ejected_until = True, NOW + 60.0
    return pool


class _Publisher(Source):
    """A source the benchmark publishes to by hand."""

    def __init__(self, initial: Sequence[Endpoint]) -> None:
        super().__init__("bench")
        self.publish(initial)

    def publish(self, new: Sequence[Endpoint]) -> None:
        self._publish(new)


def _runtime(source: Source, balancer: Balancer | None = None) -> ServiceRuntime:
    service = Service(discovery=source, balancer=balancer or PowerOfTwo())
    return ServiceRuntime(
        "orders", service, clock=system_clock, hooks=(), default_breaker=default_replica_breaker
    )


# -- timing ----------------------------------------------------------------------------------------


def _timed(pick: Callable[..., object], args: tuple[Any, ...], n: int) -> int:
    """Nanoseconds that ``n`` calls of ``pick(*args)`` take, the garbage collector off."""
    clock = time.perf_counter_ns
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = clock()
        for _ in itertools.repeat(None, n):
            pick(*args)
        return clock() - t0
    finally:
        if enabled:
            gc.enable()


def _calibrate(pick: Callable[..., object], args: tuple[Any, ...], target_ns: int) -> int:
    """The N of calls that takes about ``target_ns``."""
    n = 1
    while (found := kit.calibrated(n, _timed(pick, args, n), target_ns)) is None:
        n *= 2
    return found


# -- 1. picks --------------------------------------------------------------------------------------


@dataclass
class PickRow:
    """ns per pick, by number of replicas; ``flat`` = ns at the most replicas / ns at the fewest."""

    key: str
    label: str
    ns: dict[int, float | None] = field(default_factory=dict)
    error: str | None = None

    @property
    def flat(self) -> float | None:
        first, last = self.ns.get(SIZES[0]), self.ns.get(SIZES[-1])
        return None if first is None or last is None else last / first


def _seeded() -> Callable[[], float]:
    return random.Random(7).random


#: (key, label, balancer factory, share of replicas ejected)
PICKS: tuple[tuple[str, str, Callable[[], Balancer], float], ...] = (
    ("p2c", "PowerOfTwo", lambda: PowerOfTwo(random=_seeded()), 0.0),
    ("least_requests", "LeastRequests", lambda: LeastRequests(random=_seeded()), 0.0),
    ("random", "Random", lambda: Random(random=_seeded()), 0.0),
    ("round_robin", "RoundRobin", RoundRobin, 0.0),
    ("weighted", "Weighted", lambda: Weighted(random=_seeded()), 0.0),
    ("p2c_ejected_50", "PowerOfTwo, 50 % ejected", lambda: PowerOfTwo(random=_seeded()), 0.5),
    (
        "p2c_ejected_90",
        "PowerOfTwo, 90 % ejected (scan)",
        lambda: PowerOfTwo(random=_seeded()),
        0.9,
    ),
)
SERVICE_PICK = ("service_pick", "ServiceRuntime.pick (P2C)")


@dataclass
class _Job:
    """One pick cell: what to call, how often per run, the best run so far."""

    row: PickRow
    size: int
    pick: Callable[..., object]
    args: tuple[Any, ...]
    n: int = 0
    best: float = float("inf")


def measure_picks(
    settings: Settings, progress: Callable[[str], None] | None = None
) -> list[PickRow]:
    """ns per pick for every balancer and size, and `ServiceRuntime.pick` over each size.

    Every cell is built and calibrated first; then the repeats are interleaved (every cell once,
    then every cell again...) so that drifting machine load hits every cell alike.

    Example::

        rows = measure_picks(Settings(repeats=3, target_ns=50_000_000, membership_repeats=5))
    """
    rows = [PickRow(key, label) for key, label, _, _ in PICKS]
    service_row = PickRow(*SERVICE_PICK)
    jobs: list[_Job] = []
    for size in SIZES:
        pools: dict[float, list[Replica]] = {}
        for row, (_, label, make, ejected) in zip(rows, PICKS, strict=True):
            if progress is not None:
                progress(f"building {label} over {size:,}")
            try:
                pool = pools.get(ejected)
                if pool is None:
                    pool = pools[ejected] = replicas(size, ejected=ejected)
                balancer = make()
                if balancer.pick(pool, (), False, NOW) is None:
                    raise RuntimeError("the balancer picked nothing")
                jobs.append(_Job(row, size, balancer.pick, (pool, (), False, NOW)))
            except Exception as exc:  # a broken balancer is reported, not fatal
                row.ns[size] = None
                row.error = kit.describe(exc)
        try:
            runtime = _runtime(_Publisher(endpoints(size)), PowerOfTwo(random=_seeded()))
            runtime.refresh()
            rng = random.Random(1)
            for r in runtime.replicas:  # latencies as in the bare pools
                r.observe(rng.uniform(0.001, 0.020), now=1.0)
            if runtime.pick(()) is None:
                raise RuntimeError("the service picked nothing")
            jobs.append(_Job(service_row, size, runtime.pick, ((),)))
        except Exception as exc:
            service_row.ns[size] = None
            service_row.error = kit.describe(exc)
    for job in jobs:
        job.n = _calibrate(job.pick, job.args, settings.target_ns)
    for repeat in range(settings.repeats):
        if progress is not None:
            progress(f"picks, repeat {repeat + 1}/{settings.repeats}")
        for job in jobs:
            job.best = min(job.best, _timed(job.pick, job.args, job.n) / job.n)
    for job in jobs:
        job.row.ns[job.size] = job.best
    return [*rows[:5], service_row, *rows[5:]]


# -- 2. membership -----------------------------------------------------------------------------------


@dataclass
class TimeRow:
    """Milliseconds: the minimum and the median over the repeats."""

    key: str
    label: str
    min_ms: float | None = None
    median_ms: float | None = None
    error: str | None = None


def _summary(row: TimeRow, seconds: Sequence[float]) -> TimeRow:
    row.min_ms = min(seconds) * 1000.0
    row.median_ms = statistics.median(seconds) * 1000.0
    return row


def measure_membership(
    settings: Settings, progress: Callable[[str], None] | None = None
) -> list[TimeRow]:
    """Time `ServiceRuntime.refresh` applying changes to a service of 10,000 replicas.

    Example::

        for row in measure_membership(Settings(2, 10_000_000, 5)):
            print(row.label, row.min_ms)
    """
    n = SERVICE_SIZE
    base = endpoints(n)
    spare = endpoints(1_000, start=n)
    build = TimeRow("first_build", f"first build: {n:,} new replicas and breakers")
    publish = TimeRow("publish", f"Source._publish of a {n:,}-endpoint snapshot (1 replaced)")
    one = TimeRow("change_1", f"refresh(): 1 of {n:,} replaced")
    many = TimeRow("change_1000", f"refresh(): 1,000 of {n:,} replaced")
    try:
        if progress is not None:
            progress("membership: first build")
        builds = []
        for _ in range(max(1, settings.membership_repeats // 3)):
            source = _Publisher(base)
            runtime = _runtime(source)
            gc.collect()
            t0 = time.perf_counter()
            runtime.refresh()
            builds.append(time.perf_counter() - t0)
            if len(runtime.replicas) != n:
                raise RuntimeError(f"built {len(runtime.replicas)} replicas, not {n}")
        _summary(build, builds)

        if progress is not None:
            progress("membership: changes")
        publishes: list[float] = []
        ones: list[float] = []
        manys: list[float] = []
        # Alternate between two lists so that every publish is a real change.
        with_one = [*base[1:], spare[0]]
        with_many = [*base[1_000:], *spare]
        for _ in range(settings.membership_repeats):
            for changed, times in ((with_one, ones), (base, ones), (with_many, manys)):
                gc.collect()
                t0 = time.perf_counter()
                source.publish(changed)
                t1 = time.perf_counter()
                runtime.refresh()
                t2 = time.perf_counter()
                if changed is with_one:
                    publishes.append(t1 - t0)
                times.append(t2 - t1)
                if {r.url for r in runtime.replicas} != {e.url for e in changed}:
                    raise RuntimeError("refresh() did not apply the change")
            source.publish(base)
            runtime.refresh()
        _summary(publish, publishes)
        _summary(one, ones)
        _summary(many, manys)
    except Exception as exc:
        for row in (build, publish, one, many):
            if row.min_ms is None:
                row.error = kit.describe(exc)
    return [one, many, publish, build]


# -- 3. memory -----------------------------------------------------------------------------------------


@dataclass
class MemoryRow:
    """Bytes per replica, as ``tracemalloc`` counts what stays allocated."""

    key: str
    label: str
    bytes: float | None = None
    error: str | None = None


def _bytes_each(build: Callable[[], object], n: int) -> float:
    """What ``build()`` leaves allocated (it must build ``n`` things), divided by ``n``."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return (after - before) / n


def measure_memory(progress: Callable[[str], None] | None = None) -> list[MemoryRow]:
    """Bytes per replica of a 10,000-replica service, and the breakdown by part.

    Example::

        total = measure_memory()[0].bytes
    """
    n = SERVICE_SIZE
    base = endpoints(n)
    names = [f"orders/{e.url.removeprefix('http://')}" for e in base]
    source = _Publisher(base)
    total = MemoryRow("service_replica", "a replica in a service, all included")
    parts = [
        MemoryRow("replica", "  Replica (route, attributes, counters)"),
        MemoryRow("breaker", "  CircuitBreaker (default replica breaker)"),
        MemoryRow("window", "    of which its CountWindow (last 20 calls)"),
        MemoryRow("rest", "  the rest (breaker name and hook, lookup dict, tiers)"),
    ]
    replica, breaker, window, rest = parts

    def service() -> ServiceRuntime:
        runtime = _runtime(source)
        runtime.refresh()
        return runtime

    builders: list[tuple[MemoryRow, Callable[[], object]]] = [
        (total, service),
        (replica, lambda: [Replica(e) for e in base]),
        (breaker, lambda: [default_replica_breaker(name, system_clock, ()) for name in names]),
        (window, lambda: [CountWindow(20) for _ in range(n)]),
    ]
    for row, build in builders:
        if progress is not None:
            progress(f"memory: {row.label.strip()}")
        try:
            row.bytes = _bytes_each(build, n)
        except Exception as exc:
            row.error = kit.describe(exc)
    if total.bytes is not None and replica.bytes is not None and breaker.bytes is not None:
        rest.bytes = total.bytes - replica.bytes - breaker.bytes
    else:
        rest.error = "not measured"
    return [total, *parts]


# -- targets -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``section``'s ``row``: its ``metric`` must be at most ``limit`` (``unit``)."""

    name: str
    section: str
    row: str
    metric: str
    limit: float
    unit: str


TARGETS: tuple[Target, ...] = (
    Target(
        "PowerOfTwo pick <= 2 µs at 10, 1,000 and 10,000 replicas",
        "picks",
        "p2c",
        "max_ns",
        2000.0,
        "ns",
    ),
    Target(
        "PowerOfTwo pick flat: 10,000 replicas <= 2x 10 replicas", "picks", "p2c", "flat", 2.0, "x"
    ),
    Target(
        "a membership change of 10,000 replicas applied in <= 50 ms",
        "membership",
        "change_1",
        "min_ms",
        50.0,
        "ms",
    ),
    Target(
        "memory <= 2 KB per replica (Replica + breaker)",
        "memory",
        "service_replica",
        "bytes",
        2048.0,
        "B",
    ),
)


def _value(row: PickRow | TimeRow | MemoryRow, metric: str) -> float | None:
    if isinstance(row, PickRow):
        if metric == "flat":
            return row.flat
        values = list(row.ns.values())
        if not values or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)
    result: float | None = getattr(row, metric)
    return result


def check_targets(
    picks: Sequence[PickRow],
    membership: Sequence[TimeRow],
    memory: Sequence[MemoryRow],
    targets: Sequence[Target] = TARGETS,
) -> list[TargetResult[Target]]:
    """PASS when the measured value is within the limit; a missing measurement fails."""
    sections: dict[str, Sequence[PickRow | TimeRow | MemoryRow]] = {
        "picks": picks,
        "membership": membership,
        "memory": memory,
    }
    results = []
    for target in targets:
        row = next((r for r in sections[target.section] if r.key == target.row), None)
        value = None if row is None else _value(row, target.metric)
        if value is None:
            why = "not measured" if row is None or row.error is None else row.error
            results.append(TargetResult(target, None, False, why))
        else:
            results.append(TargetResult(target, value, value <= target.limit))
    return results


# -- reporting -----------------------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render(
    picks: Sequence[PickRow],
    membership: Sequence[TimeRow],
    memory: Sequence[MemoryRow],
    results: Sequence[TargetResult[Target]],
) -> str:
    """The three tables, their footnotes, then the targets."""
    notes: list[str] = []

    def note(row: PickRow | TimeRow | MemoryRow) -> str:
        if row.error is None:
            return ""
        notes.append(f"{row.label.strip()}: {row.error}")
        return f" [{len(notes)}]"

    out = ["pick cost, ns per pick"]
    out += kit.table(
        ["balancer", *(f"{n:,} replicas" for n in SIZES), "10,000 / 10"],
        [
            [
                row.label + note(row),
                *(_num(row.ns.get(n), ",.0f") for n in SIZES),
                _num(row.flat, ".2f") + ("x" if row.flat is not None else ""),
            ]
            for row in picks
        ],
    )
    out += ["", f"membership change, service of {SERVICE_SIZE:,} replicas"]
    out += kit.table(
        ["what", "min ms", "median ms"],
        [
            [row.label + note(row), _num(row.min_ms, ".2f"), _num(row.median_ms, ".2f")]
            for row in membership
        ],
    )
    out += ["", f"memory per replica, {SERVICE_SIZE:,} replicas (tracemalloc)"]
    out += kit.table(
        ["part", "bytes"],
        [[row.label + note(row), _num(row.bytes, ",.0f")] for row in memory],
    )
    out += [f"[{i}] {text}" for i, text in enumerate(notes, 1)]
    out += ["", "TARGETS"]
    for result in results:
        target = result.target
        if result.value is None:
            shown = str(result.error)
        else:
            value = f"{result.value:,.2f}" if target.unit in ("x", "ms") else f"{result.value:,.0f}"
            shown = f"{value} {target.unit} (limit {target.limit:,g} {target.unit})"
        out.append(kit.verdict_line(result.passed, target.name, shown))
    return "\n".join(out)


def to_json(
    picks: Sequence[PickRow],
    membership: Sequence[TimeRow],
    memory: Sequence[MemoryRow],
    results: Sequence[TargetResult[Target]],
    settings: Settings,
    quick: bool,
) -> dict[str, Any]:
    """Everything measured, as plain data (``--json``)."""
    return {
        **kit.environment(),
        "resilient": kit.installed_version(),
        "quick": quick,
        "repeats": settings.repeats,
        "sizes": list(SIZES),
        "service_size": SERVICE_SIZE,
        "picks": [
            {
                "key": row.key,
                "label": row.label,
                "ns": {str(n): row.ns.get(n) for n in SIZES},
                "flat": row.flat,
                "error": row.error,
            }
            for row in picks
        ],
        "membership": [
            {
                "key": row.key,
                "label": row.label,
                "min_ms": row.min_ms,
                "median_ms": row.median_ms,
                "error": row.error,
            }
            for row in membership
        ],
        "memory": [
            {"key": row.key, "label": row.label.strip(), "bytes": row.bytes, "error": row.error}
            for row in memory
        ],
        "targets": kit.targets_json(results),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the tables and the targets; ``--check`` turns a missed target into exit 1."""
    parser = kit.argument_parser(__doc__, quick_help="short repeats: a smoke test")
    parser.add_argument("--verbose", action="store_true", help="say what is being measured")
    args = parser.parse_args(argv)

    settings = (
        Settings(repeats=2, target_ns=5_000_000, membership_repeats=3)
        if args.quick
        else Settings(repeats=5, target_ns=50_000_000, membership_repeats=15)
    )
    progress = kit.progress_printer(args.verbose)
    picks = measure_picks(settings, progress)
    membership = measure_membership(settings, progress)
    memory = measure_memory(progress)
    results = check_targets(picks, membership, memory)

    print(kit.banner(f"resilient {kit.installed_version()}"))
    print(f"picks: min of {settings.repeats} repeats of ~{settings.target_ns / 1e9:g} s each\n")
    print(render(picks, membership, memory, results))
    if args.json:
        kit.write_json(args.json, to_json(picks, membership, memory, results, settings, args.quick))
    return kit.exit_status(args.check, results)


if __name__ == "__main__":
    sys.exit(main())
