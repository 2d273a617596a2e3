"""Local replica HTTP servers as real processes on loopback, with fault knobs: :class:`Fleet`.

Each replica is a child process running :mod:`resilient.testing._replica` (an asyncio HTTP/1.1
server, standard library only). The parent drives it over the child's stdin and stdout, never over
the served port, so request counts are exact; every knob returns once the child has applied it.

What a replica answers (every path but ``/health`` is counted and subject to faults):

- any request: ``200`` and ``{"replica": i, "method": "GET", "path": "/x", "body_bytes": N}``, where
  ``body_bytes`` is the size of the request body received; header ``X-Replica: i``.
- ``GET /echo-headers``: the request headers as a JSON object (lower-case names).
- ``GET /health``: ``200 ok``, never delayed or failed by :meth:`Replica.set_faults` (not counted
  in ``total``; see ``Counts.health_checks``). It fails only when the replica is down, killed or
  frozen.
- query controls: ``?status=503`` answers that status, ``&retry_after=1.5`` sets ``Retry-After``
  verbatim, ``&delay=0.2`` waits that many seconds first, ``&body_bytes=N`` makes the response body
  exactly N bytes. An invalid control gets ``400``.

Exceptions::

    RuntimeError
    └── FleetError                  misuse of a fleet (not started, closed, ...)
        ├── PortInUseError          a replica could not listen on its port (``.port``)
        └── ReplicaUnavailableError  a replica cannot take a control call: killed, frozen, exited,
                                     or it did not answer within the control timeout
"""

from __future__ import annotations

import json
import math
import os
import queue
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

__all__ = [
    "Counts",
    "Fleet",
    "FleetCounts",
    "FleetError",
    "PortInUseError",
    "Replica",
    "ReplicaUnavailableError",
]

_T = TypeVar("_T")
_REPLICA_SCRIPT = str(Path(__file__).with_name("_replica.py"))
_TERMINATE_GRACE = 1.0
_KILL_WAIT = 5.0


class FleetError(RuntimeError):
    """A fleet or replica was used in a way it cannot serve (not started, already closed, ...).

    Example::

        fleet = rs.testing.Fleet(2)
        try:
            fleet.urls
        except rs.testing.FleetError:
            ...  # not started: use ``with fleet:`` or ``fleet.start()``
    """


class PortInUseError(FleetError):
    """A replica could not listen on its port because another socket holds it.

    Example::

        try:
            with rs.testing.Fleet(1, ports=[8080]) as fleet:
                ...
        except rs.testing.PortInUseError as exc:
            print("taken:", exc.port)
    """

    def __init__(self, message: str, *, port: int) -> None:
        super().__init__(message)
        self.port = port


class ReplicaUnavailableError(FleetError):
    """A control call could not reach a replica: it is killed, frozen, exited, or it timed out.

    Signal-based knobs (:meth:`Replica.kill`, :meth:`Replica.freeze`, :meth:`Replica.thaw`,
    :meth:`Replica.restart`) never raise it for a live process.

    Example::

        fleet[0].freeze()
        try:
            fleet[0].set_faults(error_rate=1.0)
        except rs.testing.ReplicaUnavailableError:
            fleet[0].thaw()
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class Counts:
    """What one replica has received, exactly, since it started or its counts were last reset.

    A request counts once its head and body have fully arrived, before any delay or fault, whatever
    is then answered. ``by_key`` counts requests per ``Idempotency-Key`` header value (falling back
    to ``X-Request-Id``); ``by_status`` counts the statuses chosen; ``truncated_bodies`` counts
    requests whose connection closed before their body (``Content-Length`` or chunked) was complete
    (those are not in ``total``); ``health_checks`` counts ``GET /health`` (not in ``total``).

    Example::

        counts = fleet[0].counts()
        assert counts.total == 42 and counts.by_method == {"GET": 37, "POST": 5}
        assert all(n == 1 for n in counts.by_key.values())  # no POST ran twice
    """

    total: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    by_key: dict[str, int] = field(default_factory=dict)
    by_status: dict[int, int] = field(default_factory=dict)
    truncated_bodies: int = 0
    health_checks: int = 0

    def __add__(self, other: Counts) -> Counts:
        if not isinstance(other, Counts):
            return NotImplemented
        return Counts(
            total=self.total + other.total,
            by_method=_add_maps(self.by_method, other.by_method),
            by_key=_add_maps(self.by_key, other.by_key),
            by_status=_add_maps(self.by_status, other.by_status),
            truncated_bodies=self.truncated_bodies + other.truncated_bodies,
            health_checks=self.health_checks + other.health_checks,
        )

    @classmethod
    def _from_wire(cls, data: Mapping[str, Any]) -> Counts:
        return cls(
            total=int(data["total"]),
            by_method={str(k): int(v) for k, v in data["by_method"].items()},
            by_key={str(k): int(v) for k, v in data["by_key"].items()},
            by_status={int(k): int(v) for k, v in data["by_status"].items()},
            truncated_bodies=int(data["truncated_bodies"]),
            health_checks=int(data["health_checks"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetCounts(Counts):
    """The counts of every replica (``replicas[i]``) and, in the inherited fields, their sum.

    Example::

        counts = fleet.counts()
        assert counts.total == sum(c.total for c in counts.replicas)
        duplicated = {key for key, n in counts.by_key.items() if n > 1}  # across replicas
    """

    replicas: tuple[Counts, ...] = ()


def _add_maps(a: Mapping[_T, int], b: Mapping[_T, int]) -> dict[_T, int]:
    out = dict(a)
    for key, n in b.items():
        out[key] = out.get(key, 0) + n
    return out


class _Spawner:
    """Starts every child from one long-lived thread.

    Linux delivers PR_SET_PDEATHSIG when the *thread* that forked the child exits, so a replica
    started (or restarted) from a short-lived worker thread would die with that thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def run(self, job: Callable[[], _T]) -> _T:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="resilient-fleet-spawner", daemon=True
                )
                self._thread.start()
        done: Future[_T] = Future()
        self._jobs.put((job, done))
        return done.result()

    def _work(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                done.set_result(job())
            except BaseException as exc:
                done.set_exception(exc)


_spawner = _Spawner()


class Replica:
    """One replica server process of a :class:`Fleet`, with its fault knobs.

    Knobs return once the child has applied them. Signal knobs: :meth:`kill` (SIGKILL),
    :meth:`restart`, :meth:`freeze` (SIGSTOP) and :meth:`thaw` (SIGCONT). Control knobs, which need
    a running, unfrozen process: :meth:`set_faults`, :meth:`go_down`, :meth:`go_up`,
    :meth:`set_markov`, :meth:`reset_counts`. :meth:`counts` works in every state: it is taken
    exactly at the moment of :meth:`freeze` or :meth:`kill` (the child stops serving before it
    reports), so a frozen replica returns the counts it froze with and a killed one keeps those of
    its past processes.

    Example::

        with rs.testing.Fleet(3, seed=1) as fleet:
            fleet[0].kill()                     # connections to fleet.urls[0] are refused
            fleet[1].set_faults(error_rate=0.5)  # half the answers are 503
            fleet[2].freeze()                   # accepts connections, never answers
            ...
            fleet[0].restart()                  # serves again on the same port
            assert fleet[1].counts().by_status.keys() <= {200, 503}
    """

    def __init__(
        self,
        *,
        index: int,
        host: str,
        port: int,
        seed: int,
        startup_timeout: float,
        control_timeout: float,
    ) -> None:
        self._index = index
        self._host = host
        self._port = port
        self._seed = seed
        self._startup_timeout = startup_timeout
        self._control_timeout = control_timeout
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._incarnation = -1
        self._frozen = False
        self._frozen_counts: Counts | None = None
        self._retired = Counts()  # the counts of processes killed before
        self._counts_lost = False
        self._faults: dict[str, float] = {}
        self._markov: tuple[float, float] | None = None
        self._inbox = bytearray()
        self._next_id = 0
        self._managed = False  # set while its fleet runs: processes start only then

    def __repr__(self) -> str:
        return f"<Replica {self._index} {self.url} {self.state}>"

    # identity

    @property
    def index(self) -> int:
        """The replica's position in its fleet."""
        return self._index

    @property
    def port(self) -> int:
        """The served port; the same across restarts."""
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``"http://127.0.0.1:41234"``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """The process id of the current (or last) process, ``None`` before the first start."""
        return self._pid

    @property
    def state(self) -> str:
        """``"running"``, ``"frozen"``, ``"killed"`` (also: exited on its own) or ``"new"``."""
        with self._lock:
            if self._proc is None:
                return "new" if self._incarnation < 0 else "killed"
            if self._proc.poll() is not None:
                return "killed"
            return "frozen" if self._frozen else "running"

    # signal knobs

    def kill(self) -> None:
        """SIGKILL the process and reap it: connections are refused from now on. Idempotent.

        The counts are snapshotted first (the child stops serving, reports, then is killed), so
        :meth:`counts` still includes every request this process received.
        """
        with self._lock:
            self._kill_locked()

    def restart(self) -> None:
        """Start a fresh process on the same port (killing the current one first, if any).

        Returns once the new process accepts connections. The last :meth:`set_faults` and
        :meth:`set_markov` settings are applied to it; it starts up (a :meth:`go_down` is not
        remembered). Raises :class:`PortInUseError` if another socket took the port meanwhile.
        """
        with self._lock:
            self._kill_locked()
            self._spawn()
            self._await_ready(time.monotonic() + self._startup_timeout)

    def freeze(self) -> None:
        """SIGSTOP the process: the kernel still completes TCP handshakes, nothing is answered.

        Idempotent. Raises :class:`ReplicaUnavailableError` if the replica is killed.
        """
        with self._lock:
            proc = self._require_process("freeze")
            if self._frozen:
                return
            try:
                wire = self._call_locked("pause", {}, timeout=min(self._control_timeout, 2.0))
                self._frozen_counts = Counts._from_wire(wire)
            except ReplicaUnavailableError:
                self._frozen_counts = None  # stopped anyway; counts unknown until thawed
            proc.send_signal(signal.SIGSTOP)
            self._frozen = True

    def thaw(self) -> None:
        """SIGCONT a frozen process and return once it serves again. No-op if not frozen."""
        with self._lock:
            proc = self._require_process("thaw")
            if not self._frozen:
                return
            proc.send_signal(signal.SIGCONT)
            self._frozen = False
            self._frozen_counts = None
            self._call_locked("resume", {}, timeout=self._control_timeout)

    # control knobs

    def set_faults(
        self,
        *,
        error_rate: float = 0.0,
        error_status: int = 503,
        latency: float = 0.0,
        slow_fraction: float = 0.0,
        slow_latency: float = 0.0,
    ) -> None:
        """Inject faults into every request but ``/health``; call with no arguments to clear.

        ``error_rate`` is the probability of answering ``error_status`` instead; ``latency``
        seconds are added to every answer, and a further ``slow_latency`` to a ``slow_fraction``
        of them. The random draws come from a generator seeded from the fleet seed.

        Example::

            fleet[1].set_faults(error_rate=0.2, latency=0.005, slow_fraction=0.01, slow_latency=1.0)
        """
        _check_fraction("error_rate", error_rate)
        _check_fraction("slow_fraction", slow_fraction)
        _check_seconds("latency", latency)
        _check_seconds("slow_latency", slow_latency)
        if isinstance(error_status, bool) or not isinstance(error_status, int):
            raise TypeError(f"error_status must be an int, got {error_status!r}")
        if not 200 <= error_status <= 599:
            raise ValueError(f"error_status must be in 200..599, got {error_status!r}")
        faults = {
            "error_rate": float(error_rate),
            "error_status": error_status,
            "latency": float(latency),
            "slow_fraction": float(slow_fraction),
            "slow_latency": float(slow_latency),
        }
        self._call("faults", {"faults": faults})
        self._faults = faults

    def go_down(self) -> None:
        """Stop listening (new connections are refused) and reset open connections (RST).

        The process keeps running, and its counts. Cancels :meth:`set_markov`.
        """
        self._call("down", {})
        self._markov = None

    def go_up(self) -> None:
        """Listen again on the same port. No-op if up. Cancels :meth:`set_markov`."""
        self._call("up", {})
        self._markov = None

    def set_markov(self, lam: float | None, mu: float | None = None) -> None:
        """Alternate up and down on its own: up ~Exp(lam) seconds, then down ~Exp(mu) seconds.

        ``lam`` is the failure rate and ``mu`` the repair rate (per second), as in the two-state
        availability model: the replica is up ``mu / (lam + mu)`` of the time. Durations are drawn
        from a generator seeded from the fleet seed and replica index. ``set_markov(None)`` stops
        alternating and brings the replica up.

        Example::

            fleet[0].set_markov(lam=0.5, mu=2.0)  # up ~2 s, down ~0.5 s, available 80 %
        """
        if lam is None:
            if mu is not None:
                raise ValueError("mu must be None when lam is None")
            self._call("markov", {"rates": None})
            self._markov = None
            return
        if mu is None:
            raise ValueError("mu is required with lam")
        for name, rate in (("lam", lam), ("mu", mu)):
            if not isinstance(rate, (int, float)) or not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"{name} must be a finite rate > 0 per second, got {rate!r}")
        self._call("markov", {"rates": [float(lam), float(mu)]})
        self._markov = (float(lam), float(mu))

    # counts

    def counts(self) -> Counts:
        """Exact counts of what this replica received (see :class:`Counts`), in any state.

        Raises :class:`ReplicaUnavailableError` only when they are unknown: the process did not
        answer when it was frozen or killed (until :meth:`reset_counts`).
        """
        with self._lock:
            if self._counts_lost:
                raise ReplicaUnavailableError(
                    f"replica {self._index}: the counts of a killed process were lost "
                    "(it did not answer before it was killed); reset_counts() to start over"
                )
            if self._proc is None or self._proc.poll() is not None:
                return self._retired
            if self._frozen:
                if self._frozen_counts is None:
                    raise ReplicaUnavailableError(
                        f"replica {self._index} is frozen and did not report its counts before; "
                        "thaw() it first"
                    )
                return self._retired + self._frozen_counts
            return self._retired + Counts._from_wire(self._call_locked("counts", {}))

    def reset_counts(self) -> None:
        """Zero the counts (also those kept from killed processes)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._require_running("reset_counts")
                self._call_locked("reset", {})
            self._retired = Counts()
            self._counts_lost = False

    # internals

    def _spawn(self) -> None:
        if not self._managed:
            raise FleetError(
                f"replica {self._index}: its fleet is not running (not started, or closed)"
            )
        self._incarnation += 1
        argv = [
            sys.executable,
            "-I",  # no user site, no PYTHON* variables, no script directory on sys.path
            "-S",  # nor site-packages: the replica needs the standard library only
            _REPLICA_SCRIPT,
            "--index",
            str(self._index),
            "--host",
            self._host,
            "--port",
            str(self._port),
            "--seed",
            str(self._seed),
            "--incarnation",
            str(self._incarnation),
            "--parent-pid",
            str(os.getpid()),
            "--faults",
            json.dumps(self._faults),
            "--markov",
            json.dumps(self._markov),
        ]
        proc = _spawner.run(
            lambda: subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        )
        self._proc = proc
        self._pid = proc.pid
        self._frozen = False
        self._frozen_counts = None
        self._inbox.clear()

    def _await_ready(self, deadline: float) -> None:
        try:
            message = self._receive(lambda m: "event" in m, deadline, "start")
        except BaseException:
            self._kill_locked(counted=False)
            raise
        if message["event"] == "ready":
            self._port = int(message["port"])
            return
        self._kill_locked(counted=False)
        text = f"replica {self._index}: {message.get('message', 'failed to start')}"
        if message.get("kind") == "port_in_use":
            raise PortInUseError(
                f"replica {self._index}: port {self._port} on {self._host} is already in use",
                port=self._port,
            )
        raise FleetError(text)

    def _kill_locked(self, *, counted: bool = True) -> None:
        """Kill and reap the process; keep its counts unless ``counted`` is false (not started)."""
        proc = self._proc
        if proc is None:
            return
        if not counted:
            proc.kill()
            proc.wait(timeout=_KILL_WAIT)
        elif proc.poll() is None:
            snapshot: Counts | None = None
            if self._frozen:
                snapshot = self._frozen_counts
            else:
                try:
                    wire = self._call_locked("pause", {}, timeout=min(self._control_timeout, 2.0))
                    snapshot = Counts._from_wire(wire)
                except ReplicaUnavailableError:
                    snapshot = None
            proc.kill()
            proc.wait(timeout=_KILL_WAIT)
            if snapshot is None:
                self._counts_lost = True
            else:
                self._retired = self._retired + snapshot
        else:
            self._counts_lost = True  # it exited on its own: whatever it counted is gone
        _close_pipes(proc)
        self._proc = None
        self._frozen = False
        self._frozen_counts = None

    def _require_process(self, op: str) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None:
            raise ReplicaUnavailableError(
                f"replica {self._index} is not running: cannot {op}(); restart() it first"
            )
        code = proc.poll()
        if code is not None:
            raise ReplicaUnavailableError(
                f"replica {self._index} exited on its own (code {code}): cannot {op}(); "
                "restart() it"
            )
        return proc

    def _require_running(self, op: str) -> None:
        self._require_process(op)
        if self._frozen:
            raise ReplicaUnavailableError(
                f"replica {self._index} is frozen: cannot {op}(); thaw() it first"
            )

    def _call(self, op: str, params: dict[str, Any]) -> Any:
        with self._lock:
            self._require_running(op)
            return self._call_locked(op, params, timeout=self._control_timeout)

    def _call_locked(self, op: str, params: dict[str, Any], *, timeout: float | None = None) -> Any:
        if timeout is None:
            timeout = self._control_timeout
        proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        self._next_id += 1
        ident = self._next_id
        line = json.dumps({"id": ident, "op": op, **params}).encode() + b"\n"
        try:
            proc.stdin.write(line)
        except OSError as exc:
            raise ReplicaUnavailableError(
                f"replica {self._index}: control channel closed ({exc})"
            ) from exc
        reply = self._receive(lambda m: m.get("id") == ident, time.monotonic() + timeout, op)
        if reply.get("ok"):
            return reply.get("result")
        message = f"replica {self._index}: {op} failed: {reply.get('message')}"
        if reply.get("kind") == "port_in_use":
            raise PortInUseError(
                f"replica {self._index}: port {self._port} on {self._host} is already in use",
                port=self._port,
            )
        raise FleetError(message)

    def _receive(
        self, wanted: Callable[[dict[str, Any]], bool], deadline: float, what: str
    ) -> dict[str, Any]:
        """Read control lines until a wanted one; replies to timed-out calls are dropped."""
        proc = self._proc
        assert proc is not None
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                newline = self._inbox.find(b"\n")
                if newline >= 0:
                    line = bytes(self._inbox[:newline])
                    del self._inbox[: newline + 1]
                    try:
                        message = json.loads(line)
                    except ValueError:
                        continue  # not ours: the child's control channel carries JSON only
                    if isinstance(message, dict) and wanted(message):
                        return message
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    if remaining > 0:
                        continue  # select() returned early without an event; recheck the time
                    raise ReplicaUnavailableError(
                        f"replica {self._index} did not answer {what!r} in time "
                        f"(pid {proc.pid}; frozen or overloaded?)"
                    )
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    code = proc.wait(timeout=_KILL_WAIT)
                    raise ReplicaUnavailableError(
                        f"replica {self._index} exited (code {code}) during {what!r}"
                    )
                self._inbox += chunk


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_seconds(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be finite seconds >= 0, got {value!r}")


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


def _shutdown(replicas: Sequence[Replica]) -> None:
    """Terminate every process, SIGKILL what is left after a grace period, and reap them all."""
    for replica in replicas:
        replica._managed = False
    procs = [r._proc for r in replicas if r._proc is not None]
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.terminate()
                proc.send_signal(signal.SIGCONT)  # a frozen process must run to die of SIGTERM
            except OSError:
                pass
    deadline = time.monotonic() + _TERMINATE_GRACE
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for replica in replicas:
        if replica._proc is not None:
            _close_pipes(replica._proc)
            replica._proc = None
            replica._frozen = False


class Fleet:
    """N replica HTTP servers, each a real process on a loopback port, with fault knobs.

    A context manager: entering starts the processes and waits until each accepts connections;
    leaving (also on an exception) terminates them, SIGKILLs any left after a short grace and reaps
    them. Children also die with the parent (Linux: ``PR_SET_PDEATHSIG``; everywhere: when their
    control pipe closes) and at interpreter exit. ``seed`` (random when ``None``; see
    :attr:`seed`) drives every random choice of the replicas: fault draws and Markov durations.

    ``ports`` gives each replica's port (a taken one raises :class:`PortInUseError` naming it); by
    default each replica gets a free port. ``control_timeout`` bounds every control call. POSIX
    only (the knobs are signals).

    Example::

        with rs.testing.Fleet(3, seed=7) as fleet:
            with httpx.Client() as client:
                assert client.get(fleet.urls[0] + "/x").json()["replica"] == 0
                fleet[1].set_faults(error_rate=1.0)
                assert client.get(fleet.urls[1] + "/x").status_code == 503
            assert fleet.total_requests() == 2
    """

    def __init__(
        self,
        n: int = 3,
        *,
        seed: int | None = None,
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        startup_timeout: float = 10.0,
        control_timeout: float = 5.0,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if ports is not None:
            ports = list(ports)
            if len(ports) != n:
                raise ValueError(f"ports must give {n} ports, got {len(ports)}")
            if len(set(ports)) != n or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
                raise ValueError(f"ports must be distinct ints in 1..65535, got {ports!r}")
        if not (math.isfinite(startup_timeout) and startup_timeout > 0):
            raise ValueError(f"startup_timeout must be > 0 seconds, got {startup_timeout!r}")
        if not (math.isfinite(control_timeout) and control_timeout > 0):
            raise ValueError(f"control_timeout must be > 0 seconds, got {control_timeout!r}")
        self._seed = secrets.randbits(32) if seed is None else int(seed)
        self._host = host
        self._startup_timeout = startup_timeout
        self._replicas = tuple(
            Replica(
                index=i,
                host=host,
                port=0 if ports is None else ports[i],
                seed=self._seed,
                startup_timeout=startup_timeout,
                control_timeout=control_timeout,
            )
            for i in range(n)
        )
        self._state = "new"
        self._finalizer: weakref.finalize[[Sequence[Replica]], Fleet] | None = None

    def __repr__(self) -> str:
        return f"<Fleet n={len(self._replicas)} seed={self._seed} {self._state}>"

    # lifecycle

    def start(self) -> Fleet:
        """Start every replica; return once all accept connections. ``with`` calls this."""
        if self._state != "new":
            raise FleetError(f"a fleet starts once; this one is {self._state}")
        self._state = "started"
        # Also called at interpreter exit, and if the fleet is garbage collected unclosed.
        self._finalizer = weakref.finalize(self, _shutdown, self._replicas)
        deadline = time.monotonic() + self._startup_timeout
        for replica in self._replicas:
            replica._managed = True
        try:
            for replica in self._replicas:
                with replica._lock:
                    replica._spawn()
            for replica in self._replicas:
                with replica._lock:
                    replica._await_ready(deadline)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every replica process (terminate, then SIGKILL after a grace) and reap it."""
        if self._finalizer is not None:
            self._finalizer()
        self._state = "closed"

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # access

    @property
    def seed(self) -> int:
        """The seed in use (chosen at random when none was given): pass it again to replay."""
        return self._seed

    @property
    def replicas(self) -> tuple[Replica, ...]:
        """The replica handles, in index order."""
        return self._replicas

    @property
    def urls(self) -> list[str]:
        """The base URL of each replica, e.g. ``["http://127.0.0.1:41234", ...]``."""
        self._require_started()
        return [replica.url for replica in self._replicas]

    @property
    def pids(self) -> list[int | None]:
        """The process id of each replica's current (or last) process."""
        return [replica.pid for replica in self._replicas]

    def __len__(self) -> int:
        return len(self._replicas)

    def __getitem__(self, index: int) -> Replica:
        return self._replicas[index]

    def __iter__(self) -> Iterator[Replica]:
        return iter(self._replicas)

    # counts

    def counts(self) -> FleetCounts:
        """Every replica's :meth:`Replica.counts` (``.replicas``) and their sum."""
        self._require_started()
        per_replica = tuple(replica.counts() for replica in self._replicas)
        total = Counts()
        for counts in per_replica:
            total = total + counts
        return FleetCounts(
            total=total.total,
            by_method=total.by_method,
            by_key=total.by_key,
            by_status=total.by_status,
            truncated_bodies=total.truncated_bodies,
            health_checks=total.health_checks,
            replicas=per_replica,
        )

    def total_requests(self) -> int:
        """The number of requests (``/health`` aside) all replicas received."""
        return self.counts().total

    def reset_counts(self) -> None:
        """Zero the counts of every replica."""
        self._require_started()
        for replica in self._replicas:
            replica.reset_counts()

    def _require_started(self) -> None:
        if self._state != "started":
            raise FleetError(
                "the fleet is not running: use `with Fleet(...) as fleet:` or fleet.start()"
                if self._state == "new"
                else "the fleet is closed"
            )
