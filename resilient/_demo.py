"""``resilient demo``: a faulty local fleet, served by plain httpx and by resilient side by side.

A `Fleet` of three replica processes on loopback goes through a scripted story — all healthy; a
replica crashes; another turns gray (half its answers 503); the crashed one comes back; the third
freezes (SIGSTOP); all recover — while two clients send the same steady stream of GETs: plain
httpx round-robin over the three URLs, and ``httpx.Client(transport=rs.ResilientTransport(...))``
with default settings. A live dashboard (rich) shows both; without a terminal, plain progress
lines. The summary ends the run; the exit status is 0 when resilient kept ≥ 99.9 % success.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

import resilient as rs
from resilient.testing import Fleet, PortInUseError

if TYPE_CHECKING:
    from rich.console import Group

__all__ = ["add_arguments", "run"]

#: resilient's success rate the demo promises (and checks).
PROMISE = 99.9

SERVICE = "fleet"
ZK_PATH = "/resilient-demo/fleet"


@dataclass
class Stats:
    """What one client saw: outcomes and latencies, overall and over the last seconds."""

    name: str
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    recent: deque[tuple[float, bool, float]] = field(default_factory=lambda: deque(maxlen=4000))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, good: bool, seconds: float) -> None:
        with self.lock:
            if good:
                self.ok += 1
            else:
                self.failed += 1
            self.latencies.append(seconds)
            self.recent.append((time.monotonic(), good, seconds))

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def success(self) -> float:
        return 100.0 * self.ok / self.total if self.total else 100.0

    def percentile(self, q: float, window: float | None = None) -> float:
        with self.lock:
            if window is None:
                values = sorted(self.latencies)
            else:
                since = time.monotonic() - window
                values = sorted(s for t, _, s in self.recent if t >= since)
        if not values:
            return 0.0
        return values[min(len(values) - 1, int(len(values) * q))] * 1000.0

    def window(self, seconds: float) -> tuple[float, float]:
        """(success %, requests per second) over the last ``seconds``."""
        since = time.monotonic() - seconds
        with self.lock:
            recent = [good for t, good, _ in self.recent if t >= since]
        if not recent:
            return 100.0, 0.0
        return 100.0 * sum(recent) / len(recent), len(recent) / seconds


@dataclass(frozen=True)
class Step:
    at: float  # fraction of the run
    text: str
    act: Callable[[Fleet], None]


def story() -> list[Step]:
    def gray(fleet: Fleet) -> None:
        fleet[1].set_faults(error_rate=0.5)

    def recover(fleet: Fleet) -> None:
        fleet[1].set_faults()
        fleet[2].thaw()

    return [
        Step(0.00, "all three replicas healthy", lambda fleet: None),
        Step(0.15, "replica 0 crashes (SIGKILL)", lambda fleet: fleet[0].kill()),
        Step(0.30, "replica 1 turns gray: half its answers are 503", gray),
        Step(0.45, "replica 0 is restarted by its supervisor", lambda fleet: fleet[0].restart()),
        Step(
            0.55,
            "replica 2 freezes (SIGSTOP): it accepts and never answers",
            lambda f: f[2].freeze(),
        ),
        Step(0.80, "all recover: replica 1 heals, replica 2 thaws", recover),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--seed", type=int, default=1, help="fleet fault seed (default 1)")
    parser.add_argument(
        "--rate", type=float, default=60.0, help="requests/s per client (default 60)"
    )
    parser.add_argument(
        "--base-port", type=int, default=None, help="run replicas on ports N, N+1, N+2"
    )
    parser.add_argument(
        "--zookeeper",
        metavar="HOST:PORT",
        default=None,
        help="register the replicas in ZooKeeper and let resilient discover them there",
    )
    parser.add_argument(
        "--plain", action="store_true", help="plain progress lines even on a terminal"
    )


def _send_loop(
    stats: Stats,
    send: Callable[[], bool],
    stop: threading.Event,
    interval: float,
    offset: float,
) -> None:
    next_at = time.monotonic() + offset
    while not stop.is_set():
        delay = next_at - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        next_at += interval
        started = time.monotonic()
        try:
            good = send()
        except httpx.HTTPError:
            good = False
        except rs.ResilienceError:
            good = False
        stats.record(good, time.monotonic() - started)


def _replica_view(fleet: Fleet, transport: rs.ResilientTransport) -> list[tuple[str, str, str]]:
    """Per replica: the truth (what the fleet did to it) and resilient's view of it."""
    seen = {s.url: s for s in transport.statistics().get(SERVICE, [])}
    rows = []
    for i, replica in enumerate(fleet):
        truth = replica.state
        stat = seen.get(fleet.urls[i])
        view = "-" if stat is None else f"{stat.state}, breaker {stat.breaker}"
        rows.append((f"replica {i}  {fleet.urls[i]}", truth, view))
    return rows


def _dashboard(
    plain: Stats,
    resilient: Stats,
    fleet: Fleet,
    transport: rs.ResilientTransport,
    events: list[str],
    elapsed: float,
    duration: float,
) -> Group:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    clients = Table(title=f"resilient demo — {elapsed:4.1f} s of {duration:.0f} s", expand=True)
    for column in ("client", "requests", "success %", "last 3 s %", "req/s", "p50 ms", "p99 ms"):
        clients.add_column(column, justify="right" if column != "client" else "left")
    for stats in (plain, resilient):
        recent, rps = stats.window(3.0)
        style = "green" if stats.success() >= PROMISE else "red"
        clients.add_row(
            stats.name,
            str(stats.total),
            f"[{style}]{stats.success():.2f}[/{style}]",
            f"{recent:.1f}",
            f"{rps:.0f}",
            f"{stats.percentile(0.5, 3.0):.1f}",
            f"{stats.percentile(0.99, 3.0):.1f}",
        )
    replicas = Table(expand=True)
    replicas.add_column("replica")
    replicas.add_column("what the fleet did")
    replicas.add_column("what resilient sees")
    for name, truth, view in _replica_view(fleet, transport):
        replicas.add_row(name, truth, view)
    runtime = transport._services.get(SERVICE)
    service_breaker = runtime.breaker.state if runtime is not None and runtime.breaker else "-"
    budget = transport.budget.balance() if transport.budget is not None else float("nan")
    footer = (
        f"service breaker: {service_breaker}    retry budget: {budget:.0f} tokens    "
        f"panic mode: {runtime.panic if runtime is not None else '-'}"
    )
    story_panel = Panel("\n".join(events[-6:]), title="story")
    return Group(clients, replicas, footer, story_panel)


def _summary(plain: Stats, resilient: Stats, fleet_requests: int, wall: float) -> str:
    lines = [
        "",
        f"{'client':<34}{'requests':>9}{'success %':>11}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}",
    ]
    for stats in (plain, resilient):
        lines.append(
            f"{stats.name:<34}{stats.total:>9}{stats.success():>11.2f}"
            f"{stats.percentile(0.5):>9.1f}{stats.percentile(0.99):>9.1f}"
            f"{stats.percentile(1.0):>9.0f}"
        )
    lines.append(f"requests the replicas saw: {fleet_requests}; wall time {wall:.1f} s")
    return "\n".join(lines)


@contextlib.contextmanager
def _discovery(args: argparse.Namespace, fleet: Fleet) -> Iterator[rs.discovery.Discovery]:
    if args.zookeeper is None:
        yield rs.discovery.Static(fleet.urls, name="demo")
        return
    with contextlib.ExitStack() as stack:
        for url in fleet.urls:
            stack.enter_context(
                rs.discovery.register_zookeeper(args.zookeeper, ZK_PATH, url, connect_timeout=5.0)
            )
        source = rs.discovery.ZooKeeper(args.zookeeper, ZK_PATH, name="demo")
        yield source


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.duration) and args.duration > 0):  # (nan: forever)
        print(f"--duration must be a finite number > 0, got {args.duration}", file=sys.stderr)
        return 2
    if not (math.isfinite(args.rate) and args.rate > 0):  # (nan: no throttle at all)
        print(f"--rate must be a finite number > 0, got {args.rate}", file=sys.stderr)
        return 2
    ports = None
    if args.base_port is not None:
        if not 1 <= args.base_port <= 65535 - 2:
            print(
                f"--base-port must be in 1..65533 (it and the next two), got {args.base_port}",
                file=sys.stderr,
            )
            return 2
        ports = [args.base_port + i for i in range(3)]
    live = sys.stdout.isatty() and not args.plain
    if live:
        try:
            import rich  # noqa: F401
        except ImportError:
            live = False
    try:
        fleet_context = Fleet(3, seed=args.seed, ports=ports)
        fleet = fleet_context.__enter__()
    except PortInUseError as exc:
        print(f"resilient demo: {exc}; choose other ports with --base-port", file=sys.stderr)
        return 2
    try:
        return _run(args, fleet, live)
    finally:
        fleet_context.__exit__(None, None, None)


def _run(args: argparse.Namespace, fleet: Fleet, live: bool) -> int:
    plain = Stats("plain httpx (round-robin)")
    resilient = Stats("httpx + rs.ResilientTransport")
    rng = random.Random(args.seed)
    urls = itertools.cycle(fleet.urls)
    urls_lock = threading.Lock()
    events: list[str] = []
    started = time.monotonic()

    def say(text: str) -> None:
        line = f"{time.monotonic() - started:5.1f} s  {text}"
        events.append(line)
        if not live:
            print(line, flush=True)

    try:
        discovery_context = _discovery(args, fleet)
        discovery = discovery_context.__enter__()
    except Exception as exc:
        print(f"resilient demo: cannot use ZooKeeper at {args.zookeeper}: {exc}", file=sys.stderr)
        return 2
    transport = rs.ResilientTransport(services={SERVICE: discovery})
    timeout = httpx.Timeout(1.0)
    plain_client = httpx.Client(timeout=timeout)
    resilient_client = httpx.Client(transport=transport, timeout=timeout)

    def send_plain() -> bool:
        with urls_lock:
            url = next(urls)
        return plain_client.get(url + "/items").status_code == 200

    def send_resilient() -> bool:
        return resilient_client.get(f"http://{SERVICE}/items").status_code == 200

    stop = threading.Event()
    threads = []
    workers = 4  # per client: enough that one frozen replica cannot stall a client
    interval = workers / args.rate
    for stats, send in ((plain, send_plain), (resilient, send_resilient)):
        for w in range(workers):
            thread = threading.Thread(
                target=_send_loop,
                args=(stats, send, stop, interval, w * interval / workers + rng.random() * 0.001),
                name=f"demo-{stats.name[:5]}-{w}",
                daemon=True,
            )
            threads.append(thread)
    steps = story()
    try:
        for thread in threads:
            thread.start()
        if live:
            _drive_live(args, fleet, transport, plain, resilient, events, started, steps, say)
        else:
            _drive_plain(args, fleet, plain, resilient, started, steps, say)
    finally:
        stop.set()
        for thread in threads:
            thread.join(5.0)
        with contextlib.suppress(Exception):
            fleet[2].thaw()
        resilient_client.close()
        plain_client.close()
        discovery_context.__exit__(None, None, None)
    wall = time.monotonic() - started
    fleet_requests = fleet.total_requests()
    print(_summary(plain, resilient, fleet_requests, wall))
    if resilient.success() >= PROMISE:
        print(
            f"resilient kept {resilient.success():.2f} % of requests successful "
            f"(plain httpx: {plain.success():.2f} %)."
        )
        return 0
    print(f"resilient fell below {PROMISE} % this time: {resilient.success():.2f} %.")
    return 1


def _due(steps: list[Step], fraction: float, done: int) -> int:
    return sum(1 for step in steps[done:] if step.at <= fraction)


def _drive_plain(
    args: argparse.Namespace,
    fleet: Fleet,
    plain: Stats,
    resilient: Stats,
    started: float,
    steps: list[Step],
    say: Callable[[str], None],
) -> None:
    done = 0
    next_report = 2.0
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= args.duration:
            return
        for step in steps[done : done + _due(steps, elapsed / args.duration, done)]:
            step.act(fleet)
            say(step.text)
            done += 1
        if elapsed >= next_report:
            next_report += 2.0
            print(
                f"{elapsed:5.1f} s  plain {plain.success():6.2f} % of {plain.total:5d}   "
                f"resilient {resilient.success():6.2f} % of {resilient.total:5d}",
                flush=True,
            )
        time.sleep(0.05)


def _drive_live(
    args: argparse.Namespace,
    fleet: Fleet,
    transport: rs.ResilientTransport,
    plain: Stats,
    resilient: Stats,
    events: list[str],
    started: float,
    steps: list[Step],
    say: Callable[[str], None],
) -> None:
    from rich.live import Live

    done = 0
    with Live(refresh_per_second=4, transient=False) as display:
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= args.duration:
                break
            for step in steps[done : done + _due(steps, elapsed / args.duration, done)]:
                step.act(fleet)
                say(step.text)
                done += 1
            display.update(
                _dashboard(plain, resilient, fleet, transport, events, elapsed, args.duration)
            )
            time.sleep(0.25)
