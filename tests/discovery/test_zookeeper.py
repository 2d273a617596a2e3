from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

import resilient as rs
from resilient.discovery._base import Discovery, Source
from resilient.discovery.zookeeper import ZooKeeper, register_zookeeper
from resilient.testing import Fleet
from tests.discovery.conftest import ZooKeeperServer

pytestmark = pytest.mark.slow

SESSION = 4.0  # seconds: short, so expiry-bound waits stay short

CURATOR_NODE = (  # byte for byte what Curator's JsonInstanceSerializer writes (Spring Cloud payload)
    b'{"name":"orders","id":"7c1e4b6e-2b8c-4a51-9c3e-0d7d6f1a2b3c","address":"127.0.0.1",'
    b'"port":8080,"sslPort":null,"payload":{"@class":"org.springframework.cloud.zookeeper.'
    b'discovery.ZookeeperInstance","id":"orders-1","name":"orders","metadata":{"zone":"eu-1a",'
    b'"weight":"3"}},"registrationTimeUTC":1712345678901,"serviceType":"DYNAMIC","uriSpec":'
    b'{"parts":[{"value":"scheme","variable":true},{"value":"://","variable":false},{"value":'
    b'"address","variable":true},{"value":":","variable":false},{"value":"port","variable":'
    b'true}]},"enabled":true}'
)


def curator_node(**fields: Any) -> bytes:
    document: dict[str, Any] = {
        "name": "orders",
        "id": str(uuid.uuid4()),
        "address": "127.0.0.1",
        "port": 8080,
        "sslPort": None,
        "payload": None,
        "registrationTimeUTC": 1712345678901,
        "serviceType": "DYNAMIC",
        "uriSpec": None,
    }
    document.update(fields)
    return json.dumps(document, separators=(",", ":")).encode()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until true; return the seconds it took (fail after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def urls(source: Source) -> set[str]:
    return {e.url for e in source.current().endpoints}


def discovery_warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "resilient.discovery"
        and r.levelno == logging.WARNING
        and text in r.getMessage()
    ]


@pytest.fixture
def path() -> str:
    return f"/services/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def kazoo(zookeeper_server: ZooKeeperServer) -> Iterator[Any]:
    """A plain kazoo client, to write nodes by hand as other registries would."""
    from kazoo.client import KazooClient  # type: ignore[import-untyped,unused-ignore]

    client = KazooClient(zookeeper_server.hosts)
    client.start(timeout=10)
    yield client
    client.stop()
    client.close()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with Fleet(3, seed=11) as running:
        yield running


@pytest.fixture
def source_factory() -> Iterator[Callable[..., ZooKeeper]]:
    sources: list[ZooKeeper] = []

    def make(*args: Any, **kwargs: Any) -> ZooKeeper:
        kwargs.setdefault("session_timeout", SESSION)
        source = ZooKeeper(*args, **kwargs)
        sources.append(source)
        source.start()
        return source

    yield make
    for source in sources:
        source.close()


def test_three_registered_servers_are_found(
    zookeeper_server: ZooKeeperServer,
    fleet: Fleet,
    path: str,
    source_factory: Callable[..., ZooKeeper],
) -> None:
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(
                register_zookeeper(
                    zookeeper_server.hosts, path, url, payload={"weight": i + 1, "zone": f"z{i}"}
                )
            )
            for i, url in enumerate(fleet.urls)
        ]
        source = source_factory(zookeeper_server.hosts, path)
        assert isinstance(source, Discovery)
        # start() did the first read: no waiting here.
        assert urls(source) == set(fleet.urls)
        by_url = {e.url: e for e in source.current().endpoints}
        with httpx.Client(timeout=5.0) as http:
            for i, url in enumerate(fleet.urls):
                endpoint = by_url[url]
                assert endpoint.id == nodes[i].rsplit("/", 1)[-1]
                assert (endpoint.weight, endpoint.zone) == (i + 1, f"z{i}")
                assert dict(endpoint.metadata) == {"weight": i + 1, "zone": f"z{i}"}
                assert http.get(endpoint.url + "/x").json()["replica"] == i


def test_registration_is_curator_json_in_an_ephemeral_node(
    zookeeper_server: ZooKeeperServer, kazoo: Any, path: str
) -> None:
    before_ms = int(time.time() * 1000)
    with register_zookeeper(
        None, path, "https://127.0.0.1:8443", id="replica-1", payload={"v": 1}, client=kazoo
    ) as node:
        assert node == f"{path}/replica-1"
        data, stat = kazoo.get(node)
        assert stat.ephemeralOwner == kazoo.client_id[0]
        instance = json.loads(data)
        assert instance.pop("registrationTimeUTC") in range(before_ms, int(time.time() * 1000) + 1)
        assert instance == {
            "name": path.rsplit("/", 1)[-1],
            "id": "replica-1",
            "address": "127.0.0.1",
            "port": None,
            "sslPort": 8443,
            "payload": {"v": 1},
            "serviceType": "DYNAMIC",
            "uriSpec": {
                "parts": [
                    {"value": "scheme", "variable": True},
                    {"value": "://", "variable": False},
                    {"value": "address", "variable": True},
                    {"value": ":", "variable": False},
                    {"value": "ssl-port", "variable": True},
                ]
            },
        }
    assert kazoo.exists(node) is None  # removed on exit
    assert kazoo.connected  # a client we passed in is not stopped


def test_closed_registration_disappears(
    zookeeper_server: ZooKeeperServer, path: str, source_factory: Callable[..., ZooKeeper]
) -> None:
    hosts = zookeeper_server.hosts
    with (
        register_zookeeper(hosts, path, "http://127.0.0.1:9001", session_timeout=SESSION),
        register_zookeeper(hosts, path, "http://127.0.0.1:9002", session_timeout=SESSION),
    ):
        source = source_factory(hosts, path)
        with register_zookeeper(hosts, path, "http://127.0.0.1:9003", session_timeout=SESSION):
            wait_until(lambda: len(urls(source)) == 3, SESSION, "the third registration appears")
        wait_until(lambda: len(urls(source)) == 2, SESSION, "the closed registration disappears")
        assert urls(source) == {"http://127.0.0.1:9001", "http://127.0.0.1:9002"}


def test_a_crashed_server_disappears_within_its_session_timeout(
    zookeeper_server: ZooKeeperServer, path: str, source_factory: Callable[..., ZooKeeper]
) -> None:
    session = 2.0
    script = textwrap.dedent(
        f"""
        import time
        from resilient.discovery.zookeeper import register_zookeeper
        with register_zookeeper({zookeeper_server.hosts!r}, {path!r}, "http://127.0.0.1:9100",
                                session_timeout={session}):
            print("registered", flush=True)
            time.sleep(60)
        """
    )
    server = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == b"registered\n"
        source = source_factory(zookeeper_server.hosts, path)
        assert urls(source) == {"http://127.0.0.1:9100"}
        server.kill()  # no cleanup runs: only the session's end can remove the node
        server.wait()
        took = wait_until(
            lambda: not urls(source), session + 3.0, "the crashed server's node expires"
        )
        assert took > 0.25 * session  # gone by expiry, not by a delete
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def test_stopping_the_registering_client_removes_the_node(
    zookeeper_server: ZooKeeperServer, kazoo: Any, path: str
) -> None:
    from kazoo.client import KazooClient  # type: ignore[import-untyped,unused-ignore]

    owner = KazooClient(zookeeper_server.hosts, timeout=SESSION)
    owner.start(timeout=10)
    with register_zookeeper(None, path, "http://127.0.0.1:9200", client=owner) as node:
        assert kazoo.exists(node) is not None
        owner.stop()  # the session ends while the context is still open
        wait_until(lambda: kazoo.exists(node) is None, SESSION, "the ephemeral node goes")
    owner.close()


def test_a_curator_node_written_by_hand_is_found(
    zookeeper_server: ZooKeeperServer,
    kazoo: Any,
    path: str,
    source_factory: Callable[..., ZooKeeper],
) -> None:
    kazoo.create(f"{path}/7c1e4b6e-2b8c-4a51-9c3e-0d7d6f1a2b3c", CURATOR_NODE, makepath=True)
    kazoo.create(f"{path}/tls-only", curator_node(id="tls-only", port=None, sslPort=8443))
    kazoo.create(f"{path}/both", curator_node(id="both", port=8081, sslPort=8444))
    kazoo.create(f"{path}/disabled", curator_node(id="disabled", port=8082, enabled=False))

    source = source_factory(zookeeper_server.hosts, path)
    endpoints = {e.url: e for e in source.current().endpoints}
    assert set(endpoints) == {
        "http://127.0.0.1:8080",
        "https://127.0.0.1:8443",
        "http://127.0.0.1:8081",
    }
    spring = endpoints["http://127.0.0.1:8080"]
    assert spring.id == "7c1e4b6e-2b8c-4a51-9c3e-0d7d6f1a2b3c"
    assert (spring.zone, spring.weight) == ("eu-1a", 3.0)  # from the payload's metadata map
    assert spring.metadata["name"] == "orders"
    assert endpoints["https://127.0.0.1:8443"].id == "tls-only"

    auto = source_factory(zookeeper_server.hosts, path, scheme="auto")
    assert urls(auto) == {
        "http://127.0.0.1:8080",
        "https://127.0.0.1:8443",
        "https://127.0.0.1:8444",
    }
    tls = source_factory(zookeeper_server.hosts, path, scheme="https")
    assert urls(tls) == {"https://127.0.0.1:8443", "https://127.0.0.1:8444"}


def test_malformed_nodes_are_skipped_with_one_warning_per_version(
    zookeeper_server: ZooKeeperServer,
    kazoo: Any,
    path: str,
    source_factory: Callable[..., ZooKeeper],
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    from kazoo.client import KazooClient  # type: ignore[import-untyped,unused-ignore]

    caplog.set_level(logging.WARNING, logger="resilient.discovery")
    kazoo.create(f"{path}/good", curator_node(id="good"), makepath=True)
    kazoo.create(f"{path}/not-json", b"\x00garbage{")
    kazoo.create(f"{path}/no-address", curator_node(id="no-address", address=None))
    kazoo.create(f"{path}/no-port", curator_node(id="no-port", port=None))
    kazoo.create(f"{path}/bad-weight", curator_node(id="bad-weight", payload={"weight": "heavy"}))
    kazoo.create(f"{path}/empty", b"")

    watching = KazooClient(zookeeper_server.hosts, timeout=SESSION)
    watching.start(timeout=10)
    request.addfinalizer(watching.close)
    request.addfinalizer(watching.stop)
    source = source_factory(None, path, client=watching)
    assert urls(source) == {"http://127.0.0.1:8080"}
    bad = ["not-json", "no-address", "no-port", "bad-weight", "empty"]
    for node in bad:
        assert len(discovery_warnings(caplog, f"{path}/{node}:")) == 1, node

    # Re-reading every node (as after a lost session) does not report the same versions again...
    expire_session(zookeeper_server.hosts, watching)
    kazoo.create(f"{path}/good-2", curator_node(id="good-2", port=8081))
    wait_until(lambda: len(urls(source)) == 2, 5.0, "the new node is seen")
    kazoo.set(f"{path}/good", curator_node(id="good", port=8079))
    wait_until(lambda: "http://127.0.0.1:8079" in urls(source), 5.0, "the changed node is seen")
    for node in bad:
        assert len(discovery_warnings(caplog, f"{path}/{node}:")) == 1, node
    # ...but a new version of a bad node is, and a repaired node is found.
    kazoo.set(f"{path}/not-json", b"still not json")
    kazoo.set(f"{path}/no-port", curator_node(id="no-port", port=8083))
    wait_until(lambda: len(urls(source)) == 3, 5.0, "the repaired node is seen")
    wait_until(
        lambda: len(discovery_warnings(caplog, f"{path}/not-json:")) == 2, 5.0, "a second warning"
    )
    assert urls(source) == {
        "http://127.0.0.1:8079",
        "http://127.0.0.1:8081",
        "http://127.0.0.1:8083",
    }


def test_a_missing_path_gives_no_replicas_until_it_exists(
    zookeeper_server: ZooKeeperServer, path: str, source_factory: Callable[..., ZooKeeper]
) -> None:
    source = source_factory(zookeeper_server.hosts, path)
    assert source.current().endpoints == ()
    with register_zookeeper(zookeeper_server.hosts, path, "http://127.0.0.1:9300"):
        wait_until(lambda: bool(urls(source)), 5.0, "the first registration appears")


def test_zookeeper_down_keeps_the_last_list_and_recovers(
    restartable_zookeeper: ZooKeeperServer,
    path: str,
    source_factory: Callable[..., ZooKeeper],
    caplog: Any,
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient.discovery")
    server = restartable_zookeeper
    with (
        register_zookeeper(server.hosts, path, "http://127.0.0.1:9401", session_timeout=SESSION),
        register_zookeeper(server.hosts, path, "http://127.0.0.1:9402", session_timeout=SESSION),
    ):
        source = source_factory(server.hosts, path)
        known = source.current()
        assert len(known.endpoints) == 2

        server.stop()
        wait_until(lambda: bool(discovery_warnings(caplog, "failed")), 5.0, "a warning")
        time.sleep(1.5)  # several reconnection attempts fail meanwhile
        assert source.current() == known
        assert len(discovery_warnings(caplog, "failed")) == 1
        assert not discovery_warnings(caplog, "recovered")

        server.start()
        with register_zookeeper(
            server.hosts, path, "http://127.0.0.1:9403", session_timeout=SESSION
        ):
            wait_until(lambda: len(urls(source)) == 3, 10.0, "a registration after the outage")
        assert discovery_warnings(caplog, "recovered")
        assert len(discovery_warnings(caplog, "failed")) == 1


def test_start_while_zookeeper_is_down_then_it_comes_up(
    restartable_zookeeper: ZooKeeperServer,
    path: str,
    source_factory: Callable[..., ZooKeeper],
    caplog: Any,
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient.discovery")
    server = restartable_zookeeper
    server.stop()
    began = time.monotonic()
    source = source_factory(server.hosts, path, connect_timeout=0.5)
    assert time.monotonic() - began < 3.0
    assert source.current().endpoints == ()
    assert len(discovery_warnings(caplog, "failed")) == 1

    server.start()
    with register_zookeeper(server.hosts, path, "http://127.0.0.1:9501"):
        wait_until(lambda: bool(urls(source)), 10.0, "the replica once ZooKeeper is up")


def expire_session(hosts: str, client: Any) -> None:
    """End ``client``'s session on the server, as a long partition would."""
    from kazoo.client import KazooClient  # type: ignore[import-untyped,unused-ignore]

    session_id = client.client_id[0]
    thief = KazooClient(hosts, client_id=client.client_id)
    thief.start(timeout=10)
    thief.stop()  # closes the shared session
    thief.close()
    wait_until(
        lambda: client.connected and client.client_id[0] != session_id, 10.0, "a new session"
    )


def test_session_expiry_re_registers_and_re_watches(
    zookeeper_server: ZooKeeperServer,
    kazoo: Any,
    path: str,
    source_factory: Callable[..., ZooKeeper],
) -> None:
    from kazoo.client import KazooClient  # type: ignore[import-untyped,unused-ignore]

    hosts = zookeeper_server.hosts
    clients = [KazooClient(hosts, timeout=SESSION) for _ in range(2)]
    for client in clients:
        client.start(timeout=10)
    registering, watching = clients
    try:
        with register_zookeeper(None, path, "http://127.0.0.1:9601", client=registering) as node:
            source = source_factory(None, path, client=watching)
            assert urls(source) == {"http://127.0.0.1:9601"}

            expire_session(hosts, registering)
            wait_until(
                lambda: (
                    (stat := kazoo.exists(node)) is not None
                    and stat.ephemeralOwner == registering.client_id[0]
                ),
                5.0,
                "the node re-created in the new session",
            )
            expire_session(hosts, watching)
            with register_zookeeper(hosts, path, "http://127.0.0.1:9602"):
                wait_until(lambda: len(urls(source)) == 2, 5.0, "watches set again")
            wait_until(lambda: len(urls(source)) == 1, 5.0, "and still followed")
    finally:
        for client in clients:
            client.stop()
            client.close()


def test_close_leaves_no_threads(
    zookeeper_server: ZooKeeperServer, restartable_zookeeper: ZooKeeperServer, path: str
) -> None:
    before = set(threading.enumerate())
    source = ZooKeeper(zookeeper_server.hosts, path, session_timeout=SESSION)
    source.start()
    assert set(threading.enumerate()) - before  # kazoo's and ours: the check below can fail
    source.close()
    assert set(threading.enumerate()) - before == set()
    source.close()  # idempotent

    restartable_zookeeper.stop()  # closing while reconnecting to a dead server
    down = ZooKeeper(restartable_zookeeper.hosts, path, connect_timeout=0.3)
    down.start()
    assert set(threading.enumerate()) - before
    down.close()
    assert set(threading.enumerate()) - before == set()


def test_a_given_client_is_left_running(
    zookeeper_server: ZooKeeperServer, kazoo: Any, path: str
) -> None:
    with ZooKeeper(None, path, client=kazoo) as source:
        assert isinstance(source, ZooKeeper)
    assert kazoo.connected
    kazoo.ensure_path(path)  # still usable


def test_without_kazoo_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in [m for m in sys.modules if m == "kazoo" or m.startswith("kazoo.")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "kazoo", None)
    with pytest.raises(ImportError, match=r"resilient\[zookeeper\]"):
        ZooKeeper("127.0.0.1:2181", "/services/orders")
    with (
        pytest.raises(ImportError, match=r"resilient\[zookeeper\]"),
        register_zookeeper("127.0.0.1:2181", "/services/orders", "http://127.0.0.1:1"),
    ):
        pass


def test_the_package_imports_without_kazoo() -> None:
    script = (
        "import sys; sys.modules['kazoo'] = None\n"
        "import resilient.discovery, resilient.discovery.zookeeper\n"
        "assert not [m for m in sys.modules if m.startswith('kazoo.')]\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "services"}, "path"),
        ({"path": "/a//b"}, "path"),
        ({"hosts": ""}, "hosts"),
        ({"hosts": None}, "hosts"),
        ({"scheme": "ftp"}, "scheme"),
        ({"session_timeout": 0}, "session_timeout"),
        ({"connect_timeout": float("nan")}, "connect_timeout"),
    ],
)
def test_source_arguments_are_checked(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"hosts": "127.0.0.1:2181", "path": "/services/orders", **kwargs}
    with pytest.raises(ValueError, match=message):
        ZooKeeper(**arguments)


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("ftp://127.0.0.1:21", {}, "url"),
        ("http://127.0.0.1:80/prefix", {}, "url"),
        ("http://127.0.0.1:80", {"id": "a/b"}, "id"),
        ("http://127.0.0.1:80", {"payload": object()}, "payload"),
        # Hints every reader would reject (and so skip the node: no traffic for the server).
        ("http://127.0.0.1:80", {"payload": {"weight": -1}}, "weight"),
        ("http://127.0.0.1:80", {"payload": {"weight": "heavy"}}, "weight"),
        ("http://127.0.0.1:80", {"payload": {"zone": 3}}, "zone"),
        ("http://127.0.0.1:80", {"payload": {"priority": 1.5}}, "priority"),
        ("http://127.0.0.1:80", {"payload": {"metadata": {"weight": "x"}}}, "weight"),
        ("http://127.0.0.1:80", {"session_timeout": -1}, "session_timeout"),
    ],
)
def test_registration_arguments_are_checked(url: str, kwargs: dict[str, Any], message: str) -> None:
    with (
        pytest.raises(ValueError, match=message),
        register_zookeeper("127.0.0.1:1", "/services/orders", url, **kwargs),
    ):
        pass


def _interrupt_main_thread_in(seconds: float) -> threading.Timer:
    """Ctrl-C, as a user would press it, ``seconds`` from now."""
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()
    timer = threading.Timer(seconds, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    return timer


def _settled(before: set[threading.Thread]) -> bool:
    time.sleep(0.05)
    return not (set(threading.enumerate()) - before)


@pytest.mark.parametrize("how", ["with", "transport"])
def test_a_start_interrupted_while_waiting_leaves_nothing_running(how: str) -> None:
    # Ctrl-C during start()'s wait for the first answer (nobody listens on port 1): the session
    # and the watch thread it began are stopped, though `__exit__` never runs (`__enter__`
    # raised) and the transport was never made.
    before = set(threading.enumerate())
    source = ZooKeeper("127.0.0.1:1", "/services/orders", connect_timeout=5.0)

    def start() -> None:
        if how == "with":
            with source:
                pass
        else:
            rs.ResilientTransport(services={"orders": source})

    timer = _interrupt_main_thread_in(0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            start()
    finally:
        timer.cancel()
    deadline = time.monotonic() + 10.0
    while not _settled(before):
        assert time.monotonic() < deadline, set(threading.enumerate()) - before


def test_a_start_that_failed_leaves_a_source_that_closes() -> None:
    source = ZooKeeper("host:notaport", "/services/orders")
    with pytest.raises(ValueError, match="notaport"):
        source.start()
    source.close()  # no AttributeError


@pytest.mark.parametrize(
    "url", ["http://svc:s3cr3t@10.0.0.7:8080", "http://10.0.0.7:8080/?api_key=s3cr3t"]
)
def test_a_refused_registration_url_is_not_shown_with_its_credentials(url: str) -> None:
    with (
        pytest.raises(ValueError, match="url") as raised,
        register_zookeeper("127.0.0.1:1", "/services/orders", url),
    ):
        pass
    assert "s3cr3t" not in str(raised.value)
