"""The replica server program that :class:`resilient.testing.Fleet` runs in each child process.

Standard library only, so it starts fast and never depends on the rest of the package: the fleet
runs it by file path (``python -I -S .../_replica.py``); ``python -m resilient.testing._replica``
works too. An asyncio HTTP/1.1 server (keep-alive, pipelining, ``Content-Length`` and chunked
request bodies, ``HEAD``) that answers every request with a small JSON document and takes
per-request controls in the query string (``status``, ``retry_after``, ``delay``, ``body_bytes``).

The parent drives it over a private control channel (the child's stdin and stdout, one JSON object a
line), never over the served port, so request counts stay exact. Startup reports one line,
``{"event": "ready", "port": P, "pid": N}`` or ``{"event": "error", "kind": ..., "message": ...}``;
afterwards each command ``{"id": n, "op": ...}`` gets exactly one reply ``{"id": n, "ok": true,
"result": ...}`` or ``{"id": n, "ok": false, "kind": ..., "message": ...}``, sent only once the
command has taken effect. A thread reads the commands so that ``pause`` can block the event loop
itself: the loop takes a snapshot of the counts and then serves nothing until ``resume``, which
makes the snapshot exact when the parent then stops (SIGSTOP) or kills (SIGKILL) the process.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ctypes
import errno
import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import sys
import threading
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = ["derive_seed", "main"]

_MAX_HEAD = 64 * 1024
_MAX_CHUNK_LINE = 4096
_MAX_BODY_BYTES = 64 * 1024 * 1024
_MAX_DELAY = 600.0
_READ_PAUSE_BYTES = 1024 * 1024
_BACKLOG = 1024
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REASONS = {status.value: status.phrase for status in HTTPStatus}

# Connection states. Anything from _BODY on means a request head arrived and its body has not.
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _CLOSED = range(7)


def derive_seed(seed: int, index: int, incarnation: int, stream: str) -> int:
    """A 64-bit seed for one random stream of one replica process, derived from the fleet seed."""
    digest = hashlib.sha256(f"{seed}:{index}:{incarnation}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class _BadRequest(Exception):
    pass


class _Request:
    __slots__ = (
        "body_len",
        "chunked",
        "content_length",
        "expect_continue",
        "headers",
        "keep_alive",
        "key",
        "method",
        "path",
        "query",
    )

    def __init__(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
            raise _BadRequest("bad request line")
        version = parts[2]
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise _BadRequest("unsupported version")
        self.method = parts[0].decode("ascii")
        target = parts[1].decode("latin-1")
        if target.startswith(("http://", "https://")):
            try:
                split = urlsplit(target)
            except ValueError:  # e.g. "http://[/x": an unclosed IPv6 literal
                raise _BadRequest("bad request target") from None
            target = (split.path or "/") + ("?" + split.query if split.query else "")
        self.path, _, self.query = target.partition("?")

        self.headers: list[tuple[str, str]] = []
        content_lengths: set[str] = set()
        transfer_encoding = ""
        connection = ""
        key = request_id = None
        expect = ""
        for line in lines[1:]:
            name, sep, raw_value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):
                raise _BadRequest("bad header line")
            lname = name.decode("ascii").lower()
            value = raw_value.strip(b" \t").decode("latin-1")
            self.headers.append((lname, value))
            if lname == "content-length":
                content_lengths.add(value)
            elif lname == "transfer-encoding":
                transfer_encoding += "," + value.lower()
            elif lname == "connection":
                connection += "," + value.lower()
            elif lname == "idempotency-key":
                key = value
            elif lname == "x-request-id":
                request_id = value
            elif lname == "expect":
                expect = value.lower()

        self.key = key if key is not None else request_id
        tokens = {t.strip() for t in connection.split(",")}
        http11 = version == b"HTTP/1.1"
        self.keep_alive = "close" not in tokens if http11 else "keep-alive" in tokens
        self.chunked = False
        self.content_length = 0
        if transfer_encoding:
            codings = [t.strip() for t in transfer_encoding.split(",") if t.strip()]
            if not codings or codings[-1] != "chunked":
                raise _BadRequest("unsupported transfer-encoding")
            self.chunked = True
            self.keep_alive = self.keep_alive and not content_lengths  # RFC 9112 6.1: smuggling
        elif content_lengths:
            if len(content_lengths) != 1:
                raise _BadRequest("conflicting content-length")
            text = content_lengths.pop()
            if not (text.isascii() and text.isdigit()) or len(text) > 15:  # (not "\xb2")
                raise _BadRequest("bad content-length")
            self.content_length = int(text)
        self.expect_continue = http11 and expect == "100-continue"
        self.body_len = 0


class _Faults:
    __slots__ = ("error_rate", "error_status", "latency", "slow_fraction", "slow_latency")

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        spec = spec or {}
        self.error_rate = float(spec.get("error_rate", 0.0))
        self.error_status = int(spec.get("error_status", 503))
        self.latency = float(spec.get("latency", 0.0))
        self.slow_fraction = float(spec.get("slow_fraction", 0.0))
        self.slow_latency = float(spec.get("slow_latency", 0.0))


class _Counts:
    __slots__ = ("by_key", "by_method", "by_status", "health_checks", "total", "truncated_bodies")

    def __init__(self) -> None:
        self.total = 0
        self.by_method: dict[str, int] = {}
        self.by_key: dict[str, int] = {}
        self.by_status: dict[int, int] = {}
        self.truncated_bodies = 0
        self.health_checks = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_method": dict(self.by_method),
            "by_key": dict(self.by_key),
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "truncated_bodies": self.truncated_bodies,
            "health_checks": self.health_checks,
        }


def _response(
    status: int,
    body: bytes,
    *,
    content_type: str,
    keep_alive: bool,
    head_only: bool,
    index: int,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", f"X-Replica: {index}"]
    if status not in (204, 304):
        lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(f"{name}: {value}" for name, value in extra)
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if head_only or status in (204, 304):
        return head
    return head + body


class _Connection(asyncio.Protocol):
    """One client connection: parses requests in order and answers them one at a time."""

    def __init__(self, server: _Server, generation: int) -> None:
        self.server = server
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = _HEAD
        self.request: _Request | None = None
        self.remaining = 0
        self.busy = False  # a delayed response is pending; later requests wait their turn
        self.read_paused = False
        self.write_paused = False
        self.eof = False
        self.timer: asyncio.TimerHandle | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.generation != self.server.generation:
            # Accepted just before the replica went down (the transport is made a little after
            # accept()): a down replica serves nothing.
            self.reset()
            return
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.state == _CLOSED:
            return
        self.buf += data
        if self.busy or self.write_paused:
            if len(self.buf) > _READ_PAUSE_BYTES and not self.read_paused and self.transport:
                self.transport.pause_reading()
                self.read_paused = True
            return
        self._process()

    def eof_received(self) -> bool:
        self.eof = True
        if not self.busy and not self.write_paused:
            self._process()
        return True  # keep the transport: a pending delayed response is still sent

    def connection_lost(self, exc: Exception | None) -> None:
        if _BODY <= self.state < _CLOSED:
            self.server.counts.truncated_bodies += 1
        self.state = _CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.connections.discard(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.busy:
            self._process()
            self._resume_reading()

    def _resume_reading(self) -> None:
        """Read again once nothing holds the connection back: reading paused with a full buffer
        while an answer was delayed or the peer read slowly, and only this starts it again."""
        if (
            self.read_paused
            and self.transport is not None
            and self.state != _CLOSED
            and not self.busy
            and not self.write_paused
            and len(self.buf) <= _READ_PAUSE_BYTES
        ):
            self.read_paused = False
            self.transport.resume_reading()

    # request parsing

    def _process(self) -> None:
        try:
            self._parse()
        except Exception:  # _BadRequest, or input the parser did not foresee: a 400 either way
            self._reject()
            return
        transport = self.transport
        idle = not self.busy and not self.write_paused
        if self.eof and idle and transport is not None and not transport.is_closing():
            # The peer sent all it will. The state is kept as it is, so that connection_lost
            # counts a request whose body was cut short.
            transport.close()

    def _parse(self) -> None:
        buf = self.buf
        while not self.busy and not self.write_paused and self.state != _CLOSED:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        raise _BadRequest("head too large")
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                if not head:
                    continue  # tolerate a stray blank line between requests
                request = _Request(head)
                self.request = request
                if request.chunked:
                    self.state = _CHUNK_SIZE
                elif request.content_length:
                    self.state = _BODY
                    self.remaining = request.content_length
                else:
                    self._dispatch(request)
                    continue
                if request.expect_continue and self.transport is not None:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif state in (_BODY, _CHUNK_DATA):
                if not buf:
                    return
                n = min(len(buf), self.remaining)
                del buf[:n]
                self.remaining -= n
                assert self.request is not None
                self.request.body_len += n
                if self.remaining:
                    return
                if state == _BODY:
                    self._dispatch(self.request)
                else:
                    self.state = _CHUNK_CRLF
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_CHUNK_LINE:
                        raise _BadRequest("chunk size line too long")
                    return
                text = bytes(buf[:end]).partition(b";")[0].strip(b" \t")
                del buf[: end + 2]
                try:
                    size = int(text, 16)
                except ValueError:
                    raise _BadRequest("bad chunk size") from None
                if size < 0 or text[:1] in (b"+", b"-") or len(text) > 15:
                    raise _BadRequest("bad chunk size")
                if size == 0:
                    self.state = _TRAILERS
                else:
                    self.state = _CHUNK_DATA
                    self.remaining = size
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise _BadRequest("missing CRLF after chunk")
                del buf[:2]
                self.state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        raise _BadRequest("trailers too large")
                    return
                del buf[: end + 2]
                if end == 0:
                    assert self.request is not None
                    self._dispatch(self.request)

    def _reject(self) -> None:
        self.state = _CLOSED
        self.buf.clear()
        if self.transport is not None and not self.transport.is_closing():
            body = b'{"error":"bad request"}'
            self.transport.write(
                _response(
                    400,
                    body,
                    content_type="application/json",
                    keep_alive=False,
                    head_only=False,
                    index=self.server.index,
                )
            )
            self.transport.close()

    # answering

    def _dispatch(self, request: _Request) -> None:
        self.state = _HEAD
        self.request = None
        data, keep_alive, delay = self.server.answer(request)
        if delay > 0:
            self.busy = True
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(delay, self._send_delayed, data, keep_alive)
        else:
            self._send(data, keep_alive)

    def _send(self, data: bytes, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.state = _CLOSED
            return
        transport.write(data)
        if not keep_alive:
            self.state = _CLOSED
            transport.close()

    def _send_delayed(self, data: bytes, keep_alive: bool) -> None:
        self.timer = None
        self.busy = False
        self._send(data, keep_alive)
        if self.state != _CLOSED:
            self._process()
        self._resume_reading()

    def reset(self) -> None:
        """Abort with SO_LINGER 0, so the peer sees a reset rather than an orderly close."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        transport.abort()


class _Server:
    """One replica: the listening socket, its connections, the counts and the fault knobs."""

    def __init__(self, *, index: int, host: str, port: int, seed: int, incarnation: int) -> None:
        self.index = index
        self.host = host
        self.port = port
        self.counts = _Counts()
        self.faults = _Faults()
        self.fault_rng = random.Random(derive_seed(seed, index, incarnation, "faults"))
        self.markov_rng = random.Random(derive_seed(seed, index, incarnation, "markov"))
        self.markov: tuple[float, float] | None = None
        self.markov_timer: asyncio.TimerHandle | None = None
        self.listener: socket.socket | None = None
        self.accepting: set[asyncio.Task[Any]] = set()
        self.generation = 0  # bumped by go_down, so late-made connections of old listeners reset
        self.connections: set[_Connection] = set()
        self.resume = threading.Event()

    # serving

    def answer(self, request: _Request) -> tuple[bytes, bool, float]:
        """Count a fully received request; return the response bytes, keep-alive and delay."""
        method = request.method
        head_only = method == "HEAD"
        keep_alive = request.keep_alive
        if request.path == "/health" and method in ("GET", "HEAD"):
            self.counts.health_checks += 1
            data = _response(
                200,
                b"ok",
                content_type="text/plain",
                keep_alive=keep_alive,
                head_only=head_only,
                index=self.index,
            )
            return data, keep_alive, 0.0

        counts = self.counts
        counts.total += 1
        counts.by_method[method] = counts.by_method.get(method, 0) + 1
        if request.key is not None:
            counts.by_key[request.key] = counts.by_key.get(request.key, 0) + 1

        status = 200
        delay = 0.0
        body_bytes: int | None = None
        extra: tuple[tuple[str, str], ...] = ()
        if request.query:
            try:
                status, delay, body_bytes, extra = _controls(request.query)
            except ValueError as exc:
                counts.by_status[400] = counts.by_status.get(400, 0) + 1
                body = json.dumps({"replica": self.index, "error": str(exc)}).encode()
                data = _response(
                    400,
                    body,
                    content_type="application/json",
                    keep_alive=keep_alive,
                    head_only=head_only,
                    index=self.index,
                )
                return data, keep_alive, 0.0

        faults = self.faults
        if faults.error_rate > 0.0 and self.fault_rng.random() < faults.error_rate:
            status = faults.error_status
        delay += faults.latency
        if faults.slow_fraction > 0.0 and self.fault_rng.random() < faults.slow_fraction:
            delay += faults.slow_latency
        counts.by_status[status] = counts.by_status.get(status, 0) + 1

        if request.path == "/echo-headers":
            echoed: dict[str, str] = {}
            for name, value in request.headers:
                echoed[name] = f"{echoed[name]}, {value}" if name in echoed else value
            body = json.dumps(echoed).encode()
        else:
            body = json.dumps(
                {
                    "replica": self.index,
                    # HEAD describes the GET response, so it reports the same Content-Length
                    "method": "GET" if head_only else method,
                    "path": request.path,
                    "body_bytes": request.body_len,
                },
                separators=(",", ":"),
            ).encode()
        content_type = "application/json"
        if body_bytes is not None:
            if body_bytes >= len(body):
                body += b" " * (body_bytes - len(body))
            else:
                body = b"x" * body_bytes
                content_type = "text/plain"
        data = _response(
            status,
            body,
            content_type=content_type,
            keep_alive=keep_alive,
            head_only=head_only,
            index=self.index,
            extra=extra,
        )
        return data, keep_alive, delay

    # up and down

    @property
    def up(self) -> bool:
        return self.listener is not None

    # Our own accept loop rather than asyncio.Server: a Server closed between accept() and the
    # making of the transport fails an assertion and leaks the accepted socket, still open.

    async def go_up(self) -> None:
        if self.listener is not None:
            return
        sock = _listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock, self.generation)

    def go_down(self) -> None:
        self.generation += 1
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self.listener.close()  # new connections are refused from now on
            self.listener = None
        for connection in list(self.connections):
            connection.reset()

    def _accept(self, sock: socket.socket, generation: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(_BACKLOG):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                # Out of descriptors or memory: stop accepting for a moment, as asyncio does.
                print(f"replica {self.index}: accept failed: {exc}", file=sys.stderr)
                loop.remove_reader(sock.fileno())
                loop.call_later(1.0, self._resume_accepting, sock, generation)
                return
            task = loop.create_task(
                loop.connect_accepted_socket(lambda: _Connection(self, generation), conn)
            )
            self.accepting.add(task)
            task.add_done_callback(self._accepted)

    def _resume_accepting(self, sock: socket.socket, generation: int) -> None:
        if self.listener is sock:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock, generation)

    def _accepted(self, task: asyncio.Task[Any]) -> None:
        self.accepting.discard(task)
        if not task.cancelled():
            task.exception()  # a connection reset before it was made: nothing to do

    # the Markov up/down process

    def set_markov(self, rates: tuple[float, float] | None) -> None:
        self.cancel_markov()
        self.markov = rates
        if rates is not None:
            self._schedule_markov()

    def cancel_markov(self) -> None:
        self.markov = None
        if self.markov_timer is not None:
            self.markov_timer.cancel()
            self.markov_timer = None

    def _schedule_markov(self) -> None:
        assert self.markov is not None
        lam, mu = self.markov
        duration = self.markov_rng.expovariate(lam if self.up else mu)
        loop = asyncio.get_running_loop()
        self.markov_timer = loop.call_later(duration, self._markov_flip)

    def _markov_flip(self) -> None:
        self.markov_timer = None
        if self.markov is None:
            return
        if self.up:
            self.go_down()
            self._schedule_markov()
        else:
            asyncio.get_running_loop().create_task(self._markov_up())

    async def _markov_up(self) -> None:
        try:
            await self.go_up()
        except OSError as exc:  # someone took the port meanwhile: stay down, try again later
            print(f"replica {self.index}: cannot listen again: {exc}", file=sys.stderr)
        if self.markov is not None and self.markov_timer is None:
            self._schedule_markov()

    # control

    async def control(self, op: str, command: dict[str, Any]) -> object:
        if op == "ping":
            return None
        if op == "counts":
            return self.counts.snapshot()
        if op == "reset":
            self.counts = _Counts()
            return None
        if op == "faults":
            self.faults = _Faults(command["faults"])
            return None
        if op == "down":
            self.cancel_markov()
            self.go_down()
            await asyncio.sleep(0)  # let the aborted transports close (and send RST) first
            return None
        if op == "up":
            self.cancel_markov()
            await self.go_up()
            return None
        if op == "markov":
            rates = command["rates"]
            if rates is None:
                self.cancel_markov()
                await self.go_up()
            else:
                self.set_markov((float(rates[0]), float(rates[1])))
            return None
        raise ValueError(f"unknown op {op!r}")

    def pause(self, done: concurrent.futures.Future[dict[str, Any]]) -> None:
        """Runs on the event loop: snapshot the counts, then block the loop until resumed."""
        self.resume.clear()
        done.set_result(self.counts.snapshot())
        self.resume.wait()


def _controls(query: str) -> tuple[int, float, int | None, tuple[tuple[str, str], ...]]:
    status = 200
    delay = 0.0
    body_bytes: int | None = None
    extra: tuple[tuple[str, str], ...] = ()
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "status":
            status = int(value)
            if not 200 <= status <= 599:
                raise ValueError(f"status must be in 200..599, got {value!r}")
        elif name == "retry_after":
            if not value.isascii() or any(c in value for c in "\r\n\0"):
                raise ValueError(f"retry_after must be ASCII without line breaks, got {value!r}")
            extra = (("Retry-After", value),)
        elif name == "delay":
            delay = float(value)
            if not 0.0 <= delay <= _MAX_DELAY:
                raise ValueError(f"delay must be in 0..{_MAX_DELAY:g} seconds, got {value!r}")
        elif name == "body_bytes":
            body_bytes = int(value)
            if not 0 <= body_bytes <= _MAX_BODY_BYTES:
                raise ValueError(f"body_bytes must be in 0..{_MAX_BODY_BYTES}, got {value!r}")
    return status, delay, body_bytes, extra


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted replica bind its old port while connections of the last one linger in
        # TIME_WAIT; a port another socket listens on still fails with EADDRINUSE.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _send_line(fd: int, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return "port_in_use"
    return "error"


def _control_loop(
    loop: asyncio.AbstractEventLoop, server: _Server, control_in: int, control_out: int
) -> None:
    with os.fdopen(control_in, "rb") as commands:
        for line in commands:
            ident = None
            try:
                command = json.loads(line)
                ident = command.get("id")
                op = command.get("op", "")
                result: object
                if op == "pause":
                    done: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
                    loop.call_soon_threadsafe(server.pause, done)
                    result = done.result()
                elif op == "resume":
                    server.resume.set()
                    result = None
                else:
                    result = asyncio.run_coroutine_threadsafe(
                        server.control(op, command), loop
                    ).result()
                reply: dict[str, Any] = {"id": ident, "ok": True, "result": result}
            except Exception as exc:
                reply = {"id": ident, "ok": False, "kind": _error_kind(exc), "message": str(exc)}
            _send_line(control_out, reply)
    os._exit(0)  # the parent closed the channel (it exited or closed the fleet): go too


def _die_with_parent(parent_pid: int) -> None:
    """Linux only: have the kernel SIGKILL this process when the parent (thread) goes away."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


async def _serve(args: argparse.Namespace, control_in: int, control_out: int) -> int:
    server = _Server(
        index=args.index,
        host=args.host,
        port=args.port,
        seed=args.seed,
        incarnation=args.incarnation,
    )
    server.faults = _Faults(json.loads(args.faults))
    try:
        await server.go_up()
    except OSError as exc:
        message = f"cannot listen on {args.host}:{args.port}: {exc}"
        _send_line(control_out, {"event": "error", "kind": _error_kind(exc), "message": message})
        return 3
    markov = json.loads(args.markov)
    if markov is not None:
        server.set_markov((float(markov[0]), float(markov[1])))
    _send_line(control_out, {"event": "ready", "port": server.port, "pid": os.getpid()})
    loop = asyncio.get_running_loop()
    threading.Thread(
        target=_control_loop,
        args=(loop, server, control_in, control_out),
        name="control",
        daemon=True,
    ).start()
    await loop.create_future()  # serve until killed or the control channel closes
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--incarnation", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--faults", default="{}", help="JSON object of fault settings")
    parser.add_argument("--markov", default="null", help="JSON [lam, mu] or null")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which cleans up
    # Move the control channel off fds 0 and 1, so a stray print() cannot corrupt it.
    control_in, control_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return asyncio.run(_serve(args, control_in, control_out))


if __name__ == "__main__":
    sys.exit(main())
