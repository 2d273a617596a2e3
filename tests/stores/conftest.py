"""A real ``redis-server`` on a free loopback port, started and killed by the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

from tests.conftest import require_servers

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server --port N --save '' --appendonly no``; ``kill`` is SIGKILL."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 5.0) -> None:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.ping():
                return
            time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                answer = sock.recv(64)
        except OSError:
            return False
        # -NOAUTH: up, but a password is set
        return answer.startswith((b"+PONG", b"-NOAUTH"))

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """SIGSTOP for the body: connections are accepted and nothing is answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _available() -> bool:
    if os.path.exists(REDIS_SERVER):
        return True
    if require_servers():
        pytest.fail(f"redis-server not found at {REDIS_SERVER} (RESILIENT_REQUIRE_SERVERS is set)")
    return False


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server shared by a module's tests (each test uses its own key prefix)."""
    if not _available():
        pytest.skip("redis-server is not installed")
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for one test, which may kill and restart it (same port)."""
    if not _available():
        pytest.skip("redis-server is not installed")
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own, so tests sharing a server never see each other's keys."""
    return f"t:{request.node.name}:{time.monotonic_ns()}:"


@pytest.fixture(autouse=True)
def _close_stores(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every store a test builds, so no socket is left for the garbage collector."""
    from resilient.stores import RedisStore

    made: list[RedisStore] = []
    original = RedisStore.__init__

    def init(self: RedisStore, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(RedisStore, "__init__", init)
    yield
    for store in made:
        store.close()


@contextlib.asynccontextmanager
async def loop_ticks() -> AsyncIterator[list[int]]:
    """Counts, in the list yielded, the 10 ms ticks another task made while the body ran: how
    long the event loop was free to run it."""
    ticks = [0]

    async def ticker() -> None:
        while True:
            await anyio.sleep(0.01)
            ticks[0] += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        yield ticks
        tg.cancel_scope.cancel()
