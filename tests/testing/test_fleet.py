from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from resilient.testing.fleet import (
    Counts,
    Fleet,
    FleetError,
    PortInUseError,
    ReplicaUnavailableError,
)

pytestmark = pytest.mark.slow

FROZEN_TIMEOUT = httpx.Timeout(5.0, read=0.3)


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    with Fleet(2, seed=1234) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as c:
        yield c


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


def gone(pid: int) -> bool:
    """True once no process (not even a zombie) has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is dead too
    except (OSError, IndexError):
        return True


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; return everything received until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


# serving


def test_default_response_health_head_and_echo(fleet: Fleet, client: httpx.Client) -> None:
    assert len(fleet) == 2
    assert [r.index for r in fleet] == [0, 1]
    assert len(set(fleet.urls)) == 2
    assert all(url.startswith("http://127.0.0.1:") for url in fleet.urls)
    assert fleet[1].url == fleet.urls[1]

    response = client.post(fleet.urls[1] + "/orders/7", content=b"x" * 1000)
    assert response.status_code == 200
    assert response.headers["x-replica"] == "1"
    assert response.json() == {
        "replica": 1,
        "method": "POST",
        "path": "/orders/7",
        "body_bytes": 1000,
    }

    head = client.head(fleet.urls[0] + "/x")
    get = client.get(fleet.urls[0] + "/x")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))

    health = client.get(fleet.urls[0] + "/health")
    assert (health.status_code, health.text) == (200, "ok")

    echoed = client.get(fleet.urls[0] + "/echo-headers", headers={"X-Trace": "abc"}).json()
    assert echoed["x-trace"] == "abc"
    assert echoed["host"] == fleet.urls[0].removeprefix("http://")


def test_chunked_body_and_pipelining(fleet: Fleet, client: httpx.Client) -> None:
    response = client.put(fleet.urls[0] + "/up", content=iter([b"abc", b"", b"defgh", b"i" * 5000]))
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.json()["body_bytes"] == 5008

    two = (
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n0\r\nTrailer: t\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    received = raw_exchange(fleet[0].port, two)
    assert received.count(b"HTTP/1.1 200 OK") == 3
    assert b'"path":"/a"' in received
    assert b'"method":"POST","path":"/b","body_bytes":3' in received
    assert received.index(b"/a") < received.index(b"/b") < received.index(b"/c")


def test_query_controls(fleet: Fleet, client: httpx.Client) -> None:
    url = fleet.urls[0] + "/q"
    response = client.get(url, params={"status": "503", "retry_after": "1.5"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1.5"
    assert client.get(url, params={"status": "429"}).status_code == 429

    started = time.monotonic()
    assert client.get(url, params={"delay": "0.3"}).status_code == 200
    assert time.monotonic() - started >= 0.3

    assert len(client.get(url, params={"body_bytes": "5000"}).content) == 5000
    assert client.get(url, params={"body_bytes": "3"}).content == b"xxx"
    assert client.get(url, params={"status": "abc"}).status_code == 400
    assert client.get(url, params={"delay": "-1"}).status_code == 400
    assert client.get(url, params={"status": "700"}).status_code == 400


def test_malformed_input_closes_the_connection_and_the_server_survives(fleet: Fleet) -> None:
    port = fleet[0].port
    bad = [
        b"NONSENSE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY",
        b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000,
        b"\x00\xff\xfe garbage \r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",  # a digit to str.isdigit, not to int
        b"GET http://[/x HTTP/1.1\r\n\r\n",  # an unclosed IPv6 literal
    ]
    for data in bad:
        received = raw_exchange(port, data)
        assert received.startswith(b"HTTP/1.1 400 "), data
        assert b"Connection: close" in received
    ok = raw_exchange(port, b"GET /fine HTTP/1.0\r\n\r\n")  # HTTP/1.0: closes after answering
    assert ok.startswith(b"HTTP/1.1 200 OK")
    assert fleet[0].counts().total == 1


def test_a_control_that_cannot_be_sent_is_refused_and_counted_as_refused(
    fleet: Fleet, client: httpx.Client
) -> None:
    response = client.get(fleet.urls[0] + "/x?retry_after=%E2%82%AC")  # a header value in UTF-8
    assert response.status_code == 400
    assert fleet[0].counts().by_status == {400: 1}


def test_a_pipelined_request_behind_a_slowly_read_answer_is_answered(fleet: Fleet) -> None:
    # The first answer (8 MB) is not read for a while: the server stops writing, then stops
    # reading the second request's 2 MiB body. Once the first answer is read, it must read
    # again (it did only after a delayed answer, so the second request hung for good).
    body = b"x" * (2 * 1024 * 1024)
    head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", fleet[0].port), timeout=10.0) as sock:
        sock.sendall(b"GET /big?body_bytes=8000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        sender = threading.Thread(target=sock.sendall, args=(head + body,), daemon=True)
        sender.start()
        received = bytearray()
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
            chunk = sock.recv(1 << 20)
            assert chunk, "the server closed the connection"
            received += chunk
        sender.join(timeout=10.0)
    assert fleet[0].counts().by_method == {"GET": 1, "POST": 1}


# counts


def test_counts_are_exact(fleet: Fleet, client: httpx.Client) -> None:
    url = fleet.urls[0]
    for i in range(37):
        client.get(f"{url}/item/{i}")
    for i in range(5):
        client.post(f"{url}/pay", json={"n": i}, headers={"Idempotency-Key": f"key-{i}"})
    client.delete(f"{url}/item/1", headers={"X-Request-Id": "req-1"})
    client.post(f"{url}/pay", headers={"Idempotency-Key": "key-0"})  # a duplicate POST
    client.get(f"{url}/health")  # health checks are counted apart
    client.get(f"{fleet.urls[1]}/other", headers={"Idempotency-Key": "key-0"})

    counts = fleet[0].counts()
    assert counts.total == 44
    assert counts.by_method == {"GET": 37, "POST": 6, "DELETE": 1}
    assert counts.by_key == {"key-0": 2, "key-1": 1, "key-2": 1, "key-3": 1, "key-4": 1, "req-1": 1}
    assert counts.by_status == {200: 44}
    assert counts.truncated_bodies == 0
    assert counts.health_checks == 1

    everything = fleet.counts()
    assert everything.replicas == (counts, fleet[1].counts())
    assert everything.total == fleet.total_requests() == 45
    assert everything.by_key["key-0"] == 3
    assert everything.by_method == {"GET": 38, "POST": 6, "DELETE": 1}

    fleet.reset_counts()
    assert fleet.counts().total == 0
    assert fleet[0].counts() == Counts()


def test_truncated_bodies_are_counted(fleet: Fleet) -> None:
    cut_short = [
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly this",
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ]
    for data in cut_short:
        with socket.create_connection(("127.0.0.1", fleet[0].port), timeout=5.0) as sock:
            sock.sendall(data)
    wait_for(lambda: fleet[0].counts().truncated_bodies == 3)
    counts = fleet[0].counts()
    assert counts.total == 0
    assert counts.by_method == {}


# knobs


def test_kill_refuses_connections_and_restart_serves_on_the_same_port(
    fleet: Fleet, client: httpx.Client
) -> None:
    replica = fleet[0]
    url, old_pid = replica.url, replica.pid
    assert old_pid is not None
    for _ in range(3):
        client.get(url + "/x")

    replica.kill()
    assert replica.state == "killed"
    assert gone(old_pid)
    with pytest.raises(httpx.ConnectError):
        client.get(url + "/x")
    assert replica.counts().total == 3  # the killed process's counts are kept
    with pytest.raises(ReplicaUnavailableError, match="not running"):
        replica.set_faults(error_rate=1.0)
    assert client.get(fleet.urls[1] + "/x").status_code == 200  # the others are untouched

    replica.restart()
    assert replica.url == url
    assert replica.pid != old_pid
    assert replica.state == "running"
    assert client.get(url + "/x").json()["replica"] == 0
    assert replica.counts().total == 4


def test_freeze_accepts_but_never_answers_until_thaw(fleet: Fleet, client: httpx.Client) -> None:
    replica = fleet[0]
    client.get(replica.url + "/x")
    replica.freeze()
    assert replica.state == "frozen"
    with pytest.raises(httpx.ReadTimeout):  # the TCP handshake succeeds: no ConnectError
        client.get(replica.url + "/x", timeout=FROZEN_TIMEOUT)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(replica.url + "/health", timeout=FROZEN_TIMEOUT)
    assert replica.counts().total == 1  # the counts it froze with
    with pytest.raises(ReplicaUnavailableError, match="frozen"):
        replica.set_faults(latency=1.0)

    replica.thaw()
    assert replica.state == "running"
    assert client.get(replica.url + "/x").status_code == 200
    # The two requests sent while frozen were received at thaw (their clients had given up).
    assert replica.counts().total == 3


def test_kill_of_a_frozen_replica_keeps_its_counts(fleet: Fleet, client: httpx.Client) -> None:
    client.get(fleet.urls[1] + "/x")
    fleet[1].freeze()
    fleet[1].kill()
    assert fleet[1].counts().total == 1
    fleet[1].restart()
    assert client.get(fleet.urls[1] + "/x").status_code == 200


def test_error_rate(fleet: Fleet, client: httpx.Client) -> None:
    replica = fleet[0]
    replica.set_faults(error_rate=1.0)
    assert {client.get(replica.url + "/x").status_code for _ in range(20)} == {503}
    assert client.get(replica.url + "/health").status_code == 200  # health ignores faults

    replica.set_faults(error_rate=1.0, error_status=500)
    assert client.get(replica.url + "/x").status_code == 500

    replica.set_faults(error_rate=0.0)
    assert {client.get(replica.url + "/x").status_code for _ in range(20)} == {200}
    assert replica.counts().by_status == {503: 20, 500: 1, 200: 20}


def test_seeded_faults_are_reproducible(client: httpx.Client) -> None:
    def statuses(seed: int) -> list[int]:
        with Fleet(1, seed=seed) as fleet:
            fleet[0].set_faults(error_rate=0.5)
            return [client.get(fleet.urls[0] + "/x").status_code for _ in range(40)]

    first = statuses(99)
    assert first == statuses(99)
    assert set(first) == {200, 503}
    assert first != statuses(100)


def test_latency_knobs_delay_answers(fleet: Fleet, client: httpx.Client) -> None:
    replica = fleet[0]

    def elapsed() -> float:
        started = time.monotonic()
        assert client.get(replica.url + "/x").status_code == 200
        return time.monotonic() - started

    replica.set_faults(latency=0.3)
    assert elapsed() >= 0.3
    health_started = time.monotonic()
    client.get(replica.url + "/health")
    assert time.monotonic() - health_started < 0.3

    replica.set_faults(slow_fraction=1.0, slow_latency=0.3)
    assert elapsed() >= 0.3

    replica.set_faults()
    assert min(elapsed() for _ in range(3)) < 0.3


def test_go_down_refuses_and_resets_and_go_up_serves(fleet: Fleet, client: httpx.Client) -> None:
    replica = fleet[0]
    assert client.get(replica.url + "/x").status_code == 200  # a pooled keep-alive connection
    with socket.create_connection(("127.0.0.1", replica.port), timeout=5.0) as open_conn:
        replica.go_down()
        with pytest.raises(ConnectionResetError):  # SO_LINGER 0: reset, not an orderly close
            open_conn.recv(1)
    with pytest.raises(httpx.ConnectError):
        client.get(replica.url + "/x")
    with pytest.raises(httpx.ConnectError):
        client.get(replica.url + "/health")
    assert replica.state == "running"
    assert replica.counts().total == 1  # the process lives on, and so do its counts

    replica.go_up()
    assert client.get(replica.url + "/x").status_code == 200
    assert replica.counts().total == 2


def test_markov_alternates_up_and_down(fleet: Fleet) -> None:
    replica = fleet[0]
    replica.set_markov(lam=20.0, mu=20.0)  # up ~50 ms, down ~50 ms
    refused = served = 0
    deadline = time.monotonic() + 8.0
    with httpx.Client(timeout=2.0) as client:
        while (refused < 3 or served < 3) and time.monotonic() < deadline:
            try:
                client.get(replica.url + "/x")
                served += 1
            except httpx.ConnectError:
                refused += 1
            except httpx.TransportError:
                pass  # reset mid-request when it went down
            time.sleep(0.005)
    assert refused >= 3
    assert served >= 3

    replica.set_markov(None)  # stops alternating and leaves it up
    with httpx.Client(timeout=2.0) as client:
        assert all(client.get(replica.url + "/x").status_code == 200 for _ in range(20))

    with pytest.raises(ValueError, match="mu"):
        replica.set_markov(1.0)
    with pytest.raises(ValueError, match="lam"):
        replica.set_markov(0.0, 1.0)


# lifecycle


def test_given_port_taken_raises_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} ") as info, Fleet(1, ports=[port]):
            pass
        assert info.value.port == port


def test_given_ports_are_used() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Fleet(1, ports=[port]) as fleet, httpx.Client() as client:
        assert fleet.urls == [f"http://127.0.0.1:{port}"]
        assert client.get(fleet.urls[0] + "/x").status_code == 200


def test_no_process_survives_the_context_manager_even_on_error() -> None:
    fleet = Fleet(3)
    pids: list[int] = []

    def failing_body() -> None:
        with fleet:
            pids.extend(pid for pid in fleet.pids if pid is not None)
            fleet[0].freeze()
            fleet[1].go_down()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_body()
    assert len(pids) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(FleetError, match="closed"):
        fleet.urls  # noqa: B018


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_die_with_their_parent() -> None:
    # The parent exits without cleaning up; the replica is frozen, so it cannot notice that its
    # control pipe closed: only the kernel's parent-death signal can end it.
    program = textwrap.dedent(
        """
        import os, sys
        from resilient.testing.fleet import Fleet
        fleet = Fleet(1).start()
        fleet[0].freeze()
        print(fleet[0].pid, flush=True)
        os._exit(0)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # stderr goes to a file: a surviving replica would hold a stderr pipe open and hang the test
    with tempfile.TemporaryFile() as errors:
        done = subprocess.run(
            [sys.executable, "-c", program],
            stdout=subprocess.PIPE,
            stderr=errors,
            timeout=30,
            env=env,
            check=False,
        )
        errors.seek(0)
        assert done.returncode == 0, errors.read().decode(errors="replace")
    pid = int(done.stdout)
    wait_for(lambda: gone(pid))


def test_restart_from_a_short_lived_thread_survives_the_thread(
    fleet: Fleet, client: httpx.Client
) -> None:
    worker = threading.Thread(target=fleet[0].restart)
    worker.start()
    worker.join()
    time.sleep(0.2)  # PR_SET_PDEATHSIG would fire as the forking thread exits
    assert fleet[0].state == "running"
    assert client.get(fleet.urls[0] + "/x").status_code == 200


def test_misuse_is_reported() -> None:
    with pytest.raises(ValueError, match="n must be"):
        Fleet(0)
    with pytest.raises(ValueError, match="ports"):
        Fleet(2, ports=[8000])
    unstarted = Fleet(1)
    with pytest.raises(FleetError, match="not running"):
        unstarted.urls  # noqa: B018
    with Fleet(1) as fleet:
        with pytest.raises(FleetError, match="starts once"):
            fleet.start()
        with pytest.raises(ValueError, match="error_rate"):
            fleet[0].set_faults(error_rate=1.5)
        with pytest.raises(ValueError, match="latency"):
            fleet[0].set_faults(latency=-1.0)
        with pytest.raises(ValueError, match="error_status"):
            fleet[0].set_faults(error_status=99)
    with pytest.raises(FleetError, match="not running"):
        fleet[0].restart()  # a closed fleet starts nothing
    assert isinstance(Fleet(1).seed, int)
    assert Fleet(1, seed=5).seed == 5
