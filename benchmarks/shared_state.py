"""What sharing breaker and budget state through Redis costs per call, beside the local state.

One run, against a ``redis-server`` on loopback (started by the benchmark on a free port, or the
one given with ``--url``):

1. **Round trip.** ``PING`` with redis-py: the floor any Redis-backed call pays.
2. **Breaker, per call.** ``breaker.call(fn)`` on a successful no-op ``fn``: the local breaker
   (``store=None``), then the Redis-backed one (sync, and ``await call_async`` on asyncio);
   then a Redis-backed breaker that is open (calls refused from the cached state).
3. **Budget, per call.** ``deposit()`` alone (counted, sent every ``flush_calls``), and
   ``deposit()`` + ``try_withdraw()`` (one round trip), local and shared.
4. **Round trips per call.** EVALSHA calls that Redis counted (``INFO commandstats``) during
   the closed-breaker run, divided by the calls made.

A cell is microseconds per call: the minimum over repeats of N calls (``time.perf_counter``),
the garbage collector off.

Run::

    python benchmarks/shared_state.py                      # the table, then the targets
    python benchmarks/shared_state.py --check              # exit 1 when a target is missed
    python benchmarks/shared_state.py --quick --json out.json
    python benchmarks/shared_state.py --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import resilient as rs
from resilient import _benchkit as kit
from resilient._benchkit import TargetResult
from resilient.stores import RedisStore

__all__ = ["TARGETS", "Row", "Settings", "check_targets", "main", "measure", "render"]


@dataclass(frozen=True)
class Settings:
    """``repeats`` timed runs of ``calls`` calls per cell."""

    repeats: int
    calls: int


@dataclass
class Row:
    """Microseconds per call (``us``), or another figure (``value``, ``unit``)."""

    key: str
    label: str
    us: float | None = None
    value: float | None = None
    unit: str = "µs"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- a redis-server --------------------------------------------------------------------------------


@contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    """``url`` as given, or a fresh ``redis-server`` on a free loopback port for the run."""
    if url is not None:
        yield url
        return
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.01)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


# -- timing ----------------------------------------------------------------------------------------


def _best_us(run: Callable[[int], None], settings: Settings) -> float:
    """Minimum over the repeats of the time ``run(calls)`` takes, in µs per call."""
    run(max(1, settings.calls // 10))  # warm up: connections, scripts loaded, caches
    best = float("inf")
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(settings.repeats):
            t0 = time.perf_counter()
            run(settings.calls)
            best = min(best, time.perf_counter() - t0)
    finally:
        if enabled:
            gc.enable()
    return best / settings.calls * 1e6


def _loop(call: Callable[[], object]) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            call()

    return run


def _loop_async(call: Callable[[], Awaitable[object]]) -> Callable[[int], None]:
    loop = asyncio.new_event_loop()

    async def calls(n: int) -> None:
        for _ in range(n):
            await call()

    def run(n: int) -> None:
        loop.run_until_complete(calls(n))

    run.loop = loop  # type: ignore[attr-defined]
    return run


def _noop() -> None:
    return None


async def _anoop() -> None:
    return None


def _evalsha_calls(store: RedisStore) -> int:
    stats = store._client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def measure(
    url: str, settings: Settings, progress: Callable[[str], None] | None = None
) -> list[Row]:
    """Every row of the table, measured against the Redis at ``url``.

    Example::

        for row in measure("redis://127.0.0.1:6379/0", Settings(repeats=3, calls=2000)):
            print(row.label, row.us)
    """
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    store = RedisStore(url, prefix=prefix, socket_timeout=1.0, socket_connect_timeout=1.0)
    rows: list[Row] = []

    def cell(key: str, label: str, run: Callable[[int], None]) -> Row:
        if progress is not None:
            progress(label)
        row = Row(key, label)
        try:
            row.us = _best_us(run, settings)
        except Exception as exc:
            row.error = kit.describe(exc)
        rows.append(row)
        return row

    try:
        client = store._client
        cell("ping", "redis-py PING round trip (the floor)", _loop(client.ping))
        local = rs.CircuitBreaker(name="bench")
        cell("breaker_local", "breaker.call, local state", _loop(lambda: local.call(_noop)))
        shared = rs.CircuitBreaker(name="bench", store=store)
        shared.call(_noop)  # the first call also fetches the state; the others do not
        before = _evalsha_calls(store)
        made = 0

        def counted(n: int) -> None:
            nonlocal made
            made += n
            for _ in range(n):
                shared.call(_noop)

        cell("breaker_redis", "breaker.call, Redis-backed (closed)", counted)
        trips = Row("round_trips", "round trips per closed call (EVALSHA / calls)", unit="")
        if made:
            trips.value = (_evalsha_calls(store) - before) / made
            trips.extra = {"calls": made}
        else:
            trips.error = "not measured"
        rows.append(trips)
        ashared = rs.CircuitBreaker(name="bench-async", store=store)
        arun = _loop_async(lambda: ashared.call_async(_anoop))
        try:
            cell("breaker_redis_async", "await breaker.call_async, Redis-backed (asyncio)", arun)
            arun.loop.run_until_complete(store.aclose())  # type: ignore[attr-defined]
        finally:
            arun.loop.close()  # type: ignore[attr-defined]
        refused = rs.CircuitBreaker(
            name="bench-open", open_for=3600.0, max_open_for=3600.0, store=store
        )
        refused.open()

        def refuse(n: int) -> None:
            for _ in range(n):
                try:
                    refused.call(_noop)
                except rs.CircuitOpenError:
                    pass

        cell("breaker_redis_open", "breaker.call refused, Redis-backed (open)", refuse)

        for kind, budget_store in (("local", None), ("redis", store)):
            budget = rs.RetryBudget(name=f"bench-{kind}", ratio=0.5, store=budget_store)
            cell(f"deposit_{kind}", f"budget.deposit(), {kind}", _loop(budget.deposit))

            def deposit_withdraw(n: int, budget: rs.RetryBudget = budget) -> None:
                for _ in range(n):
                    budget.deposit()
                    budget.try_withdraw()

            cell(
                f"withdraw_{kind}",
                f"budget.deposit() + try_withdraw(), {kind}",
                deposit_withdraw,
            )
        if not store.available:
            for row in rows:
                row.error = row.error or "Redis was unavailable during the run"
    finally:
        try:
            keys = store._client.keys(f"{prefix}*")
            if keys:
                store._client.delete(*keys)
        except Exception:
            pass
        store.close()
    return rows


# -- targets -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Row ``row``'s figure (µs, or ``value``), divided by row ``per``'s if given, <= ``limit``."""

    name: str
    row: str
    limit: float
    per: str | None = None


TARGETS: tuple[Target, ...] = (
    Target("a closed Redis-backed call makes <= 1 round trip", "round_trips", 1.0),
    Target("a closed Redis-backed call costs <= 4 PING round trips", "breaker_redis", 4.0, "ping"),
    Target("a refused call makes no round trip: <= 20 µs", "breaker_redis_open", 20.0),
    # Deposits are sent in batches (every flush_calls = 100 calls): about 1/100 of a round trip
    # each, plus the local count. Relative to the round trip, so that a slow moment of the
    # machine or of Redis does not decide it.
    Target("a shared deposit costs <= 1/50 of a PING round trip", "deposit_redis", 0.02, "ping"),
)


def _figure(row: Row) -> float | None:
    return row.us if row.us is not None else row.value


def check_targets(
    rows: Sequence[Row], targets: Sequence[Target] = TARGETS
) -> list[TargetResult[Target]]:
    """PASS when the measured figure is within the limit; a missing measurement fails."""
    by_key = {row.key: row for row in rows}
    results = []
    for target in targets:
        row = by_key.get(target.row)
        value = None if row is None else _figure(row)
        if value is not None and target.per is not None:
            base = by_key.get(target.per)
            base_value = None if base is None else _figure(base)
            value = None if not base_value else value / base_value
        if value is None:
            why = "not measured" if row is None or row.error is None else row.error
            results.append(TargetResult(target, None, False, why))
        else:
            results.append(TargetResult(target, value, value <= target.limit))
    return results


# -- reporting -----------------------------------------------------------------------------------------


def render(rows: Sequence[Row], results: Sequence[TargetResult[Target]]) -> str:
    """The table, its footnotes, then the targets."""
    notes: list[str] = []
    lines = []
    for row in rows:
        figure = _figure(row)
        mark = ""
        if row.error is not None:
            notes.append(f"{row.label}: {row.error}")
            mark = f" [{len(notes)}]"
        shown = "n/a" if figure is None else f"{figure:,.2f}"
        lines.append((row.label + mark, shown, row.unit))
    width = max(len(label) for label, _, _ in lines)
    out = [f"{'what'.ljust(width)}  {'per call':>10}", "-" * (width + 16)]
    out += [f"{label.ljust(width)}  {shown:>10} {unit}".rstrip() for label, shown, unit in lines]
    out.append("-" * (width + 16))
    out += [f"[{i}] {text}" for i, text in enumerate(notes, 1)]
    out += ["", "TARGETS"]
    for result in results:
        if result.value is None:
            shown = str(result.error)
        else:
            unit = "x" if result.target.per else ""
            shown = f"{result.value:,.2f}{unit} (limit {result.target.limit:g}{unit})"
        out.append(kit.verdict_line(result.passed, result.target.name, shown))
    return "\n".join(out)


def to_json(
    rows: Sequence[Row], results: Sequence[TargetResult[Target]], settings: Settings, quick: bool
) -> dict[str, Any]:
    """Everything measured, as plain data (``--json``)."""
    return {
        **kit.environment(),
        "resilient": kit.installed_version(),
        "quick": quick,
        "repeats": settings.repeats,
        "calls": settings.calls,
        "rows": [
            {
                "key": row.key,
                "label": row.label,
                "us": row.us,
                "value": row.value,
                "unit": row.unit,
                "error": row.error,
                **row.extra,
            }
            for row in rows
        ],
        "targets": kit.targets_json(results),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table and the targets; ``--check`` turns a missed target into exit 1."""
    parser = kit.argument_parser(__doc__, quick_help="short repeats: a smoke test")
    parser.add_argument("--verbose", action="store_true", help="say what is being measured")
    parser.add_argument("--url", help="an existing Redis (default: start redis-server)")
    args = parser.parse_args(argv)

    settings = Settings(repeats=2, calls=500) if args.quick else Settings(repeats=5, calls=5000)
    progress = kit.progress_printer(args.verbose)
    try:
        with redis_server(args.url) as url:
            rows = measure(url, settings, progress)
    except Exception as exc:
        rows = [Row("setup", "a Redis to measure against", error=kit.describe(exc))]
    results = check_targets(rows)

    print(kit.banner(f"resilient {kit.installed_version()}"))
    print(f"min of {settings.repeats} repeats of {settings.calls:,} calls, Redis on loopback\n")
    print(render(rows, results))
    if args.json:
        kit.write_json(args.json, to_json(rows, results, settings, args.quick))
    return kit.exit_status(args.check, results)


if __name__ == "__main__":
    sys.exit(main())
