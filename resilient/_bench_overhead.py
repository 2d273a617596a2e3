"""What each policy costs a call that succeeds: resilient beside the peers, measured in one run.

Every row wraps a function that returns 1 at once, so the time measured is what the wrapping adds
to a call that works. A cell is nanoseconds per call: the minimum over repeats of N calls each (N
sized so that one repeat takes about 0.1 s), timed with ``time.perf_counter_ns`` with the garbage
collector off; the repeats are interleaved across rows, so drifting machine load hits every row
alike. Async cells await the wrapped coroutine function in a loop inside one coroutine, under
``asyncio.run`` and under ``trio.run``. The ratio columns divide by tenacity's ``@retry``
measured in the same run, sync by sync and async by async: absolute times drift from machine to
machine, ratios much less. A stack that cannot be built or run on a backend (a peer not installed,
a policy still a placeholder, a library that does not support trio) is reported, not fatal.

The measuring lives here, in the package, so that the installed command runs it
(``resilient bench overhead``); ``benchmarks/overhead.py`` is the same program as a script.

Run::

    resilient bench overhead                            # the table, then the targets
    resilient bench overhead --check                    # exit 1 when a target is missed
    python benchmarks/overhead.py --quick --json out.json
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import itertools
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import resilient as rs
from resilient import _benchkit as kit

__all__ = ["STACKS", "TARGETS", "check_targets", "main", "measure", "render", "run_all"]

SyncFn = Callable[[], object]
AsyncFn = Callable[[], Awaitable[object]]

COLUMNS = ("sync", "asyncio", "trio")
REFERENCE = "tenacity.retry"


# -- what is measured ------------------------------------------------------------------------------


def _fresh_sync() -> Callable[[], int]:
    def one() -> int:
        return 1

    return one


def _fresh_async() -> Callable[[], Awaitable[int]]:
    async def one() -> int:
        return 1

    return one


@dataclass(frozen=True)
class Stack:
    """One row: how to build the wrapped sync function and the wrapped ``async def`` (None: n/a).

    The sync factory is called once per cell; the async one once per repeat, inside that repeat's
    fresh event loop (some libraries bind state to the first loop that uses them).
    """

    key: str
    label: str
    group: str
    sync: Callable[[], SyncFn] | None = None
    async_: Callable[[], AsyncFn] | None = None
    requires: tuple[str, ...] = ()


def _policy_stack(key: str, label: str, build: Callable[[], rs.Policy]) -> Stack:
    def sync_factory() -> SyncFn:
        return build()(_fresh_sync())

    def async_factory() -> AsyncFn:
        return build()(_fresh_async())

    return Stack(key, label, "resilient", sync_factory, async_factory)


def _pipeline() -> rs.Pipeline:
    return rs.Pipeline(
        rs.Fallback(value=None),
        rs.Bulkhead(max_concurrent=10),
        rs.Retry(on=Exception),
        rs.CircuitBreaker(),
    )


def _pipeline_timeout() -> rs.Pipeline:
    return rs.Pipeline(
        rs.Fallback(value=None),
        rs.Bulkhead(max_concurrent=10),
        rs.Retry(on=Exception),
        rs.CircuitBreaker(),
        rs.Timeout(1.0),
    )


def _tenacity_sync() -> SyncFn:
    import tenacity

    return tenacity.retry(stop=tenacity.stop_after_attempt(3))(_fresh_sync())


def _tenacity_async() -> AsyncFn:
    import tenacity

    return tenacity.retry(stop=tenacity.stop_after_attempt(3))(_fresh_async())


def _stamina_sync() -> SyncFn:
    import stamina

    return stamina.retry(on=Exception, attempts=3)(_fresh_sync())


def _stamina_async() -> AsyncFn:
    import stamina

    return stamina.retry(on=Exception, attempts=3)(_fresh_async())


def _backoff_sync() -> SyncFn:
    import backoff

    wrapped: SyncFn = backoff.on_exception(backoff.expo, Exception, max_tries=3)(_fresh_sync())
    return wrapped


def _backoff_async() -> AsyncFn:
    import backoff

    wrapped: AsyncFn = backoff.on_exception(backoff.expo, Exception, max_tries=3)(_fresh_async())
    return wrapped


def _pybreaker_sync() -> SyncFn:
    import pybreaker

    wrapped: SyncFn = pybreaker.CircuitBreaker(fail_max=5)(_fresh_sync())
    return wrapped


def _circuitbreaker_sync() -> SyncFn:
    import circuitbreaker

    wrapped: SyncFn = circuitbreaker.circuit()(_fresh_sync())
    return wrapped


def _circuitbreaker_async() -> AsyncFn:
    import circuitbreaker

    wrapped: AsyncFn = circuitbreaker.circuit()(_fresh_async())
    return wrapped


def _tenacity_pybreaker_sync() -> SyncFn:
    import pybreaker
    import tenacity

    inner: Callable[[], int] = pybreaker.CircuitBreaker(fail_max=5)(_fresh_sync())
    return tenacity.retry(stop=tenacity.stop_after_attempt(3))(inner)


def _pyresilience(full: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    import pyresilience

    extra: dict[str, Any] = {}
    if full:
        extra["bulkhead"] = pyresilience.BulkheadConfig(max_concurrent=10)
        extra["timeout"] = pyresilience.TimeoutConfig(seconds=1.0)
    decorate: Callable[[Callable[..., Any]], Callable[..., Any]] = pyresilience.resilient(
        retry=pyresilience.RetryConfig(max_attempts=3),
        circuit_breaker=pyresilience.CircuitBreakerConfig(),
        **extra,
    )
    return decorate


def _pyresilience_stack(key: str, label: str, *, full: bool) -> Stack:
    def sync_factory() -> SyncFn:
        return _pyresilience(full)(_fresh_sync())

    def async_factory() -> AsyncFn:
        return _pyresilience(full)(_fresh_async())

    return Stack(key, label, "peers", sync_factory, async_factory, ("pyresilience",))


STACKS: tuple[Stack, ...] = (
    Stack("plain", "plain function call", "baseline", _fresh_sync, _fresh_async),
    _policy_stack("resilient.retry", "Retry(on=Exception)", lambda: rs.Retry(on=Exception)),
    _policy_stack("resilient.circuit_breaker", "CircuitBreaker()", lambda: rs.CircuitBreaker()),
    _policy_stack(
        "resilient.bulkhead", "Bulkhead(max_concurrent=10)", lambda: rs.Bulkhead(max_concurrent=10)
    ),
    _policy_stack("resilient.timeout", "Timeout(1.0)", lambda: rs.Timeout(1.0)),
    _policy_stack("resilient.fallback", "Fallback(value=None)", lambda: rs.Fallback(value=None)),
    _policy_stack(
        "resilient.retry_budget",
        "Retry(on=Exception, budget=RetryBudget())",
        lambda: rs.Retry(on=Exception, budget=rs.RetryBudget()),
    ),
    _policy_stack(
        "resilient.pipeline", "Pipeline(Fallback, Bulkhead, Retry, CircuitBreaker)", _pipeline
    ),
    _policy_stack(
        "resilient.pipeline_timeout", "  ... + Timeout(1.0) innermost", _pipeline_timeout
    ),
    Stack(
        REFERENCE,
        "tenacity @retry(stop=stop_after_attempt(3))",
        "peers",
        _tenacity_sync,
        _tenacity_async,
        ("tenacity",),
    ),
    Stack(
        "stamina.retry",
        "stamina @retry(on=Exception, attempts=3)",
        "peers",
        _stamina_sync,
        _stamina_async,
        ("stamina",),
    ),
    Stack(
        "backoff.on_exception",
        "backoff @on_exception(expo, Exception, max_tries=3)",
        "peers",
        _backoff_sync,
        _backoff_async,
        ("backoff",),
    ),
    # pybreaker's async support needs Tornado; decorating an ``async def`` records the coroutine
    # object as a success, so there is nothing to measure.
    Stack(
        "pybreaker.breaker",
        "pybreaker CircuitBreaker(fail_max=5)",
        "peers",
        _pybreaker_sync,
        None,
        ("pybreaker",),
    ),
    Stack(
        "circuitbreaker.circuit",
        "circuitbreaker @circuit",
        "peers",
        _circuitbreaker_sync,
        _circuitbreaker_async,
        ("circuitbreaker",),
    ),
    Stack(
        "tenacity+pybreaker",
        "tenacity @retry over pybreaker",
        "peers",
        _tenacity_pybreaker_sync,
        None,
        ("tenacity", "pybreaker"),
    ),
    _pyresilience_stack("pyresilience.retry_breaker", "pyresilience retry + breaker", full=False),
    _pyresilience_stack(
        "pyresilience.full", "pyresilience retry + breaker + bulkhead + timeout", full=True
    ),
)


@dataclass(frozen=True)
class Target:
    """``row``'s ``column`` must cost at most ``limit`` times tenacity's, same column."""

    name: str
    row: str
    column: str
    limit: float


TARGETS: tuple[Target, ...] = (
    Target(
        "sync Pipeline(Fallback, Bulkhead, Retry, CircuitBreaker) <= 0.2x tenacity sync @retry",
        "resilient.pipeline",
        "sync",
        0.2,
    ),
    Target(
        "async Pipeline(..., Timeout) <= 0.3x tenacity async @retry (asyncio)",
        "resilient.pipeline_timeout",
        "asyncio",
        0.3,
    ),
)


# -- timing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """``repeats`` timed runs of N calls per cell, N sized so that one run takes ``target_ns``."""

    repeats: int
    target_ns: int


#: Failures a `Fallback` hid while a cell was checked: a pipeline that answers None because a policy
#: inside it raised is reported with that policy's error.
_replaced: list[BaseException | None] = []


def _note_fallback(event: rs.events.Event) -> None:
    if isinstance(event, rs.events.FallbackUsed):
        _replaced.append(event.exception)


class WrongResult(Exception):
    """The wrapped function returns 1; the stack answered something else."""


def _expect_one(value: object) -> None:
    if value != 1:
        if _replaced and _replaced[-1] is not None:
            raise WrongResult(f"a Fallback answered for {_describe(_replaced[-1])}")
        raise WrongResult(f"the wrapped call returned {value!r}, not 1")


def _timed_sync(fn: SyncFn, n: int) -> int:
    """Nanoseconds that ``n`` calls take, the garbage collector off."""
    repeat = itertools.repeat
    clock = time.perf_counter_ns
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = clock()
        for _ in repeat(None, n):
            fn()
        return clock() - t0
    finally:
        if enabled:
            gc.enable()


async def _timed_async(fn: AsyncFn, n: int) -> int:
    """Nanoseconds that ``n`` awaited calls take, the garbage collector off."""
    repeat = itertools.repeat
    clock = time.perf_counter_ns
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = clock()
        for _ in repeat(None, n):
            await fn()
        return clock() - t0
    finally:
        if enabled:
            gc.enable()


def _calibrate_sync(fn: SyncFn, target_ns: int) -> int:
    n = 1
    while (found := kit.calibrated(n, _timed_sync(fn, n), target_ns)) is None:
        n *= 2
    return found


async def _calibrate_async(fn: AsyncFn, target_ns: int) -> int:
    n = 1
    while (found := kit.calibrated(n, await _timed_async(fn, n), target_ns)) is None:
        n *= 2
    return found


async def _async_run(factory: Callable[[], AsyncFn], n: int, target_ns: int) -> tuple[int, int]:
    """One repeat in its own event loop: build and check; calibrate (``n`` = 0) or warm up; time.

    Returns (N, nanoseconds for N calls). A fresh loop and fresh wrapped function per repeat: some
    libraries bind their state to the loop that first used it.
    """
    fn = factory()
    _expect_one(await fn())
    if n == 0:
        n = await _calibrate_async(fn, target_ns)
    else:
        await _timed_async(fn, min(n, 1000))
    gc.collect()
    return n, await _timed_async(fn, n)


# -- running ---------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One measurement: ``ns`` per call, or the ``error`` that prevented it.

    ``applicable`` is False where the library offers no such variant (pybreaker has no asyncio).
    """

    applicable: bool = True
    ns: float | None = None
    ratio: float | None = None
    error: str | None = None


@dataclass
class Row:
    """A stack's cells, by column."""

    key: str
    label: str
    group: str
    cells: dict[str, Cell] = field(default_factory=dict)


def _describe(exc: BaseException) -> str:
    return kit.first_line(str(exc)) if isinstance(exc, WrongResult) else kit.describe(exc)


def _missing(stack: Stack, column: str) -> str | None:
    absent = [m for m in stack.requires if importlib.util.find_spec(m) is None]
    if absent:
        return f"not installed (pip install {' '.join(absent)})"
    if column == "trio" and importlib.util.find_spec("trio") is None:
        return "trio not installed"
    return None


@dataclass
class _Job:
    """A cell being measured: its N once calibrated, its built sync function, the best run."""

    label: str
    column: str
    factory: Callable[[], Any]
    cell: Cell
    n: int = 0
    fn: SyncFn | None = None
    best: float = float("inf")

    def run_once(self, target_ns: int) -> None:
        if self.column == "sync":
            if self.fn is None:
                self.fn = fn = self.factory()
                _expect_one(fn())
                self.n = _calibrate_sync(fn, target_ns)
            gc.collect()
            elapsed = _timed_sync(self.fn, self.n)
        elif self.column == "asyncio":
            self.n, elapsed = asyncio.run(_async_run(self.factory, self.n, target_ns))
        else:
            import trio

            self.n, elapsed = trio.run(_async_run, self.factory, self.n, target_ns)
        self.best = min(self.best, elapsed / self.n)


def _run_job(job: _Job, target_ns: int) -> None:
    _replaced.clear()
    rs.add_hook(_note_fallback)
    try:
        job.run_once(target_ns)
        return
    except Exception as exc:  # a placeholder policy, an unsupported backend: report, go on
        job.cell.error = _describe(exc)
    finally:
        rs.remove_hook(_note_fallback)
    # A library that failed on this backend may have left a coroutine it never awaited: collect it
    # now, quietly, rather than have its warning printed at some later point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gc.collect()


def run_all(
    settings: Settings,
    stacks: Sequence[Stack] = STACKS,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Measure every stack in every column, then fill in the ratios to tenacity's ``@retry``.

    The repeats are interleaved (every cell once, then every cell again...) so that a machine
    whose load drifts during the run slows every row alike and the ratios stay fair.

    Example::

        rows = run_all(Settings(repeats=5, target_ns=100_000_000))
        print(render(rows, check_targets(rows)))
    """
    rows = []
    jobs = []
    for stack in stacks:
        row = Row(stack.key, stack.label, stack.group)
        for column in COLUMNS:
            factory = stack.sync if column == "sync" else stack.async_
            if factory is None:
                row.cells[column] = Cell(applicable=False)
                continue
            row.cells[column] = cell = Cell(error=_missing(stack, column))
            if cell.error is None:
                jobs.append(_Job(stack.label.strip(), column, factory, cell))
        rows.append(row)
    for repeat in range(settings.repeats):
        for job in jobs:
            if job.cell.error is None:
                if progress is not None:
                    progress(f"{repeat + 1}/{settings.repeats} {job.label} [{job.column}]")
                _run_job(job, settings.target_ns)
    for job in jobs:
        if job.cell.error is None:
            job.cell.ns = job.best
    reference = next((r for r in rows if r.key == REFERENCE), None)
    for row in rows:
        for column, cell in row.cells.items():
            ref = None if reference is None else reference.cells[column].ns
            if cell.ns is not None and ref:
                cell.ratio = cell.ns / ref
    return rows


@dataclass
class TargetResult:
    target: Target
    ratio: float | None
    passed: bool
    error: str | None = None


def check_targets(rows: Sequence[Row], targets: Sequence[Target] = TARGETS) -> list[TargetResult]:
    """PASS when the row's ratio to tenacity is within the limit; a missing measurement fails."""
    by_key = {r.key: r for r in rows}
    results = []
    for target in targets:
        row = by_key.get(target.row)
        cell = None if row is None else row.cells.get(target.column)
        if cell is None or cell.ratio is None:
            why = "not measured"
            if cell is not None and cell.error:
                why = f"not measured ({cell.error})"
            ref = by_key.get(REFERENCE)
            ref_cell = None if ref is None else ref.cells.get(target.column)
            if ref_cell is not None and ref_cell.error:
                why = f"tenacity not measured ({ref_cell.error})"
            results.append(TargetResult(target, None, False, why))
        else:
            results.append(TargetResult(target, cell.ratio, cell.ratio <= target.limit))
    return results


# -- reporting -------------------------------------------------------------------------------------


def _fmt_ns(ns: float) -> str:
    return f"{ns:,.0f}"


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio:.3f}" if ratio < 10 else f"{ratio:.1f}"


def render(rows: Sequence[Row], results: Sequence[TargetResult]) -> str:
    """The table (ns per successful call and ratio to tenacity), footnotes, then the targets."""
    header = ["stack", "sync ns", "x ten.", "asyncio ns", "x ten.", "trio ns", "x ten."]
    notes: list[str] = []
    body: list[list[str] | None] = []
    group = None
    for row in rows:
        if row.group != group:
            if group is not None:
                body.append(None)
            group = row.group
        line = [row.label]
        for column in COLUMNS:
            cell = row.cells[column]
            if not cell.applicable:
                line += ["-", ""]
            elif cell.ns is None:
                notes.append(f"{row.label.strip()} [{column}]: {cell.error}")
                line += [f"n/a [{len(notes)}]", ""]
            else:
                ratio = "" if cell.ratio is None else _fmt_ratio(cell.ratio)
                line += [_fmt_ns(cell.ns), ratio]
        body.append(line)
    out = kit.table(header, body)
    out += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    out += ["", "TARGETS"]
    for result in results:
        if result.ratio is None:
            shown = str(result.error)
        else:
            shown = f"{result.ratio:.3f}x (limit {result.target.limit}x)"
        out.append(kit.verdict_line(result.passed, result.target.name, shown))
    return "\n".join(out)


_DISTRIBUTIONS = (
    "resilient",
    "tenacity",
    "pybreaker",
    "stamina",
    "backoff",
    "circuitbreaker",
    "pyresilience",
    "trio",
    "anyio",
)


def to_json(
    rows: Sequence[Row], results: Sequence[TargetResult], settings: Settings, quick: bool
) -> dict[str, Any]:
    """Everything measured, as plain data (``--json``)."""
    return {
        **kit.environment(),
        "quick": quick,
        "repeats": settings.repeats,
        "seconds_per_repeat": settings.target_ns / 1e9,
        "unit": "ns per successful call",
        "reference": REFERENCE,
        "versions": kit.installed_versions(_DISTRIBUTIONS),
        "columns": list(COLUMNS),
        "rows": [
            {
                "key": row.key,
                "label": row.label,
                "group": row.group,
                "cells": {
                    column: {
                        "applicable": cell.applicable,
                        "ns": cell.ns,
                        "ratio": cell.ratio,
                        "error": cell.error,
                    }
                    for column, cell in row.cells.items()
                },
            }
            for row in rows
        ],
        "targets": [
            {
                "name": r.target.name,
                "row": r.target.row,
                "column": r.target.column,
                "limit": r.target.limit,
                "ratio": r.ratio,
                "pass": r.passed,
                "error": r.error,
            }
            for r in results
        ],
    }


def measure(
    *, quick: bool = False, verbose: bool = False, check: bool = False, json_path: str | None = None
) -> tuple[int, dict[str, Any]]:
    """Measure, print the table and the targets; return (exit status, the results as data).

    ``check`` turns a missed target into exit status 1; ``json_path`` also writes the data there.

    Example::

        status, data = measure(quick=True)
        assert {t["row"] for t in data["targets"]} == {"resilient.pipeline", "resilient.pipeline_timeout"}
    """
    settings = Settings(repeats=2, target_ns=10_000_000) if quick else Settings(5, 100_000_000)
    progress = kit.progress_printer(verbose)
    rows = run_all(settings, progress=progress)
    results = check_targets(rows)

    print(kit.banner(f"resilient {kit.installed_version()}"))
    print(
        f"ns per successful call, min of {settings.repeats} repeats of "
        f"~{settings.target_ns / 1e9:g} s; 'x ten.' = ratio to tenacity @retry, same column\n"
    )
    print(render(rows, results))
    data = to_json(rows, results, settings, quick)
    if json_path:
        kit.write_json(json_path, data)
    return kit.exit_status(check, results), data


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table and the targets; ``--check`` turns a missed target into exit 1."""
    parser = kit.argument_parser(__doc__, quick_help="2 short repeats: a smoke test")
    parser.add_argument("--verbose", action="store_true", help="say which cell is being measured")
    args = parser.parse_args(argv)
    status, _ = measure(
        quick=args.quick, verbose=args.verbose, check=args.check, json_path=args.json
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
