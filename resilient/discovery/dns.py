"""Replicas from DNS: SRV records (priority, weight, port) or A/AAAA records, refreshed by TTL.

A background thread re-resolves when the smallest TTL of the last answer runs out. When the DNS
server fails (timeout, SERVFAIL, NXDOMAIN, no records) the last good list is kept and the lookup
is retried with capped exponential backoff; the failure is logged once per episode.

Needs the ``dns`` extra (dnspython): ``pip install 'resilient[dns]'``.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from resilient.discovery._base import Endpoint, Source
from resilient.policies._common import check_positive
from resilient.telemetry import redact

if TYPE_CHECKING:
    import dns.name
    import dns.resolver
    import dns.rrset

__all__ = ["DNS"]

_log = logging.getLogger("resilient.discovery")

# RFC 2782: a weight-0 record "should be given a very small chance of being selected" when
# positive-weight records share its priority. It gets this fraction of the smallest positive
# weight; when every record of a priority has weight 0 they share it equally (weight 1.0).
_ZERO_WEIGHT_SHARE = 1e-3

_RECORDS = ("auto", "srv", "a")


def _require_dnspython() -> None:
    try:
        import dns.name
        import dns.rdatatype
        import dns.rdtypes.IN.A
        import dns.rdtypes.IN.AAAA
        import dns.rdtypes.IN.SRV
        import dns.resolver  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "resilient.discovery.DNS needs dnspython, which the 'dns' extra installs: "
            "pip install 'resilient[dns]'"
        ) from exc


def _srv_weights(records: Iterable[tuple[int, int]]) -> list[float]:
    """Map SRV ``(priority, weight)`` pairs to `Endpoint` weights, in order.

    Positive weights are kept. A weight of 0 becomes `_ZERO_WEIGHT_SHARE` × the smallest positive
    weight of its priority (RFC 2782's "very small chance"), or 1.0 when every record of its
    priority has weight 0 — so a weighted pick uses weight-0 records, in effect, only once no
    positive-weight record of that priority is left.

    Example::

        _srv_weights([(10, 60), (10, 0), (20, 0)])  # [60.0, 0.06, 1.0]
    """
    pairs = list(records)
    smallest: dict[int, int] = {}
    for priority, weight in pairs:
        if weight > 0:
            smallest[priority] = min(weight, smallest.get(priority, weight))
    out: list[float] = []
    for priority, weight in pairs:
        if weight > 0:
            out.append(float(weight))
        elif priority in smallest:
            out.append(smallest[priority] * _ZERO_WEIGHT_SHARE)
        else:
            out.append(1.0)
    return out


def _url(scheme: str, ip: str, port: int) -> str:
    host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    return f"{scheme}://{host}:{port}"


class DNS(Source):
    """Replicas of a service found in DNS, re-resolved whenever the answer's TTL runs out.

    ``record="srv"`` looks up SRV records of ``name`` (``_http._tcp.orders.example``): every
    target's A/AAAA addresses (from the answer's additional section when the server sent them,
    else looked up) become endpoints ``scheme://ip:port`` carrying the record's ``priority`` and
    weight, ``id`` = the target name and ``metadata`` = ``{"host": target, "srv_weight": w}``.
    Weights: a positive SRV weight is kept; weight 0 becomes 1/1000 of the smallest positive
    weight of its priority (RFC 2782's "very small chance"), or 1.0 when every record of that
    priority has weight 0; a target with several addresses splits its weight evenly among them.
    ``record="a"`` looks up A and AAAA records of ``name`` and needs ``default_port``.
    ``record="auto"`` (the default) tries SRV and falls back to A/AAAA when ``name`` has no SRV
    records and ``default_port`` is given.

    ``nameserver`` (an IP address, or several) and ``port`` choose the DNS server; without
    ``nameserver`` the system's ``/etc/resolv.conf`` is used. ``resolver`` passes a ready
    ``dns.resolver.Resolver`` instead. ``start()`` resolves once, synchronously (bounded by
    ``timeout``), then a daemon thread refreshes after the smallest TTL of the answer, clamped to
    ``[min_ttl, max_ttl]``; ``close()`` stops and joins it. A failed lookup keeps the last good
    list (an empty answer counts as a failure) and is retried after ``min_ttl``, doubling up to
    ``max_ttl``, with jitter. A first lookup that fails does not raise: ``start()`` returns with
    no endpoints, logs a warning and keeps trying.

    Example::

        orders = rs.discovery.DNS("_http._tcp.orders.service.consul", nameserver="127.0.0.1", port=8600)
        web = rs.discovery.DNS("web.internal", record="a", default_port=8080)
    """

    def __init__(
        self,
        name: str,
        *,
        nameserver: str | Sequence[str] | None = None,
        port: int = 53,
        scheme: Literal["http", "https"] = "http",
        default_port: int | None = None,
        record: Literal["auto", "srv", "a"] = "auto",
        min_ttl: float = 1.0,
        max_ttl: float = 300.0,
        timeout: float = 2.0,
        resolver: dns.resolver.Resolver | None = None,
    ) -> None:
        _require_dnspython()
        import dns.exception
        import dns.name

        if not isinstance(name, str) or not name.strip("."):
            raise ValueError(f"name must be a DNS name, got {name!r}")
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise ValueError(f"name must be a DNS name, got {name!r} ({exc})") from None
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be 'http' or 'https', got {scheme!r}")
        if record not in _RECORDS:
            raise ValueError(f"record must be one of {_RECORDS}, got {record!r}")
        _check_port("port", port)
        if default_port is not None:
            _check_port("default_port", default_port)
        elif record == "a":
            raise ValueError(
                "default_port is required with record='a' (A/AAAA records carry no port)"
            )
        check_positive("min_ttl", min_ttl)
        check_positive("max_ttl", max_ttl)
        if max_ttl < min_ttl:
            raise ValueError(f"max_ttl must be >= min_ttl ({min_ttl!r}), got {max_ttl!r}")
        check_positive("timeout", timeout)
        if resolver is not None and nameserver is not None:
            raise ValueError("pass either nameserver= or resolver=, not both")

        super().__init__(name)
        self.scheme = scheme
        self.default_port = default_port
        self.record = record
        self.min_ttl = float(min_ttl)
        self.max_ttl = float(max_ttl)
        self.timeout = float(timeout)
        self._qname = qname
        self._resolver = resolver if resolver is not None else _make_resolver(nameserver, port)
        self._control = threading.Lock()
        self._starting: threading.Event | None = None  # set when start()'s first lookup ends
        self._starter: int | None = None  # the thread making it
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._backoff = self.min_ttl
        self._random = random.Random()

    def __repr__(self) -> str:
        return f"DNS({self.name!r}, record={self.record!r})"

    def start(self) -> None:
        """Resolve once (bounded by ``timeout``), then keep refreshing in a daemon thread."""
        while True:
            with self._control:
                if self._thread is not None:
                    return
                starting = self._starting
                if starting is None:
                    starting = self._starting = threading.Event()
                    self._starter = threading.get_ident()
                    stop = self._stop = threading.Event()
                    break
                if self._starter == threading.get_ident():
                    return  # from a listener, during this thread's own first lookup
            starting.wait()  # another thread's start(): its first lookup, then look again
        try:
            # Outside the lock: the first answer goes to the listeners in this thread, and one
            # may call close() (or start()) on this source.
            delay = self._refresh()
        except BaseException:
            self._started(starting, None)
            raise
        self._started(starting, None if stop.is_set() else (stop, delay))

    def _started(
        self, starting: threading.Event, run: tuple[threading.Event, float] | None
    ) -> None:
        """End a start(): with ``run`` (its stop event and first delay), the refresh thread."""
        with self._control:
            self._starting = None
            if run is not None:  # (None: failed, or closed meanwhile)
                thread = threading.Thread(
                    target=self._run, args=run, name=f"resilient-dns-{self.name}", daemon=True
                )
                self._thread = thread
                thread.start()
        starting.set()

    def close(self) -> None:
        """Stop refreshing; returns once the thread has ended (at most ``timeout`` later)."""
        with self._control:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self, stop: threading.Event, delay: float) -> None:
        while not stop.wait(delay):
            delay = self._refresh()

    def _refresh(self) -> float:
        """Resolve and publish; return how long to wait before the next lookup."""
        try:
            endpoints, ttl = self._resolve()
        except Exception as exc:  # anything: the thread must outlive a bad answer
            self._failed(exc)
            delay = self._backoff * (0.5 + 0.5 * self._random.random())
            self._backoff = min(self._backoff * 2, self.max_ttl)
            return min(max(delay, self.min_ttl), self.max_ttl)
        self._backoff = self.min_ttl
        self._publish(endpoints)
        return min(max(ttl, self.min_ttl), self.max_ttl)

    # -- resolution (runs in start() and in the refresh thread) ------------------------------

    def _resolve(self) -> tuple[list[Endpoint], float]:
        """The endpoints of ``name`` now and the smallest TTL of what was used."""
        import dns.rdatatype
        import dns.resolver

        deadline = time.monotonic() + self.timeout
        if self.record != "a":
            try:
                answer = self._query(self._qname, dns.rdatatype.SRV, deadline)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
                if self.record == "srv":
                    raise
                if self.default_port is None:
                    raise LookupError(
                        f"{self.name} has no SRV records ({exc}); pass default_port= to fall "
                        "back to its A/AAAA records"
                    ) from exc
            else:
                return self._from_srv(answer, deadline)
        port = self.default_port
        if port is None:  # unreachable: checked in __init__ for "a", above for "auto"
            raise LookupError(f"{self.name}: default_port is needed for A/AAAA records")
        ips, ttl = self._addresses(self._qname, (), deadline)
        if not ips:
            raise LookupError(f"{self.name} has no A or AAAA records")
        host = self._qname.to_text(omit_final_dot=True)
        endpoints = [Endpoint(_url(self.scheme, ip, port), metadata={"host": host}) for ip in ips]
        return endpoints, ttl

    def _from_srv(
        self, answer: dns.resolver.Answer, deadline: float
    ) -> tuple[list[Endpoint], float]:
        import dns.name
        import dns.rdtypes.IN.SRV

        records = [rd for rd in answer.rrset or () if isinstance(rd, dns.rdtypes.IN.SRV.SRV)]
        if len(records) == 1 and records[0].target == dns.name.root:
            raise LookupError(f"{self.name}: SRV target '.' says the service is not available")
        ttl = float(answer.chaining_result.minimum_ttl)
        weights = _srv_weights((int(rd.priority), int(rd.weight)) for rd in records)
        endpoints: list[Endpoint] = []
        for rd, weight in zip(records, weights, strict=True):
            target: dns.name.Name = rd.target
            if target == dns.name.root:
                continue
            ips, target_ttl = self._addresses(target, answer.response.additional, deadline)
            if not ips:
                _log.debug(
                    "resilient: discovery %s: SRV target %s has no address", self.name, target
                )
                continue
            ttl = min(ttl, target_ttl)
            host = target.to_text(omit_final_dot=True)
            for ip in ips:
                endpoints.append(
                    Endpoint(
                        _url(self.scheme, ip, int(rd.port)),
                        weight=weight / len(ips),
                        priority=int(rd.priority),
                        id=host,
                        metadata={"host": host, "srv_weight": int(rd.weight)},
                    )
                )
        if not endpoints:
            raise LookupError(f"no SRV target of {self.name} has an A or AAAA record")
        endpoints.sort(key=lambda e: (e.priority, e.url))
        return endpoints, ttl

    def _addresses(
        self, host: dns.name.Name, additional: Iterable[dns.rrset.RRset], deadline: float
    ) -> tuple[list[str], float]:
        """The IPs of ``host`` (from ``additional`` if it has them) and their smallest TTL."""
        import dns.rdatatype
        import dns.rdtypes.IN.A
        import dns.rdtypes.IN.AAAA
        import dns.resolver

        kinds = (dns.rdatatype.A, dns.rdatatype.AAAA)
        rrsets: list[tuple[dns.rrset.RRset, float]] = [
            (rrset, float(rrset.ttl))
            for rrset in additional
            if rrset.name == host and rrset.rdtype in kinds
        ]
        if not rrsets:
            for kind in kinds:
                try:
                    answer = self._query(host, kind, deadline)
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    continue
                if answer.rrset is not None:
                    rrsets.append((answer.rrset, float(answer.chaining_result.minimum_ttl)))
        ips = [
            str(rd.address)
            for rrset, _ in rrsets
            for rd in rrset
            if isinstance(rd, (dns.rdtypes.IN.A.A, dns.rdtypes.IN.AAAA.AAAA))
        ]
        return ips, min((ttl for _, ttl in rrsets), default=self.max_ttl)

    def _query(self, qname: dns.name.Name, rdtype: Any, deadline: float) -> dns.resolver.Answer:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"resolving {self.name} took longer than timeout={self.timeout}s")
        return self._resolver.resolve(qname, rdtype, lifetime=left, search=False)


def _check_port(field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ValueError(f"{field} must be an integer port in 1..65535, got {value!r}")


def _make_resolver(nameserver: str | Sequence[str] | None, port: int) -> dns.resolver.Resolver:
    import dns.resolver

    if nameserver is None:
        resolver = dns.resolver.Resolver()  # the system's /etc/resolv.conf
    else:
        servers = [nameserver] if isinstance(nameserver, str) else list(nameserver)
        if not servers:
            raise ValueError("nameserver must name at least one IP address, got none")
        for server in servers:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ValueError(
                    f"nameserver must be an IP address, got {redact(server)!r}"
                ) from None
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = servers
    resolver.port = port
    return resolver
