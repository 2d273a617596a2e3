"""A real standalone ZooKeeper for the discovery tests.

The server is Apache ZooKeeper's own ``ZooKeeperServerMain`` run by ``java`` on a free loopback
port with a generated ``zoo.cfg``; the classpath is ``$RESILIENT_ZOOKEEPER_CLASSPATH``, else
Debian's ``/usr/share/java/zookeeper.jar`` (its manifest names its dependencies), else
``$ZOOKEEPER_HOME/lib/*`` of an Apache release. When it cannot start, the tests that need it are
skipped — or fail, when ``RESILIENT_REQUIRE_SERVERS`` is set (CI).

``zookeeper_server`` (one per session) serves tests that only read and write nodes, each under a
path of its own; ``restartable_zookeeper`` is a fresh server per test that may be stopped and
started again on the same port and data directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_servers

_MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"
_JVM_OPTIONS = [
    "-XX:TieredStopAtLevel=1",  # starts in ~0.3 s instead of ~1 s
    "-XX:+UseSerialGC",
    "-Xmx256m",
    "-Djava.net.preferIPv4Stack=true",
    "-Dzookeeper.admin.enableServer=false",
    # Restarting on a data dir that has transaction logs but no snapshot is then allowed.
    "-Dzookeeper.snapshot.trust.empty=true",
]


def _classpath() -> str | None:
    explicit = os.environ.get("RESILIENT_ZOOKEEPER_CLASSPATH")
    if explicit:
        return explicit
    debian = Path("/usr/share/java/zookeeper.jar")
    if debian.is_file():
        return str(debian)
    for home in (os.environ.get("ZOOKEEPER_HOME"), "/opt/zookeeper"):
        if home and any(Path(home, "lib").glob("zookeeper-*.jar")):
            return str(Path(home, "lib", "*"))
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _four_letters(port: int, word: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        s.sendall(word)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


class ZooKeeperServer:
    """One standalone ZooKeeper process on 127.0.0.1, its files under ``workdir``.

    Example::

        server = ZooKeeperServer(tmp_path)
        server.start()
        KazooClient(server.hosts)
        server.stop()  # and server.start() again: same port, same data
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "zoo.cfg"
        self.config.write_text(
            "\n".join(
                [
                    "tickTime=250",
                    f"dataDir={self.data_dir}",
                    f"clientPort={self.port}",
                    "clientPortAddress=127.0.0.1",
                    "minSessionTimeout=1000",
                    "maxSessionTimeout=60000",
                    "maxClientCnxns=0",
                    "admin.enableServer=false",
                    "4lw.commands.whitelist=ruok,srvr,stat",
                    "preAllocSize=1024",
                    "forceSync=no",
                    "",
                ]
            )
        )
        self.log = workdir / "zookeeper.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        """The kazoo ``hosts`` string for this server."""
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The java command line that runs this server (raises RuntimeError when unavailable)."""
        java = os.environ.get("JAVA") or shutil.which("java")
        classpath = _classpath()
        if java is None or classpath is None:
            raise RuntimeError(
                "ZooKeeper needs java and its jars (Debian: apt-get install zookeeper; "
                "or set ZOOKEEPER_HOME or RESILIENT_ZOOKEEPER_CLASSPATH)"
            )
        return [java, *_JVM_OPTIONS, "-cp", classpath, _MAIN, str(self.config)]

    def start(self, timeout: float = 30.0) -> None:
        """Start the server; return once it serves requests."""
        assert self._process is None, "already running"
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise RuntimeError(f"ZooKeeper exited with {code}: {self._log_tail()}")
            try:
                if b"Mode: standalone" in _four_letters(self.port, b"srvr"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"ZooKeeper did not answer within {timeout} s: {self._log_tail()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); its data stays."""
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def _started(workdir: Path) -> ZooKeeperServer:
    server = ZooKeeperServer(workdir)
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        message = f"cannot start a ZooKeeper server: {exc}"
        if require_servers():
            pytest.fail(message)
        pytest.skip(message)
    return server


@pytest.fixture(scope="session")
def zookeeper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    """A ZooKeeper shared by the session: give each test a path of its own."""
    server = _started(tmp_path_factory.mktemp("zookeeper"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def restartable_zookeeper(tmp_path: Path) -> Iterator[ZooKeeperServer]:
    """A ZooKeeper for this test alone, which it may ``stop()`` and ``start()`` again."""
    server = _started(tmp_path / "zookeeper")
    try:
        yield server
    finally:
        server.stop()
