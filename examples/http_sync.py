"""httpx.Client through rs.ResilientTransport, against two local replica servers.

Starts an `rs.testing.Fleet` of two real HTTP servers on loopback, then shows:

1. retries: replica 0 answers 503 to half the requests; GETs to it still get their 200;
2. a per-request override: ``extensions={"resilient": {"attempts": 1}}``;
3. a POST retried safely because it carries an ``Idempotency-Key`` (one without a key is not);
4. stale-if-error: replica 1 goes down, and the last good answer is served, marked stale.

Exits 1 if anything behaves other than described. Run: python examples/http_sync.py
"""

from __future__ import annotations

import sys

import httpx

import resilient as rs

#: The replicas' fault draws are seeded, so every run sees the same 503s.
SEED = 44


def demo(fleet: rs.testing.Fleet) -> list[str]:
    """Run the four demonstrations; return what did not behave as described."""
    problems: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    flaky, steady = fleet.urls
    fleet[0].set_faults(error_rate=0.5)
    transport = rs.ResilientTransport(fallback=rs.http.StaleIfError(stale_for=60.0))
    with httpx.Client(transport=transport, timeout=2.0) as client:
        # 1. Retries: 503s are retried (idempotent GET, full-jitter backoff from 100 ms).
        attempts = []
        for i in range(5):
            r = client.get(f"{flaky}/items/{i}")
            expect(r.status_code == 200, f"GET /items/{i} answered {r.status_code}")
            attempts.append(r.extensions["resilient"]["attempts"])
        expect(sum(attempts) > 5, "no GET to the flaky replica needed a retry")
        print(f"retries: 5 GETs to a replica failing 50%: all 200, attempts {attempts}")

        # 2. A per-request override: one attempt for this request only.
        url = f"{steady}/report?status=503"  # the replica answers 503 when asked to
        default = client.get(url).extensions["resilient"]["attempts"]
        r = client.get(url, extensions={"resilient": {"attempts": 1}})
        once = r.extensions["resilient"]["attempts"]
        expect(default == 3 and once == 1, f"503 attempts: {default} by default, {once}")
        expect(r.status_code == 503, f"the override answered {r.status_code}, not 503")
        print(f"override: a 503 took {default} attempts by default, {once} with attempts=1")

        # 3. POST: retried only with an Idempotency-Key, which the server can deduplicate on.
        order = {"item": "apple", "quantity": 2}
        r = client.post(f"{flaky}/orders", json=order, headers={"Idempotency-Key": "order-7"})
        keyed = r.extensions["resilient"]["attempts"]
        seen = fleet[0].counts().by_key.get("order-7", 0)
        expect(r.status_code == 200, f"keyed POST answered {r.status_code}")
        expect(keyed > 1 and seen == keyed, f"keyed POST: {keyed} attempts, server saw {seen}")
        r = client.post(f"{flaky}/orders", json=order)
        unkeyed = r.extensions["resilient"]["attempts"]
        expect(unkeyed == 1, f"a POST without a key was sent {unkeyed} times")
        print(
            f"idempotency: keyed POST 200 after {keyed} attempts; "
            f"unkeyed POST {r.status_code} after {unkeyed} (never retried)"
        )

        # 4. Stale-if-error: the last good GET answer, served when every attempt fails.
        fresh = client.get(f"{steady}/catalog")
        expect(fresh.status_code == 200, f"GET /catalog answered {fresh.status_code}")
        fleet[1].go_down()  # connections refused from now on
        r = client.get(f"{steady}/catalog")
        stale = r.extensions["resilient"]["stale"]
        age = r.headers.get(rs.http.STALE_HEADER)
        expect(r.status_code == 200 and stale, f"replica down: {r.status_code}, stale={stale}")
        expect(r.content == fresh.content, "the stale answer differs from the cached one")
        print(f"stale-if-error: replica 1 down, served the cached /catalog (age {age} s)")
    return problems


def main() -> int:
    with rs.testing.Fleet(2, seed=SEED) as fleet:
        problems = demo(fleet)
    if problems:
        print(f"http_sync: UNEXPECTED: {'; '.join(problems)}")
        return 1
    print("http_sync: all 4 demonstrations behaved as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
