"""`Replica.url_for`: a service's URL moved onto one replica, made without parsing it again."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient.balancing import _replica
from resilient.balancing._replica import Replica
from resilient.discovery import Endpoint

REPLICA_URLS = st.builds(
    lambda scheme, host, port, prefix: f"{scheme}://{host}{port}{prefix}",
    st.sampled_from(["http", "https"]),
    st.sampled_from(["127.0.0.1", "[::1]", "bücher.example", "xn--bcher-kva.example", "a-b.c"]),
    st.sampled_from(["", ":80", ":443", ":8001", ":65535"]),
    st.sampled_from(["", "/", "/api", "/api/", "/a%20b/c", "/ü/x"]),
)
PATH_CHARS = st.sampled_from(list("abcXYZ019-._~!$&'()*+,;=:@/%20ü é?#"))
LOGICAL_URLS = st.builds(
    lambda path, query, fragment: f"http://orders{path}{query}{fragment}",
    st.one_of(
        st.just(""),
        st.text(PATH_CHARS, max_size=12).map(lambda p: "/" + p.replace("?", "").replace("#", "")),
    ),
    st.one_of(st.just(""), st.text(PATH_CHARS, max_size=8).map(lambda q: "?" + q.replace("#", ""))),
    st.one_of(st.just(""), st.text(PATH_CHARS, max_size=4).map(lambda f: "#" + f)),
)


def parts(url: httpx.URL) -> tuple[object, ...]:
    return (str(url), url.scheme, url.raw_host, url.port, url.raw_path, url.fragment, url.netloc)


def by_parsing(replica_url: str, logical: httpx.URL) -> httpx.URL:
    """What the replica URL should be, made the slow, public way."""
    base = httpx.URL(replica_url)
    prefix = base.raw_path.partition(b"?")[0].rstrip(b"/")
    return logical.copy_with(
        scheme=base.scheme, host=base.host, port=base.port, raw_path=prefix + logical.raw_path
    )


@given(replica_url=REPLICA_URLS, logical=LOGICAL_URLS)
def test_url_for_is_what_parsing_the_parts_again_gives(replica_url: str, logical: str) -> None:
    replica = Replica(Endpoint(replica_url))
    url = httpx.URL(logical)
    expected = by_parsing(replica_url, url)
    made = replica.url_for(url)
    assert parts(made) == parts(expected)
    assert made == expected and hash(made) == hash(expected)
    # What httpx sends: the request line's target and the connection's origin.
    request = httpx.Request("GET", made)
    assert request.url.raw_path == expected.raw_path
    assert (request.url.scheme, request.url.raw_host, request.url.port) == (
        expected.scheme,
        expected.raw_host,
        expected.port,
    )
    assert url == httpx.URL(logical)  # the service's URL is left as it was


def test_the_shortcut_is_checked_and_in_use_with_this_httpx() -> None:
    # If a future httpx changed its parsed form, the import-time check would turn the shortcut
    # off; this test says so loudly rather than letting requests slow down unnoticed.
    assert _replica._ORIGIN_SWAP_WORKS


def test_without_the_shortcut_url_for_parses_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_replica, "_ORIGIN_SWAP_WORKS", False)
    replica = Replica(Endpoint("https://[::1]:8443/api/"))
    made = replica.url_for(httpx.URL("http://orders/v1/items?q=a%20b#top"))
    assert str(made) == "https://[::1]:8443/api/v1/items?q=a%20b#top"
    assert replica.url_for(httpx.URL("http://orders")).raw_path == b"/api/"
