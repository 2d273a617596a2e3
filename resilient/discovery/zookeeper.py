"""ZooKeeper discovery and registration, in Apache Curator's ``ServiceInstance`` format.

Layout (Curator x-discovery's): a service is a path such as ``/services/orders``; each replica is
a child node named by its instance id whose data is Curator's JSON::

    {"name": "orders", "id": "4f1c...", "address": "10.0.0.7", "port": 8080, "sslPort": null,
     "payload": {"zone": "a"}, "registrationTimeUTC": 1712345678901, "serviceType": "DYNAMIC",
     "uriSpec": {"parts": [{"value": "scheme", "variable": true}, ...]}}

so replicas that Java services register with Curator (or Spring Cloud Zookeeper) are found by
:class:`ZooKeeper`, and servers registered by :func:`register_zookeeper` are found by Curator.

kazoo is an optional dependency (``pip install 'resilient[zookeeper]'``); it is imported only
when a ZooKeeper source or registration is created.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType, SimpleNamespace
from typing import Any, Literal

import httpx

from resilient.discovery._base import Endpoint, Source
from resilient.telemetry import redact

__all__ = ["ZooKeeper", "register_zookeeper"]

_log = logging.getLogger("resilient.discovery")

_MISSING_KAZOO = (
    "ZooKeeper discovery needs kazoo: install the 'zookeeper' extra, "
    "pip install 'resilient[zookeeper]'"
)

# Reconnection cadence while ZooKeeper is unreachable: fast at first, then about once a second
# (as the Java client does), so a session survives a short outage and close() stays prompt.
_CONNECT_RETRY = {"max_tries": -1, "delay": 0.1, "backoff": 2, "max_jitter": 0.4, "max_delay": 1.0}


def _kazoo() -> Any:
    """The kazoo names this module uses, imported on first need."""
    try:
        from kazoo.client import (  # type: ignore[import-untyped,unused-ignore]
            KazooClient,
            KazooState,
        )
        from kazoo.exceptions import (  # type: ignore[import-untyped,unused-ignore]
            ConnectionLoss,
            KazooException,
            NodeExistsError,
            NoNodeError,
            SessionExpiredError,
        )
        from kazoo.handlers.threading import (  # type: ignore[import-untyped,unused-ignore]
            KazooTimeoutError,
        )
        from kazoo.retry import KazooRetry  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise ImportError(_MISSING_KAZOO) from exc
    return SimpleNamespace(
        KazooClient=KazooClient,
        KazooState=KazooState,
        KazooRetry=KazooRetry,
        ConnectionLoss=ConnectionLoss,
        KazooException=KazooException,
        NodeExistsError=NodeExistsError,
        NoNodeError=NoNodeError,
        SessionExpiredError=SessionExpiredError,
        KazooTimeoutError=KazooTimeoutError,
        # What a failed ZooKeeper call can raise besides a KazooException.
        errors=(KazooException, KazooTimeoutError, OSError),
    )


def _new_client(k: Any, hosts: str, session_timeout: float) -> Any:
    return k.KazooClient(
        hosts=hosts, timeout=session_timeout, connection_retry=k.KazooRetry(**_CONNECT_RETRY)
    )


def _check_seconds(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number of seconds > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{field} must be > 0 seconds, got {value!r}")
    return float(value)


def _check_path(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "//" in path:
        raise ValueError(
            f"path must be an absolute ZooKeeper path like '/services/orders', got {path!r}"
        )
    return path.rstrip("/") or "/"


def _hosts_string(hosts: str | Sequence[str] | None) -> str | None:
    if hosts is None:
        return None
    text = hosts if isinstance(hosts, str) else ",".join(hosts)
    if not text.strip():
        raise ValueError(f"hosts must name at least one ZooKeeper server, got {hosts!r}")
    return text


def _join(path: str, child: str) -> str:
    return f"{path.rstrip('/')}/{child}"


class _Pump:
    """A daemon thread that runs ``job`` whenever kicked; kicks coalesce.

    ``job()`` returns False to be run again after a growing delay (0.1 s doubling to 5 s) unless
    kicked earlier; an exception from it is logged and counts as False.
    """

    def __init__(self, job: Callable[[], bool], name: str) -> None:
        self._job = job
        self._cond = threading.Condition()
        self._kicked = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        with self._cond:
            self._kicked = True
            self._cond.notify()

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        delay: float | None = None
        backoff = 0.1
        while True:
            with self._cond:
                if not self._kicked and not self._stopped:
                    self._cond.wait(delay)
                if self._stopped:
                    return
                self._kicked = False
            try:
                done = self._job()
            except Exception:
                _log.exception("resilient: ZooKeeper background task %s failed", self._thread.name)
                done = False
            if done:
                delay, backoff = None, 0.1
            else:
                delay, backoff = backoff, min(backoff * 2, 5.0)


# -- Curator's ServiceInstance ---------------------------------------------------------------


def _port(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{key} must be a port number or null, got {value!r}")
    return value


def _hints(payload: Any) -> dict[str, Any]:
    """weight, zone and priority from a payload: its top level, else its ``metadata`` map
    (Spring Cloud Zookeeper puts user metadata there, as strings)."""
    found: dict[str, Any] = {}
    if not isinstance(payload, Mapping):
        return found
    layers = [payload]
    if isinstance(payload.get("metadata"), Mapping):
        layers.append(payload["metadata"])
    for key in ("weight", "zone", "priority"):
        for layer in layers:
            if layer.get(key) is not None:
                found[key] = layer[key]
                break
    hints: dict[str, Any] = {}
    if "weight" in found:
        weight = found["weight"]
        try:
            if isinstance(weight, bool):
                raise ValueError
            hints["weight"] = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"payload weight must be a number, got {weight!r}") from None
        if not math.isfinite(hints["weight"]):
            raise ValueError(f"payload weight must be finite, got {weight!r}")
    if "zone" in found:
        if not isinstance(found["zone"], str):
            raise ValueError(f"payload zone must be a string, got {found['zone']!r}")
        hints["zone"] = found["zone"]
    if "priority" in found:
        priority = found["priority"]
        try:
            if isinstance(priority, (bool, float)):
                raise ValueError
            hints["priority"] = int(priority)
        except (TypeError, ValueError):
            raise ValueError(f"payload priority must be an integer, got {priority!r}") from None
    return hints


def _parse_instance(data: bytes, node: str, scheme: str) -> Endpoint | None:
    """One node's data as an Endpoint; None for an instance Curator marks disabled.

    Raises ValueError (saying why) for data that is not a usable ServiceInstance.
    """
    try:
        obj = json.loads(data)
    except ValueError as exc:  # also UnicodeDecodeError
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object but {type(obj).__name__}")
    if obj.get("enabled") is False:
        return None
    address = obj.get("address")
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"address must be a host name or IP, got {address!r}")
    instance_id = obj.get("id", node)
    if not isinstance(instance_id, str) or not instance_id:
        raise ValueError(f"id must be a non-empty string, got {instance_id!r}")
    port, ssl_port = _port(obj, "port"), _port(obj, "sslPort")
    if port is None and ssl_port is None:
        raise ValueError("neither port nor sslPort is set")
    if scheme == "https" or (scheme == "auto" and ssl_port is not None) or port is None:
        if ssl_port is None:
            raise ValueError("no sslPort, and scheme='https' requires one")
        url_scheme, url_port = "https", ssl_port
    else:
        url_scheme, url_port = "http", port
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    payload = obj.get("payload")
    if isinstance(payload, Mapping):
        metadata: Mapping[str, Any] = MappingProxyType(dict(payload))
    elif payload is None:
        metadata = MappingProxyType({})
    else:
        metadata = MappingProxyType({"payload": payload})
    try:
        return Endpoint(
            f"{url_scheme}://{host}:{url_port}",
            id=instance_id,
            metadata=metadata,
            **_hints(payload),
        )
    except httpx.InvalidURL as exc:
        raise ValueError(str(exc)) from None


def _instance_json(
    url: str, *, id: str, name: str, payload: Any, registration_time_ms: int
) -> bytes:
    """Curator's JSON for a server at ``url`` (``http(s)://host[:port]``, no path)."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"url must be an http(s) URL with a host, got {redact(url)!r}")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.userinfo:
        raise ValueError(
            f"url must be scheme://host:port with no path, query or userinfo, got {redact(url)!r}"
        )
    Endpoint(url, **_hints(payload))  # weight, zone, priority: what every reader will demand
    https = parsed.scheme == "https"
    port = parsed.port or (443 if https else 80)
    port_variable = "ssl-port" if https else "port"
    document = {
        "name": name,
        "id": id,
        "address": parsed.host,
        "port": None if https else port,
        "sslPort": port if https else None,
        "payload": payload,
        "registrationTimeUTC": registration_time_ms,
        "serviceType": "DYNAMIC",
        # What Curator's ServiceInstance.buildUriSpec() (and Spring Cloud) turn into the URL.
        "uriSpec": {
            "parts": [
                {"value": "scheme", "variable": True},
                {"value": "://", "variable": False},
                {"value": "address", "variable": True},
                {"value": ":", "variable": False},
                {"value": port_variable, "variable": True},
            ]
        },
    }
    try:
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"payload must be JSON-serializable, got {payload!r} ({exc})") from None


# -- discovery ----------------------------------------------------------------------------------


class ZooKeeper(Source):
    """Replicas registered under a ZooKeeper path, kept current by watches.

    Each child of ``path`` is read as a Curator ``ServiceInstance``: the URL is
    ``http://address:port``, or ``https://address:sslPort`` when ``scheme`` asks for TLS
    (``"https"``: sslPort only; ``"auto"``: sslPort when present, as Curator's own ``{scheme}``
    does; ``"http"``, the default: the plain port, sslPort only for instances with no other).
    ``Endpoint.id`` is the instance id and ``Endpoint.metadata`` the payload; a payload that
    carries ``weight``, ``zone`` or ``priority`` (at its top level or in its ``metadata`` map, as
    Spring Cloud writes it) sets them. A node that is not a usable instance is skipped with one
    warning per version of the node; instances Curator marks ``"enabled": false`` are left out.

    ``start()`` connects and reads the list before returning, waiting at most
    ``connect_timeout`` seconds; if ZooKeeper is unreachable it returns anyway with an empty list
    and keeps connecting in the background. When the connection or session is lost, the last
    good list stays in service; once reconnected, watches are set again and the fresh list is
    published. ``close()`` stops every thread the source started. Pass ``client=`` to use a
    `kazoo.client.KazooClient` you start and stop yourself (``hosts`` is then ignored and may be
    None); ``name`` names the source in logs.

    Example::

        orders = rs.discovery.ZooKeeper("zk1:2181,zk2:2181", "/services/orders")
        transport = rs.ResilientTransport(services={"orders": orders})
    """

    def __init__(
        self,
        hosts: str | Sequence[str] | None,
        path: str,
        *,
        name: str | None = None,
        scheme: Literal["http", "https", "auto"] = "http",
        session_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        client: Any = None,
    ) -> None:
        self._path = _check_path(path)
        self._hosts = _hosts_string(hosts)
        if self._hosts is None and client is None:
            raise ValueError("hosts must name the ZooKeeper servers when no client is given")
        if scheme not in ("http", "https", "auto"):
            raise ValueError(f"scheme must be 'http', 'https' or 'auto', got {scheme!r}")
        self._scheme = scheme
        self._session_timeout = _check_seconds("session_timeout", session_timeout)
        self._connect_timeout = _check_seconds("connect_timeout", connect_timeout)
        self._k = _kazoo()
        super().__init__(name or f"zookeeper:{self._path}")
        self._client = client
        self._owns_client = client is None
        self._state_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._full = True  # re-read every node (first read, after a reconnect)
        self._stale: set[str] = set()  # nodes whose data watch fired
        self._nodes: dict[str, tuple[int, Endpoint | None]] = {}  # pump thread only
        self._warned: set[tuple[str, int]] = set()  # (node, mzxid) already reported
        self._missing_warned = False
        self._first = threading.Event()
        self._pump = _Pump(self._refresh, f"resilient-zookeeper {self._path}")

    def __repr__(self) -> str:
        return f"ZooKeeper({self._hosts!r}, {self._path!r})"

    def start(self) -> None:
        """Connect, read the replicas (waiting at most ``connect_timeout``), and keep watching.

        A ZooKeeper that does not answer in time is not an error: the source keeps trying in
        the background. A start() that raises (a bad host string, Ctrl-C during its wait)
        closes the source, and a closed source does not start again: make a new one."""
        with self._state_lock:
            if self._started or self._closed:
                return
            self._started = True
        try:
            self._connect()
        except BaseException:  # a bad host string, a Ctrl-C during the wait: nothing runs on
            self.close()
            raise

    def _connect(self) -> None:
        if self._client is None:
            self._client = _new_client(self._k, self._hosts or "", self._session_timeout)
        self._client.add_listener(self._on_state)
        self._pump.start()
        if self._owns_client:
            self._client.start_async()
        if self._client.connected:
            self._pump.kick()
        if not self._first.wait(self._connect_timeout):
            self._failed(
                TimeoutError(
                    f"no answer from ZooKeeper at {self._hosts or 'the given client'} "
                    f"within {self._connect_timeout:g} s; retrying in the background"
                )
            )

    def close(self) -> None:
        """Stop watching; stop the kazoo client if this source created it."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        if not started:
            return
        client = self._client
        if client is None:  # its start() failed before a client was made
            return
        client.remove_listener(self._on_state)
        if self._owns_client:
            # Stopping first fails the pump's outstanding request at once.
            client.stop()
            client.close()
        self._pump.stop(self._session_timeout + 1.0)

    # kazoo callbacks: never block (they run on kazoo's threads)

    def _on_state(self, state: str) -> None:
        states = self._k.KazooState
        if self._closed:
            return
        if state == states.CONNECTED:
            with self._state_lock:
                self._full = True
            self._pump.kick()
        elif state == states.SUSPENDED:
            self._failed(self._k.ConnectionLoss("connection to ZooKeeper lost; reconnecting"))
        elif state == states.LOST:
            self._failed(self._k.SessionExpiredError("ZooKeeper session lost; reconnecting"))

    def _on_children(self, event: Any) -> None:
        if not self._closed:
            self._pump.kick()

    def _on_data(self, event: Any) -> None:
        if self._closed:
            return
        path = getattr(event, "path", None)
        with self._state_lock:
            if isinstance(path, str) and path.startswith(self._path):
                self._stale.add(path.rsplit("/", 1)[-1])
            else:  # a session event: kazoo dropped every watch
                self._full = True
        self._pump.kick()

    # the pump's job

    def _refresh(self) -> bool:
        client = self._client
        if self._closed or not client.connected:
            return True  # the CONNECTED listener kicks us again
        with self._state_lock:
            full, stale = self._full, self._stale
            self._full, self._stale = False, set()
        try:
            self._read(client, full, stale)
        except self._k.errors as exc:
            with self._state_lock:
                self._full = self._full or full
                self._stale |= stale
            if not self._closed:
                self._failed(exc)
            return False
        self._first.set()
        return True

    def _read(self, client: Any, full: bool, stale: set[str]) -> None:
        k, timeout = self._k, self._session_timeout
        try:
            children = client.get_children_async(self._path, watch=self._on_children).get(timeout)
        except k.NoNodeError:
            # No such service yet: watch for the path to appear.
            if client.exists_async(self._path, watch=self._on_children).get(timeout) is not None:
                raise k.ConnectionLoss(f"{self._path} appeared while being read") from None
            if not self._missing_warned:
                self._missing_warned = True
                _log.warning(
                    "resilient: discovery %s: ZooKeeper path %s does not exist (no replicas)",
                    self.name,
                    self._path,
                )
            children = []
        else:
            self._missing_warned = False
        pending = {
            child: client.get_async(_join(self._path, child), watch=self._on_data)
            for child in children
            if full or child in stale or child not in self._nodes
        }
        nodes: dict[str, tuple[int, Endpoint | None]] = {}
        for child in sorted(children):
            if child not in pending:
                nodes[child] = self._nodes[child]
                continue
            try:
                data, stat = pending[child].get(timeout)
            except k.NoNodeError:
                continue  # deleted since the listing; the children watch fires too
            nodes[child] = (stat.mzxid, self._parse(child, data, stat.mzxid))
        self._nodes = nodes
        self._warned = {w for w in self._warned if nodes.get(w[0], (None,))[0] == w[1]}
        self._publish(e for _, e in nodes.values() if e is not None)

    def _parse(self, child: str, data: bytes | None, version: int) -> Endpoint | None:
        try:
            return _parse_instance(data or b"", child, self._scheme)
        except Exception as exc:  # a bad node must never stop discovery
            if (child, version) not in self._warned:
                self._warned.add((child, version))
                _log.warning(
                    "resilient: discovery %s: skipping ZooKeeper node %s: not a Curator "
                    "ServiceInstance: %s",
                    self.name,
                    _join(self._path, child),
                    exc,
                )
            return None


# -- registration ------------------------------------------------------------------------------


class _Registration:
    """One ephemeral node kept registered for as long as the context is open."""

    def __init__(self, client: Any, owns_client: bool, node: str, data: bytes, k: Any) -> None:
        self._client = client
        self._owns_client = owns_client
        self._node = node
        self._data = data
        self._k = k
        self._closed = False
        self._lost = False
        self._timeout = 10.0
        self._pump = _Pump(self._ensure, f"resilient-zookeeper-register {node}")

    def open(self, timeout: float) -> None:
        self._timeout = timeout
        self._client.add_listener(self._on_state)
        try:
            self._create()
        except BaseException:
            self._client.remove_listener(self._on_state)
            raise
        self._pump.start()

    def close(self) -> None:
        self._closed = True
        self._client.remove_listener(self._on_state)
        self._pump.stop(self._timeout)
        try:
            if not self._client.connected:
                raise self._k.ConnectionLoss("not connected")
            stat = self._client.exists_async(self._node).get(self._timeout)
            if stat is not None and stat.ephemeralOwner == self._session_id():
                self._client.delete_async(self._node, version=stat.version).get(self._timeout)
        except self._k.errors as exc:
            # Not ours any more, or ZooKeeper unreachable: the node ends with our session.
            _log.debug("resilient: could not delete %s on exit: %r", self._node, exc)
        finally:
            if self._owns_client:
                self._client.stop()
                self._client.close()

    def _session_id(self) -> int | None:
        client_id = self._client.client_id
        return None if client_id is None else int(client_id[0])

    def _create(self) -> None:
        """Create the node, replacing one left by another session (as Curator does)."""
        client, k = self._client, self._k
        for _ in range(5):
            try:
                client.create_async(self._node, self._data, ephemeral=True, makepath=True).get(
                    self._timeout
                )
                return
            except k.NodeExistsError:
                stat = client.exists_async(self._node).get(self._timeout)
                if stat is None:
                    continue
                if stat.ephemeralOwner == self._session_id():
                    client.set_async(self._node, self._data, version=stat.version).get(
                        self._timeout
                    )
                    return
                try:
                    client.delete_async(self._node, version=stat.version).get(self._timeout)
                except k.NoNodeError:
                    pass
        raise k.NodeExistsError(f"{self._node} kept being re-created by another client")

    def _on_state(self, state: str) -> None:
        if self._closed:
            return
        if state == self._k.KazooState.LOST:
            self._lost = True
        elif state == self._k.KazooState.CONNECTED:
            self._pump.kick()

    def _ensure(self) -> bool:
        if self._closed or not self._client.connected:
            return True  # the CONNECTED listener kicks us again
        try:
            stat = self._client.exists_async(self._node).get(self._timeout)
            if stat is None or stat.ephemeralOwner != self._session_id():
                self._create()
                _log.warning(
                    "resilient: re-registered %s in ZooKeeper%s",
                    self._node,
                    " after its session expired" if self._lost else "",
                )
            self._lost = False
        except self._k.errors as exc:
            _log.warning("resilient: could not re-register %s in ZooKeeper: %r", self._node, exc)
            return False
        return True


@contextmanager
def register_zookeeper(
    hosts: str | Sequence[str] | None,
    path: str,
    url: str,
    *,
    id: str | None = None,
    name: str | None = None,
    payload: Any = None,
    client: Any = None,
    session_timeout: float = 10.0,
    connect_timeout: float = 10.0,
) -> Iterator[str]:
    """Register a server at ``url`` under ``path`` for as long as the ``with`` block runs.

    Creates the EPHEMERAL node ``path/<id>`` holding a Curator ``ServiceInstance`` (``name``
    defaults to the last part of ``path``, ``id`` to a random UUID, ``serviceType`` is
    ``"DYNAMIC"``), so the replica disappears when its ZooKeeper session ends — if the process
    dies, within ``session_timeout``. If the session expires while the block runs, the node is
    created again in the new session. Leaving the block deletes it. ``url`` is
    ``http(s)://host:port``; an https URL is registered as Curator's ``sslPort``. ``payload`` is
    any JSON value; ``{"weight": 2, "zone": "a"}`` sets those for :class:`ZooKeeper` readers.
    Pass ``client=`` to use a started `kazoo.client.KazooClient` you own (it is not stopped).
    Raises kazoo's error if ZooKeeper cannot be reached within ``connect_timeout`` seconds.
    Yields the node's path.

    Example::

        with rs.discovery.register_zookeeper("zk1:2181", "/services/orders", "http://10.0.0.7:8080"):
            serve_forever()
    """
    base = _check_path(path)
    hosts_text = _hosts_string(hosts)
    if hosts_text is None and client is None:
        raise ValueError("hosts must name the ZooKeeper servers when no client is given")
    session_timeout = _check_seconds("session_timeout", session_timeout)
    connect_timeout = _check_seconds("connect_timeout", connect_timeout)
    instance_id = str(uuid.uuid4()) if id is None else id
    if not isinstance(instance_id, str) or not instance_id or "/" in instance_id:
        raise ValueError(f"id must be a non-empty string without '/', got {id!r}")
    service = base.rsplit("/", 1)[-1] if name is None else name
    data = _instance_json(
        url,
        id=instance_id,
        name=service,
        payload=payload,
        registration_time_ms=int(time.time() * 1000),
    )
    k = _kazoo()
    owns_client = client is None
    if owns_client:
        client = _new_client(k, hosts_text or "", session_timeout)
        client.start(timeout=connect_timeout)  # stops itself and raises when unreachable
    registration = _Registration(client, owns_client, _join(base, instance_id), data, k)
    try:
        registration.open(connect_timeout)
    except BaseException:
        if owns_client:
            client.stop()
            client.close()
        raise
    try:
        yield _join(base, instance_id)
    finally:
        registration.close()
