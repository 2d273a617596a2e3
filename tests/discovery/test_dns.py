"""DNS discovery against a real dnsmasq on loopback."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from resilient.discovery._base import Endpoint, Snapshot
from tests.conftest import require_servers

pytest.importorskip("dns.resolver", reason="the 'dns' extra (dnspython) is not installed")

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import dns.resolver

from resilient.discovery.dns import DNS, _srv_weights

pytestmark = pytest.mark.slow

DOMAIN_FLAGS = ("--local=/test/", "--local-ttl=1")  # .test answers locally: NXDOMAIN, not REFUSED


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port for dnsmasq")


class Dnsmasq:
    """One dnsmasq process on 127.0.0.1:port, restartable with other records on the same port."""

    def __init__(self, exe: str, root: Path) -> None:
        self.exe = exe
        self.root = root
        self.port = _free_port()
        self.hostsdir = root / "hosts.d"
        self.hostsdir.mkdir()
        self.log = root / "dnsmasq.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_once = False
        self.command: list[str] = []

    def start(self, *records: str) -> None:
        """Start with ``records`` (dnsmasq flags); the first failure skips (or fails) the test."""
        assert self.proc is None
        self.command = [
            self.exe,
            "--keep-in-foreground",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--pid-file={self.root / 'dnsmasq.pid'}",
            f"--hostsdir={self.hostsdir}",
            f"--log-facility={self.log}",
            *(["--user=root"] if os.geteuid() == 0 else []),
            *DOMAIN_FLAGS,
            *records,
        ]
        with open(self.root / "dnsmasq.stderr", "ab") as err:
            self.proc = subprocess.Popen(self.command, stdout=err, stderr=err)
        try:
            self._wait_ready()
        except RuntimeError as exc:
            self.stop()
            if self.started_once:
                raise
            _unavailable(str(exc))
        self.started_once = True

    def _wait_ready(self) -> None:
        query = dns.message.make_query("ready.test", "A")
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                break
            try:
                dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.2)
            except (dns.exception.Timeout, OSError):
                time.sleep(0.05)
                continue
            return
        stderr = (self.root / "dnsmasq.stderr").read_text(errors="replace")
        raise RuntimeError(f"dnsmasq did not answer on port {self.port}: {stderr.strip()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self, *records: str) -> None:
        self.stop()
        self.start(*records)

    def write_hosts(self, text: str) -> None:
        """Replace the hosts file atomically; dnsmasq re-reads --hostsdir on change (inotify)."""
        staging = self.root / "hosts.tmp"
        staging.write_text(text)
        os.replace(staging, self.hostsdir / "hosts")


def _unavailable(why: str) -> None:
    if require_servers():
        pytest.fail(f"dnsmasq is required (RESILIENT_REQUIRE_SERVERS): {why}")
    pytest.skip(f"dnsmasq unavailable: {why}")


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    exe = shutil.which("dnsmasq") or (
        "/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None
    )
    if exe is None:
        _unavailable("no dnsmasq executable (Debian: apt-get install dnsmasq-base)")
        raise AssertionError("unreachable")
    server = Dnsmasq(exe, tmp_path)
    try:
        yield server
    finally:
        server.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def urls(snapshot: Snapshot) -> set[str]:
    return {e.url for e in snapshot.endpoints}


def source(server: Dnsmasq, name: str, **kw: Any) -> DNS:
    return DNS(name, nameserver="127.0.0.1", port=server.port, **kw)


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "failed" in r.getMessage()]


ORDERS = "_http._tcp.orders.test"


# -- SRV -------------------------------------------------------------------------------------


def test_srv_records_give_priority_weight_port_and_id(dnsmasq: Dnsmasq) -> None:
    dnsmasq.start(
        f"--srv-host={ORDERS},host1.test,8001,10,60",
        f"--srv-host={ORDERS},host2.test,8002,10,0",
        f"--srv-host={ORDERS},host3.test,8003,20,5",
        "--host-record=host1.test,127.0.0.1",
        "--host-record=host2.test,127.0.0.2",
        "--host-record=host3.test,127.0.0.3,::1",
    )
    with source(dnsmasq, ORDERS) as orders:
        got = {(e.url, e.priority, e.id): e for e in orders.current().endpoints}
        assert set(got) == {
            ("http://127.0.0.1:8001", 10, "host1.test"),
            ("http://127.0.0.2:8002", 10, "host2.test"),
            ("http://127.0.0.3:8003", 20, "host3.test"),
            ("http://[::1]:8003", 20, "host3.test"),
        }
        assert got["http://127.0.0.1:8001", 10, "host1.test"].weight == 60.0
        # weight 0 beside a positive weight: RFC 2782's "very small chance"
        assert got["http://127.0.0.2:8002", 10, "host2.test"].weight == pytest.approx(0.06)
        # a target with two addresses splits its weight between them
        assert got["http://127.0.0.3:8003", 20, "host3.test"].weight == 2.5
        assert got["http://[::1]:8003", 20, "host3.test"].weight == 2.5
        assert got["http://127.0.0.2:8002", 10, "host2.test"].metadata == {
            "host": "host2.test",
            "srv_weight": 0,
        }
        assert orders.current().version == 1


def test_srv_targets_are_resolved_when_the_additional_section_is_empty(
    dnsmasq: Dnsmasq,
) -> None:
    dnsmasq.start(
        f"--srv-host={ORDERS},host1.test,8001,0,1",
        "--host-record=host1.test,127.0.0.1,::1",
    )
    asked: list[tuple[str, str]] = []

    class NoAdditional(dns.resolver.Resolver):
        def resolve(self, qname: Any, rdtype: Any = "A", *args: Any, **kw: Any) -> Any:
            answer = super().resolve(qname, rdtype, *args, **kw)
            answer.response.additional = []
            asked.append((str(qname), dns.rdatatype.to_text(rdtype)))
            return answer

    resolver = NoAdditional(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dnsmasq.port
    with DNS(ORDERS, resolver=resolver) as orders:
        assert urls(orders.current()) == {"http://127.0.0.1:8001", "http://[::1]:8001"}
    assert asked == [(f"{ORDERS}.", "SRV"), ("host1.test.", "A"), ("host1.test.", "AAAA")]


def test_srv_target_dot_means_not_available(
    dnsmasq: Dnsmasq, caplog: pytest.LogCaptureFixture
) -> None:
    dnsmasq.start("--srv-host=_http._tcp.gone.test")  # no target: SRV 0 0 0 .
    caplog.set_level(logging.WARNING, logger="resilient.discovery")
    with source(dnsmasq, "_http._tcp.gone.test", timeout=1.0) as gone:
        assert gone.current().endpoints == ()
    assert "not available" in failures(caplog)[0].getMessage()


def test_srv_weights_mapping() -> None:
    assert _srv_weights([(10, 60), (10, 0), (10, 20), (20, 0), (20, 0)]) == pytest.approx(
        [60.0, 0.02, 20.0, 1.0, 1.0]
    )
    assert _srv_weights([]) == []


# -- A/AAAA ----------------------------------------------------------------------------------


def test_a_and_aaaa_fallback_with_default_port(
    dnsmasq: Dnsmasq, caplog: pytest.LogCaptureFixture
) -> None:
    dnsmasq.start("--host-record=api.test,127.0.0.5,::5")
    caplog.set_level(logging.WARNING, logger="resilient.discovery")
    expected = {"https://127.0.0.5:9000", "https://[::5]:9000"}
    with source(dnsmasq, "api.test", default_port=9000, scheme="https") as auto:
        assert urls(auto.current()) == expected  # no SRV records: fell back
        assert all(e.priority == 0 and e.weight == 1.0 for e in auto.current().endpoints)
    with source(dnsmasq, "api.test", record="a", default_port=9000, scheme="https") as a:
        assert urls(a.current()) == expected
    assert failures(caplog) == []
    # no fallback without a port, nor with record="srv": nothing found, said once each
    with source(dnsmasq, "api.test") as no_port:
        assert no_port.current().endpoints == ()
    with source(dnsmasq, "api.test", record="srv", default_port=9000) as srv_only:
        assert srv_only.current().endpoints == ()
    messages = [r.getMessage() for r in failures(caplog)]
    assert len(messages) == 2
    assert "default_port" in messages[0]
    assert "NoAnswer" in messages[1]


# -- refresh by TTL --------------------------------------------------------------------------


def test_ttl_expiry_picks_up_a_change(dnsmasq: Dnsmasq) -> None:
    dnsmasq.write_hosts("127.0.0.1 host1.test\n")
    dnsmasq.start(f"--srv-host={ORDERS},host1.test,8001,0,1")  # local TTL 1 s
    with source(dnsmasq, ORDERS) as orders, source(dnsmasq, ORDERS, min_ttl=60.0) as slow:
        first = orders.current()
        assert urls(first) == urls(slow.current()) == {"http://127.0.0.1:8001"}
        dnsmasq.write_hosts("127.0.0.9 host1.test\n::9 host1.test\n")
        want = {"http://127.0.0.9:8001", "http://[::9]:8001"}
        assert wait_for(lambda: urls(orders.current()) == want, timeout=6.0), orders.current()
        assert orders.current().version > first.version
        # min_ttl clamps the 1 s TTL up: that source has not looked again yet
        assert urls(slow.current()) == {"http://127.0.0.1:8001"}


# -- static stability ------------------------------------------------------------------------


def test_server_down_keeps_the_last_list_and_warns_once_then_resumes(
    dnsmasq: Dnsmasq, caplog: pytest.LogCaptureFixture
) -> None:
    dnsmasq.start(f"--srv-host={ORDERS},host1.test,8001,0,1", "--host-record=host1.test,127.0.0.1")
    caplog.set_level(logging.INFO, logger="resilient.discovery")
    lookups = 0

    class Counting(dns.resolver.Resolver):
        def resolve(self, qname: Any, rdtype: Any = "A", *args: Any, **kw: Any) -> Any:
            nonlocal lookups
            lookups += 1
            return super().resolve(qname, rdtype, *args, **kw)

    resolver = Counting(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dnsmasq.port
    orders = DNS(ORDERS, resolver=resolver, timeout=0.4, min_ttl=0.2, max_ttl=1.0)
    with orders:
        good = orders.current()
        assert urls(good) == {"http://127.0.0.1:8001"}

        dnsmasq.stop()
        assert wait_for(lambda: len(failures(caplog)) > 0), "no warning after the server stopped"
        seen = lookups
        assert wait_for(lambda: lookups >= seen + 3), "no retries while the server is down"
        # then the server answers, but NXDOMAIN: still the same failure episode
        dnsmasq.start()
        seen = lookups
        assert wait_for(lambda: lookups >= seen + 2)
        assert orders.current() == good
        assert len(failures(caplog)) == 1
        assert "keeping the last 1 endpoint(s)" in failures(caplog)[0].getMessage()

        dnsmasq.restart(
            f"--srv-host={ORDERS},host1.test,8001,0,1",
            f"--srv-host={ORDERS},host2.test,8002,1,1",
            "--host-record=host1.test,127.0.0.1",
            "--host-record=host2.test,127.0.0.2",
        )
        assert wait_for(lambda: len(orders.current().endpoints) == 2), orders.current()
        assert {(e.url, e.priority) for e in orders.current().endpoints} == {
            ("http://127.0.0.1:8001", 0),
            ("http://127.0.0.2:8002", 1),
        }
        assert orders.current().version == good.version + 1
        assert any("recovered" in r.getMessage() for r in caplog.records)
        assert len(failures(caplog)) == 1


def test_first_lookup_failing_does_not_raise_and_later_succeeds(dnsmasq: Dnsmasq) -> None:
    dnsmasq.start()  # no records yet: NXDOMAIN
    with source(dnsmasq, ORDERS, min_ttl=0.2, max_ttl=0.5) as orders:
        assert orders.current() == Snapshot(0, ())
        dnsmasq.restart(
            f"--srv-host={ORDERS},host1.test,8001,0,1", "--host-record=host1.test,127.0.0.1"
        )
        assert wait_for(lambda: orders.current().version == 1)
        assert orders.current().endpoints == (
            Endpoint("http://127.0.0.1:8001", priority=0, weight=1.0, id="host1.test"),
        )


# -- lifecycle -------------------------------------------------------------------------------


def _dns_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("resilient-dns-")]


def test_close_leaves_no_thread_behind(dnsmasq: Dnsmasq) -> None:
    dnsmasq.start(f"--srv-host={ORDERS},host1.test,8001,0,1", "--host-record=host1.test,127.0.0.1")
    assert _dns_threads() == []
    orders = source(dnsmasq, ORDERS)
    orders.start()
    orders.start()  # idempotent
    assert len(_dns_threads()) == 1
    began = time.monotonic()
    orders.close()
    assert time.monotonic() - began < 1.0
    assert _dns_threads() == []
    orders.close()  # idempotent
    # closing while a lookup hangs on a dead server waits for it, bounded by timeout
    dnsmasq.stop()
    stuck = source(dnsmasq, ORDERS, timeout=0.5, min_ttl=0.1, max_ttl=0.1)
    stuck.start()
    time.sleep(0.3)
    stuck.close()
    assert _dns_threads() == []
    # a closed source can start again
    dnsmasq.start(f"--srv-host={ORDERS},host1.test,8001,0,1", "--host-record=host1.test,127.0.0.1")
    stuck.start()
    assert urls(stuck.current()) == {"http://127.0.0.1:8001"}
    stuck.close()
    assert _dns_threads() == []


def test_a_listener_may_close_the_source_while_start_publishes_its_first_answer(
    dnsmasq: Dnsmasq,
) -> None:
    # start() hands the first answer to the listeners in the caller's thread; one that closes
    # the source there ("stop once we have the list") must not wait for start() itself.
    dnsmasq.start(f"--srv-host={ORDERS},host1.test,8001,0,1", "--host-record=host1.test,127.0.0.1")
    orders = source(dnsmasq, ORDERS)
    seen: list[set[str]] = []

    def once(snapshot: Snapshot) -> None:
        seen.append(urls(snapshot))
        orders.close()

    orders.subscribe(once)
    starter = threading.Thread(target=orders.start, daemon=True)
    starter.start()
    starter.join(5.0)
    assert not starter.is_alive()  # start() returned
    assert seen == [{"http://127.0.0.1:8001"}]
    assert _dns_threads() == []  # closed during start: no refresh thread
    orders.start()  # and it can start again
    assert len(_dns_threads()) == 1
    orders.close()


def test_a_start_beside_another_returns_once_the_first_answer_is_in(
    dnsmasq: Dnsmasq, monkeypatch: pytest.MonkeyPatch
) -> None:
    # start() promises replicas when it returns: a second caller waits for the first one's
    # lookup (slowed down here) rather than returning at once with none.
    dnsmasq.start(f"--srv-host={ORDERS},host1.test,8001,0,1", "--host-record=host1.test,127.0.0.1")
    orders = source(dnsmasq, ORDERS)
    lookup = orders._resolve

    def slow() -> Any:
        time.sleep(0.3)
        return lookup()

    monkeypatch.setattr(orders, "_resolve", slow)
    seen: list[set[str]] = []

    def start() -> None:
        orders.start()
        seen.append(urls(orders.current()))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5.0)
    assert seen == [{"http://127.0.0.1:8001"}] * 2
    assert len(_dns_threads()) == 1
    orders.close()
    assert _dns_threads() == []


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"record": "a"}, "default_port"),
        ({"record": "mx"}, "record"),
        ({"scheme": "ftp"}, "scheme"),
        ({"port": 0}, "port"),
        ({"default_port": 70000}, "default_port"),
        ({"min_ttl": 0}, "min_ttl"),
        ({"max_ttl": 0.5}, "max_ttl"),
        ({"timeout": -1}, "timeout"),
        ({"nameserver": "dns.example"}, "nameserver"),
        ({"nameserver": []}, "nameserver"),
        (
            {"nameserver": "127.0.0.1", "resolver": dns.resolver.Resolver(configure=False)},
            "resolver",
        ),
    ],
)
def test_invalid_configuration_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DNS(ORDERS, **kwargs)


def test_a_refused_nameserver_is_not_shown_with_its_credentials() -> None:
    with pytest.raises(ValueError, match="nameserver") as raised:
        DNS(ORDERS, nameserver="https://u:s3cr3t@dns.example/dns-query?token=t0k")
    assert "s3cr3t" not in str(raised.value) and "t0k" not in str(raised.value)


def test_invalid_name() -> None:
    with pytest.raises(ValueError, match="name"):
        DNS("", nameserver="127.0.0.1")
    with pytest.raises(ValueError, match="name"):
        DNS("x" * 70 + ".test", nameserver="127.0.0.1")


def test_nameserver_and_port_pick_the_server() -> None:
    src = DNS(ORDERS, nameserver=["127.0.0.1", "::1"], port=5353)
    resolver = src._resolver
    assert [str(ns) for ns in resolver.nameservers] == ["127.0.0.1", "::1"]
    assert resolver.port == 5353


def test_missing_dnspython_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dns.resolver", None)
    with pytest.raises(ImportError, match=r"resilient\[dns\]"):
        DNS(ORDERS, nameserver="127.0.0.1")
