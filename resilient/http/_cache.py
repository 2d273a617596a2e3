"""Degraded answers: the last good response for a GET, served when every attempt failed.

RFC 5861 ``stale-if-error``: a response may be served stale for ``N`` seconds after it was received
when the origin errs; the server's ``Cache-Control: stale-if-error=N`` wins over the default, and
``no-store`` keeps a response out. The body is captured as the caller reads it (a tee on the
response stream), so the response the caller gets stays streamable.

One transport often serves many users, so this is a shared cache (RFC 9111): ``private``
answers, answers to authenticated requests not marked ``public`` and ``Vary: *`` answers are not
kept; an answer is served only to a request with the same values of the headers its ``Vary``
names, and the same ``Host``; ``Set-Cookie`` is never replayed. ``no-cache`` and
``must-revalidate`` answers are not served stale unless the server allowed it with
``stale-if-error``. A successful unsafe request (PUT, POST, DELETE, PATCH) to a URL drops its
entry (RFC 9111 §4.4).
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import httpx

from resilient._clock import Clock
from resilient.policies._common import check_count, check_positive, resolve_clock

__all__ = ["STALE_HEADER", "StaleIfError"]

#: Set on a stale answer; its value is the answer's age in whole seconds.
STALE_HEADER = "X-Resilient-Stale"

_STALE_IF_ERROR = re.compile(r"stale-if-error\s*=\s*\"?(\d+)", re.IGNORECASE)
_PUBLIC = re.compile(r"(^|,)\s*public\s*(,|$)", re.IGNORECASE)
_NO_STORE = re.compile(r"(^|,)\s*no-store\s*(,|$)", re.IGNORECASE)
# "private", bare or naming fields (private="Set-Cookie"): a shared cache keeps none of it.
_PRIVATE = re.compile(r"(^|,)\s*private\s*(=|,|$)", re.IGNORECASE)
_REVALIDATE = re.compile(r"(^|,)\s*(no-cache|must-revalidate|proxy-revalidate)\s*(=|,|$)", re.I)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


@dataclass(frozen=True, slots=True)
class _Entry:
    status: int
    headers: list[tuple[bytes, bytes]]
    content: bytes
    stored_at: float
    stale_for: float
    vary: tuple[tuple[str, str | None], ...]  # the request's values of the headers Vary names


def _key(request: httpx.Request, url: httpx.URL | None = None) -> str:
    """The entry's key: ``url`` (a service's own URL) or the request's, with its ``Host`` header
    when that names another host (virtual hosts on one address)."""
    # userinfo never becomes part of a key: keys may be listed in debugging output
    key = str((url or request.url).copy_with(username=None, password=None))
    if url is None:
        host = request.headers.get("host")
        if host is not None and host.lower() != request.url.netloc.decode("ascii").lower():
            key += f" host={host.lower()}"
        sni = request.extensions.get("sni_hostname")
        if sni:
            key += f" sni={sni}"
    return key


def _vary_names(response: httpx.Response) -> list[str]:
    """The header names the response's ``Vary`` lists, lowercased and sorted (``*``: all)."""
    return sorted(
        {
            name.strip().lower()
            for value in response.headers.get_list("vary")
            for name in value.split(",")
            if name.strip()
        }
    )


def _vary(request: httpx.Request, response: httpx.Response) -> tuple[tuple[str, str | None], ...]:
    """The request's values of the headers the response's ``Vary`` names."""
    return tuple((name, request.headers.get(name)) for name in _vary_names(response))


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class StaleIfError:
    """A bounded in-memory cache of good GET responses, served stale when the origin fails.

    ``max_entries`` bounds the number of URLs kept (least recently stored go first),
    ``max_body_bytes`` skips large bodies, ``stale_for`` is how long an answer may be served stale
    when the server did not say (``Cache-Control: stale-if-error=N`` overrides it).

    A stale answer carries the header ``X-Resilient-Stale: <age in seconds>`` and
    ``response.extensions["resilient"]["stale"] == True``.

    Example::

        transport = rs.ResilientTransport(fallback=rs.http.StaleIfError(stale_for=300))
        client = httpx.Client(transport=transport)
        r = client.get("http://catalog/items")
        if r.extensions["resilient"]["stale"]:
            ...  # a degraded answer
    """

    max_entries: int = 1024
    max_body_bytes: int = 1 << 20
    stale_for: float = 300.0
    clock: Clock | None = None
    _clock: Clock = field(init=False, repr=False)
    _entries: OrderedDict[str, _Entry] = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_count("max_entries", self.max_entries)
        check_count("max_body_bytes", self.max_body_bytes, minimum=0)
        check_positive("stale_for", self.stale_for)
        object.__setattr__(self, "_clock", resolve_clock(self.clock))
        object.__setattr__(self, "_entries", OrderedDict())
        object.__setattr__(self, "_lock", threading.Lock())

    def __len__(self) -> int:
        return len(self._entries)

    def _stale_window(self, request: httpx.Request, response: httpx.Response) -> float | None:
        """How long this response may be served stale, or None if it must not be kept."""
        # ``response.request`` is not set yet inside a transport: the client sets it afterwards.
        if request.method != "GET" or response.status_code != 200:
            return None
        cache_control = response.headers.get("cache-control", "")
        if (
            _NO_STORE.search(cache_control)
            or _PRIVATE.search(cache_control)
            or _NO_STORE.search(request.headers.get("cache-control", ""))
            or "*" in _vary_names(response)
        ):
            return None
        # One transport often serves many users: an answer to an authenticated request is kept
        # only when the server marked it public (as a shared cache must, RFC 9111 §3.5).
        if (
            "authorization" in request.headers or "cookie" in request.headers
        ) and not _PUBLIC.search(cache_control):
            return None
        match = _STALE_IF_ERROR.search(cache_control)
        if match:
            return float(match.group(1))
        if _REVALIDATE.search(cache_control):
            return None  # never served stale without the server's leave (RFC 9111 §4.2.4)
        return self.stale_for

    def _store(
        self,
        key: str,
        status: int,
        headers: list[tuple[bytes, bytes]],
        stale_for: float,
        vary: tuple[tuple[str, str | None], ...],
        content: bytes,
    ) -> None:
        """Keep an answer (all but its body taken when it came) once its body is read."""
        entry = _Entry(status, headers, content, self._clock.monotonic(), stale_for, vary)
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def wrap(
        self, request: httpx.Request, response: httpx.Response, url: httpx.URL | None = None
    ) -> httpx.Response:
        """Arrange for a good GET response to be kept once the caller has read all of it, under
        ``url`` (a service's own URL, for a request sent to one of its replicas) or the
        request's."""
        stale_for = self._stale_window(request, response)
        if stale_for is None:
            return response
        # Made now: the request may be sent elsewhere (its URL and Host set for another replica)
        # before the body is read.
        store = functools.partial(
            self._store,
            _key(request, url),
            response.status_code,
            # Never replayed: a session cookie set for one caller would go to another.
            [(k, v) for k, v in response.headers.raw if k.lower() != b"set-cookie"],
            stale_for,
            _vary(request, response),
        )
        try:
            content = response.content  # the inner transport may have read the body already
        except httpx.ResponseNotRead:
            response.stream = _Tee(response.stream, store, self.max_body_bytes)
        else:
            store(content)
        return response

    def invalidate(self, request: httpx.Request, url: httpx.URL | None = None) -> None:
        """After a successful unsafe request (PUT, POST, DELETE, PATCH): drop the URL's entry,
        which no longer stands for what the origin holds (RFC 9111 §4.4)."""
        if request.method in _SAFE_METHODS:
            return
        with self._lock:
            self._entries.pop(_key(request, url), None)

    def lookup(self, request: httpx.Request, url: httpx.URL | None = None) -> httpx.Response | None:
        """A stale copy of the last good answer to this GET (kept under ``url``, if given), if
        one may still be served."""
        if request.method != "GET":
            return None
        with self._lock:
            entry = self._entries.get(_key(request, url))
        if entry is None or any(request.headers.get(name) != value for name, value in entry.vary):
            return None
        age = self._clock.monotonic() - entry.stored_at
        if age > entry.stale_for:
            return None
        response = httpx.Response(
            entry.status, headers=entry.headers, content=entry.content, request=request
        )
        response.headers[STALE_HEADER] = str(int(age))
        return response


class _Tee(httpx.SyncByteStream, httpx.AsyncByteStream):
    """Pass the body through to the caller and keep a copy; store it when the body is complete."""

    def __init__(
        self,
        inner: httpx.SyncByteStream | httpx.AsyncByteStream,
        store: Callable[[bytes], None],
        max_bytes: int,
    ):
        self._inner = inner
        self._store = store
        self._max_bytes = max_bytes
        self._parts: list[bytes] | None = []
        self._size = 0

    def _keep(self, chunk: bytes) -> None:
        if self._parts is None:
            return
        self._size += len(chunk)
        if self._size > self._max_bytes:
            self._parts = None
        else:
            self._parts.append(chunk)

    def _done(self) -> None:
        if self._parts is not None:
            self._store(b"".join(self._parts))
            self._parts = None

    def __iter__(self) -> Iterator[bytes]:
        assert isinstance(self._inner, httpx.SyncByteStream)
        for chunk in self._inner:
            self._keep(chunk)
            yield chunk
        self._done()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self._inner, httpx.AsyncByteStream)
        async for chunk in self._inner:
            self._keep(chunk)
            yield chunk
        self._done()

    def close(self) -> None:
        if isinstance(self._inner, httpx.SyncByteStream):
            self._inner.close()

    async def aclose(self) -> None:
        if isinstance(self._inner, httpx.AsyncByteStream):
            await self._inner.aclose()
