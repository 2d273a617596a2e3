"""Balancers, `Replica` and `ServiceRuntime`: pure picks, peak-EWMA math, membership, tiers, ejection.

Nothing here does I/O or sleeps: replicas are built from endpoints that are never contacted, time is
a `FakeClock` (or a plain float handed to ``pick``) and randomness is a seeded generator.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Collection, Sequence

import pytest

import resilient as rs
from resilient.balancing import (
    Balancer,
    LatencyWindow,
    LeastRequests,
    PowerOfTwo,
    Random,
    Replica,
    RoundRobin,
    Service,
    ServiceRuntime,
    Weighted,
)
from resilient.balancing._service import default_replica_breaker
from resilient.discovery import Endpoint, Source, Static
from resilient.testing import FakeClock

# -- helpers -----------------------------------------------------------------------------------------


def url(i: int) -> str:
    return f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:8000"


def replicas(n: int, *, weight: float = 1.0) -> list[Replica]:
    return [Replica(Endpoint(url(i), weight=weight)) for i in range(n)]


def seeded(seed: int = 7) -> Callable[[], float]:
    return random.Random(seed).random


BALANCERS: dict[str, Callable[[], Balancer]] = {
    "PowerOfTwo": lambda: PowerOfTwo(random=seeded()),
    "LeastRequests": lambda: LeastRequests(random=seeded()),
    "Random": lambda: Random(random=seeded()),
    "RoundRobin": RoundRobin,
    "Weighted": lambda: Weighted(random=seeded()),
}

every_balancer = pytest.mark.parametrize("make", list(BALANCERS.values()), ids=list(BALANCERS))


def picks(
    balancer: Balancer,
    pool: Sequence[Replica],
    n: int,
    *,
    tried: Sequence[Replica] = (),
    panic: bool = False,
    now: float = 0.0,
) -> Counter[Replica | None]:
    return Counter(balancer.pick(pool, tried, panic, now) for _ in range(n))


class Publisher(Source):
    """A discovery source a test publishes to by hand."""

    def __init__(self, endpoints: Sequence[Endpoint | str]) -> None:
        super().__init__("test")
        self.publish(endpoints)

    def publish(self, endpoints: Sequence[Endpoint | str]) -> None:
        self._publish(e if isinstance(e, Endpoint) else Endpoint(e) for e in endpoints)


def runtime(
    endpoints: Sequence[Endpoint | str],
    *,
    clock: FakeClock | None = None,
    balancer: Balancer | None = None,
    zone: str | None = None,
    max_ejection: float = 0.5,
    breaker: Callable[[str], rs.CircuitBreaker] | None = None,
) -> tuple[ServiceRuntime, Publisher, FakeClock]:
    clock = clock or FakeClock(100.0)
    source = Publisher(endpoints)
    service = Service(
        discovery=source,
        balancer=balancer or PowerOfTwo(random=seeded()),
        zone=zone,
        max_ejection=max_ejection,
        breaker=breaker,
    )
    rt = ServiceRuntime(
        "orders", service, clock=clock, hooks=(), default_breaker=default_replica_breaker
    )
    rt.refresh()
    return rt, source, clock


def breaker(replica: Replica) -> rs.CircuitBreaker:
    assert replica.breaker is not None
    return replica.breaker


def states(rt: ServiceRuntime) -> list[str]:
    return [s.state for s in rt.statistics()]


# -- every balancer ----------------------------------------------------------------------------------


@every_balancer
def test_a_pick_skips_replicas_already_tried(make: Callable[[], Balancer]) -> None:
    pool = replicas(3)
    assert picks(make(), pool, 200, tried=pool[:2]) == {pool[2]: 200}
    assert set(picks(make(), pool, 300, tried=pool[:1])) == {pool[1], pool[2]}


@every_balancer
def test_a_pick_skips_ejected_and_unhealthy_replicas_unless_in_panic(
    make: Callable[[], Balancer],
) -> None:
    pool = replicas(3)
    pool[0].ejected, pool[0].ejected_until = True, 10.0
    pool[1].unhealthy = True
    assert picks(make(), pool, 200, now=5.0) == {pool[2]: 200}
    # Panic mode ignores health, not what this request already tried.
    assert set(picks(make(), pool, 300, panic=True, now=5.0)) == set(pool)
    assert set(picks(make(), pool, 300, tried=pool[2:], panic=True, now=5.0)) == set(pool[:2])


@every_balancer
def test_an_ejected_replica_may_be_picked_again_once_its_time_is_over(
    make: Callable[[], Balancer],
) -> None:
    pool = replicas(2)
    pool[0].ejected, pool[0].ejected_until = True, 10.0
    assert pool[0] not in picks(make(), pool, 200, now=9.999)
    # That pick is its breaker's half-open probe: `ejected` is still True until the probe passes.
    assert pool[0] in picks(make(), pool, 200, now=10.0)


@every_balancer
def test_a_pick_is_none_when_nothing_is_usable(make: Callable[[], Balancer]) -> None:
    balancer = make()
    pool = replicas(4)
    assert balancer.pick([], (), False, 0.0) is None
    assert balancer.pick([], (), True, 0.0) is None
    assert balancer.pick(pool, pool, False, 0.0) is None
    assert balancer.pick(pool, pool, True, 0.0) is None
    for r in pool:
        r.unhealthy = True
    assert balancer.pick(pool, (), False, 0.0) is None
    assert balancer.pick(pool, (), True, 0.0) in pool
    one = replicas(1)
    assert balancer.pick(one, (), False, 0.0) is one[0]
    assert balancer.pick(one, one, False, 0.0) is None


@every_balancer
def test_a_pick_finds_the_one_usable_replica_among_a_thousand(
    make: Callable[[], Balancer],
) -> None:
    pool = replicas(1000)
    for r in pool:
        r.unhealthy = True
    lucky = pool[537]
    lucky.unhealthy = False
    assert picks(make(), pool, 50) == {lucky: 50}
    # The same when the others are out because this request tried them.
    for r in pool:
        r.unhealthy = False
    others = [r for r in pool if r is not lucky]
    assert picks(make(), pool, 20, tried=others) == {lucky: 20}
    assert picks(make(), pool, 5, tried=pool) == {None: 5}


@every_balancer
def test_the_scan_fallback_keeps_the_load_spread_over_the_usable_replicas(
    make: Callable[[], Balancer],
) -> None:
    pool = replicas(100)
    usable = pool[::10]
    for r in pool:
        r.unhealthy = r not in usable
    counts = picks(make(), pool, 10_000)
    assert set(counts) == set(usable)
    # Fair share is 1,000 each; allow a factor of two either way.
    assert max(counts.values()) <= 2000, f"one replica took {max(counts.values())} of 10,000"
    assert min(counts[r] for r in usable) >= 500


# -- PowerOfTwo and LeastRequests: the cheaper replica wins ----------------------------------------------


def test_power_of_two_prefers_the_lower_latency_replica() -> None:
    pool = replicas(2)
    pool[0].observe(0.050, now=10.0)
    pool[1].observe(0.010, now=10.0)
    assert picks(PowerOfTwo(random=seeded()), pool, 100, now=10.0) == {pool[1]: 100}


def test_power_of_two_prefers_the_replica_with_fewer_requests_in_flight() -> None:
    pool = replicas(2)
    for r in pool:
        r.observe(0.010, now=10.0)
    pool[1].in_flight = 2
    assert picks(PowerOfTwo(random=seeded()), pool, 100, now=10.0) == {pool[0]: 100}
    # cost = ewma × (in_flight + 1): 0.010 × 3 beats 0.040 × 1
    pool[0].observe(0.040, now=10.0)
    assert picks(PowerOfTwo(random=seeded()), pool, 100, now=10.0) == {pool[1]: 100}


def test_power_of_two_never_picks_the_most_expensive_replica_and_spreads_over_the_rest() -> None:
    pool = replicas(10)
    for i, r in enumerate(pool):
        r.observe(0.001 * (i + 1), now=10.0)
    counts = picks(PowerOfTwo(random=seeded()), pool, 10_000, now=10.0)
    assert pool[9] not in counts
    # Two distinct draws: replica i wins when the other draw is costlier, (9 - i) / 45 of the time.
    for i in range(9):
        expected = 10_000 * (9 - i) / 45
        assert abs(counts[pool[i]] - expected) < 0.15 * 10_000 / 9, (i, counts[pool[i]])


def test_power_of_two_draws_two_distinct_replicas() -> None:
    pool = replicas(2)
    pool[0].observe(0.001, now=10.0)
    pool[1].observe(0.002, now=10.0)
    # Were both draws allowed to land on the costlier replica it would win a quarter of the time.
    assert picks(PowerOfTwo(random=seeded()), pool, 1000, now=10.0) == {pool[0]: 1000}


def test_power_of_two_does_not_pile_requests_on_an_unmeasured_replica() -> None:
    pool = replicas(2)
    pool[0].in_flight = 50  # never answered yet: ewma 0
    pool[1].observe(0.001, now=10.0)
    counts = picks(PowerOfTwo(random=seeded()), pool, 100, now=10.0)
    assert counts[pool[1]] == 100


def test_least_requests_prefers_fewer_requests_in_flight_and_ignores_latency() -> None:
    pool = replicas(3)
    pool[0].in_flight = 5
    pool[1].observe(1.0, now=10.0)  # slow, but idle
    counts = picks(LeastRequests(random=seeded()), pool, 9000, now=10.0)
    # The busy replica wins only when both draws (with replacement) land on it: 1/9.
    assert counts[pool[0]] < 9000 * (1 / 9 + 0.03)
    assert abs(counts[pool[1]] - counts[pool[2]]) < 9000 * 0.06


# -- RoundRobin, Random, Weighted ------------------------------------------------------------------------


def test_round_robin_cycles_through_the_replicas_in_order() -> None:
    pool = replicas(4)
    balancer = RoundRobin()
    assert [balancer.pick(pool, (), False, 0.0) for _ in range(9)] == [*pool, *pool, pool[0]]


def test_round_robin_skips_an_unusable_replica_and_keeps_cycling_over_the_rest() -> None:
    pool = replicas(4)
    pool[1].unhealthy = True
    balancer = RoundRobin()
    order = [balancer.pick(pool, (), False, 0.0) for _ in range(8)]
    assert pool[1] not in order
    assert order == [pool[0], pool[2], pool[2], pool[3]] * 2


def test_random_is_uniform() -> None:
    pool = replicas(4)
    counts = picks(Random(random=seeded()), pool, 10_000)
    assert all(abs(counts[r] - 2500) < 250 for r in pool), counts


def test_weighted_follows_the_weights() -> None:
    pool = [Replica(Endpoint(url(0), weight=3.0)), Replica(Endpoint(url(1), weight=1.0))]
    counts = picks(Weighted(random=seeded(11)), pool, 10_000)
    assert abs(counts[pool[0]] - 7500) < 200, counts
    assert counts[pool[0]] + counts[pool[1]] == 10_000


def test_weighted_never_picks_a_zero_weight_replica_while_another_is_usable() -> None:
    pool = [
        Replica(Endpoint(url(0), weight=0.0)),
        Replica(Endpoint(url(1), weight=1.0)),
        Replica(Endpoint(url(2), weight=2.0)),
    ]
    counts = picks(Weighted(random=seeded()), pool, 3000)
    assert pool[0] not in counts
    assert abs(counts[pool[2]] - 2000) < 150


def test_weighted_with_only_zero_weights_still_picks_a_usable_replica() -> None:
    pool = replicas(3, weight=0.0)
    pool[0].unhealthy = True
    assert set(picks(Weighted(random=seeded()), pool, 50)) <= {pool[1], pool[2]}


def test_weighted_keeps_to_the_weights_when_its_draws_keep_missing() -> None:
    # The heavy replica is tried: most draws land on it, and the fallback chooses among the rest
    # still by weight (uniformly, a weight-0 SRV record took a third of the load).
    pool = [Replica(Endpoint(url(i), weight=w)) for i, w in enumerate((1000.0, 100.0, 1.0, 0.0))]
    counts = picks(Weighted(random=seeded()), pool, 4000, tried=pool[:1])
    assert pool[0] not in counts and pool[3] not in counts
    assert counts[pool[1]] > 3850, counts


def test_weighted_skips_tried_replicas_and_redistributes_by_weight() -> None:
    pool = [Replica(Endpoint(url(i), weight=w)) for i, w in enumerate((6.0, 3.0, 1.0))]
    counts = picks(Weighted(random=seeded()), pool, 4000, tried=pool[:1])
    assert pool[0] not in counts
    assert abs(counts[pool[1]] - 3000) < 200, counts


# -- Replica: peak EWMA --------------------------------------------------------------------------------


def test_a_new_replica_costs_nothing_and_is_named_by_host_and_port() -> None:
    r = Replica(Endpoint("https://orders.example"))
    assert r.cost(now=5.0) == 0.0
    assert r.name == "orders.example:443"
    assert r.attributes == {"server.address": "orders.example", "server.port": 443}
    assert Replica(Endpoint("http://10.0.0.1")).name == "10.0.0.1:80"
    assert "ewma=0.0000" in repr(r)


def test_observe_takes_a_spike_at_once_and_folds_lower_latencies_in_by_elapsed_time() -> None:
    r = Replica(Endpoint(url(0)))
    r.observe(0.100, now=10.0)
    assert r.ewma == 0.100
    r.observe(0.300, now=11.0)  # a spike: the peak is taken as is
    assert r.ewma == 0.300
    r.observe(0.100, now=13.0)  # 2 s later: weight e^-1 on the old value
    assert math.isclose(r.ewma, 0.300 * 0.36787944117144233 + 0.100 * 0.6321205588285577)
    assert math.isclose(r.ewma, 0.17357588823428847)
    r.observe(0.050, now=13.0)  # no time elapsed: the old value keeps all its weight
    assert math.isclose(r.ewma, 0.17357588823428847)


def test_cost_decays_with_time_since_the_last_measurement_and_scales_with_load() -> None:
    r = Replica(Endpoint(url(0)))
    r.observe(0.200, now=10.0)
    assert r.cost(now=10.0) == 0.200
    assert math.isclose(r.cost(now=12.0), 0.200 * math.exp(-1.0))
    assert math.isclose(r.cost(now=14.0), 0.200 * math.exp(-2.0))
    assert r.cost(now=9.0) == 0.200  # a clock read before the stamp never inflates it
    r.in_flight = 2
    assert math.isclose(r.cost(now=12.0), 3 * 0.200 * math.exp(-1.0))
    assert r.ewma == 0.200  # reading the cost changes nothing


def test_observe_at_time_zero_is_a_measurement_like_any_other() -> None:
    r = Replica(Endpoint(url(0)))
    r.observe(0.500, now=0.0)
    r.observe(0.100, now=0.0)
    assert r.ewma == 0.500


def test_an_unmeasured_replica_costs_a_penalty_per_request_in_flight() -> None:
    r = Replica(Endpoint(url(0)))
    assert r.cost(now=5.0) == 0.0  # idle: free, so that it gets measured
    r.in_flight = 3
    assert r.cost(now=5.0) == 3.0  # one second per waiting request: far above any real latency


def test_a_failure_can_only_raise_the_latency_estimate() -> None:
    r = Replica(Endpoint(url(0)))
    r.observe(0.010, now=10.0)
    r.observe_failure(0.002, now=11.0)  # a fast refusal is not fast service
    assert r.ewma == 0.010
    assert math.isclose(r.cost(now=12.0), 0.010 * math.exp(-1.0))  # still decaying from t=10
    r.observe_failure(0.500, now=12.0)  # a timeout is slow
    assert r.ewma == 0.500 and r.cost(now=12.0) == 0.500


def test_a_fast_failure_does_not_make_an_unmeasured_replica_cheaper() -> None:
    r = Replica(Endpoint(url(0)))
    r.in_flight = 2
    before = r.cost(now=10.0)
    r.observe_failure(0.0003, now=10.0)
    assert r.cost(now=10.0) >= before


def test_available_means_ejection_time_over_and_not_unhealthy() -> None:
    r = Replica(Endpoint(url(0)))
    assert r.available(0.0)
    r.ejected, r.ejected_until = True, 5.0
    assert not r.available(4.9)
    assert r.available(5.0)
    r.unhealthy = True
    assert not r.available(6.0)


def test_latency_window_p95() -> None:
    window = LatencyWindow(size=100)
    for ms in range(1, 50):
        window.add(ms / 1000)
    assert window.p95(min_samples=50) is None
    window.add(0.050)
    assert window.p95(min_samples=50) == 0.048  # ordered[int(50 × 0.95)] = ordered[47]
    for ms in range(51, 101):
        window.add(ms / 1000)
    # Re-sorted every 32 samples, not every call: 50 new samples since the last sort.
    assert window.p95(min_samples=50) == 0.096
    for _ in range(100):  # the ring overwrites the oldest samples
        window.add(1.0)
    assert window.p95(min_samples=50) == 1.0


# -- ServiceRuntime: membership ------------------------------------------------------------------------------


def test_service_validates_its_options() -> None:
    with pytest.raises(ValueError, match="max_ejection"):
        Service(discovery=Static([url(0)]), max_ejection=1.5)
    with pytest.raises(ValueError, match="discovery"):
        Service(discovery=[url(0)])  # type: ignore[arg-type]
    bad: list[tuple[str, object]] = [
        ("balancer", "p2c"),
        ("zone", 3),
        ("zone", ""),
        ("tls_server_name", 7),
        ("breaker", 5),
    ]
    for name, value in bad:
        with pytest.raises(ValueError, match=f"{name} must .*{value!r}"):
            Service(discovery=Static([url(0)]), **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("weight", float("inf")),
        ("weight", float("nan")),
        ("weight", -1.0),
        ("weight", "2"),
        ("priority", "1"),
        ("priority", 1.5),
        ("priority", True),
        ("zone", 3),
    ],
)
def test_endpoint_rejects_bad_hints_naming_them(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field} must"):
        Endpoint(url(0), **{field: value})  # type: ignore[arg-type]


# -- credentials never shown -------------------------------------------------------------------------


def test_an_endpoint_with_credentials_shows_them_nowhere() -> None:
    # Health checks send a replica URL's userinfo as Basic auth; reprs mask it.
    endpoint = Endpoint("http://svc:pw5ecret@10.0.0.7:8080")
    assert "pw5ecret" not in repr(endpoint)
    assert "pw5ecret" not in repr(Static([endpoint]))
    assert "pw5ecret" not in repr(Replica(endpoint))
    with pytest.raises(ValueError, match="url must") as raised:
        Endpoint("ftp://svc:pw5ecret@10.0.0.7")
    assert "pw5ecret" not in str(raised.value)


def test_an_endpoint_s_repr_leaves_its_metadata_out() -> None:
    endpoint = Endpoint(url(0), metadata={"user.password": "m3ta"})
    assert "m3ta" not in repr(endpoint)
    assert endpoint.metadata["user.password"] == "m3ta"


def test_a_discovery_failure_is_logged_without_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A source of the user's own reports its backend's error, which names the URL it called.
    source = Publisher([url(0)])
    error = RuntimeError("403 for url 'http://consul:8500/v1/x?token=c0nsul'\nforged line")
    source._failed(error)
    (record,) = [r for r in caplog.records if r.name == "resilient.discovery"]
    message = record.getMessage()
    assert "keeping the last 1 endpoint(s)" in message
    assert "c0nsul" not in message
    assert "\n" not in message  # one line: no forged log lines


def test_a_services_spec_is_refused_without_showing_credentials() -> None:
    with pytest.raises(ValueError, match="must be a discovery source") as raised:
        rs.ResilientTransport(services={"orders": "http://svc:pw5ecret@10.0.0.7"})
    assert "pw5ecret" not in str(raised.value)


def test_latency_window_needs_room_for_a_sample() -> None:
    with pytest.raises(ValueError, match="size must be an integer >= 1, got 0"):
        LatencyWindow(size=0)


def test_refresh_builds_the_replicas_once_per_snapshot_version() -> None:
    rt, source, _ = runtime([url(0), url(1)])
    assert [r.url for r in rt.replicas] == [url(0), url(1)]
    assert rt.version == source.current().version
    before = rt.replicas
    rt.refresh()
    assert rt.replicas is before
    source.publish([url(1), url(0)])  # the same set: not a new snapshot
    rt.refresh()
    assert rt.replicas is before


def test_a_membership_change_keeps_the_state_of_replicas_that_stay() -> None:
    rt, source, _ = runtime([url(0), url(1), url(2)])
    r0, r1, r2 = rt.replicas
    r1.observe(0.020, now=100.0)
    r1.successes, r1.failures, r1.in_flight = 7, 2, 1
    breaker(r1).on_failure(0.0)
    source.publish([url(1), url(2), url(3)])
    rt.refresh()
    assert [r.url for r in rt.replicas] == [url(1), url(2), url(3)]
    assert rt.replicas[0] is r1 and rt.replicas[1] is r2
    assert (r1.ewma, r1.successes, r1.failures, r1.in_flight) == (0.020, 7, 2, 1)
    assert breaker(r1).metrics()["consecutive_failures"] == 1
    fresh = rt.replicas[2]
    assert fresh.breaker is not None and fresh.breaker is not breaker(r0)
    assert fresh.breaker.name == f"orders/{fresh.name}"
    # A replica that left and comes back starts afresh.
    source.publish([url(0), url(1)])
    rt.refresh()
    assert rt.replicas[0] is not r0 and rt.replicas[0].breaker is not r0.breaker


def test_a_weight_change_keeps_what_was_learned_about_the_replica() -> None:
    # The same replica, its new endpoint: its latency (and its cost), counts and the requests in
    # flight to it (they finish on this object) stay. A copy lost its latency's timestamp, so it
    # cost nothing, and its in-flight count started at 0: the slowest, busiest replica was the
    # cheapest one to pick (DNS changes SRV weights whenever a target gains an address).
    rt, source, _ = runtime([url(0), url(1)])
    r0 = rt.replicas[0]
    r0.observe(0.030, now=100.0)
    r0.in_flight, r0.successes, r0.failures = 5, 7, 2
    cost = r0.cost(now=100.0)
    source.publish([Endpoint(url(0), weight=5.0, zone="a", priority=1), Endpoint(url(1))])
    rt.refresh()
    new = next(r for r in rt.replicas if r.url == url(0))
    assert new is r0
    assert (new.endpoint.weight, new.endpoint.zone, new.endpoint.priority) == (5.0, "a", 1)
    assert (new.in_flight, new.successes, new.failures) == (5, 7, 2)
    assert new.cost(now=100.0) == cost > 0
    other = next(r for r in rt.replicas if r.url == url(1))
    assert [set(t) for t in rt.tiers] == [{other}, {r0}]  # priority 1: a later tier


def test_an_endpoint_listed_twice_is_one_replica_that_its_breaker_ejects() -> None:
    # A restarted server's old ZooKeeper node lives on until its session expires; two SRV
    # targets may share an address. Two replicas for one URL would share its load twice over,
    # and only the one kept by URL could be ejected.
    rt, _, _ = runtime([Endpoint(url(0), weight=2.0), url(1), Endpoint(url(0), weight=9.0)])
    assert [r.url for r in rt.replicas] == [url(0), url(1)]
    assert rt.replicas[0].endpoint.weight == 2.0  # as first listed
    breaker(rt.replicas[0]).open()
    assert rt.down == 1 and states(rt) == ["ejected", "healthy"]
    assert {rt.pick(()) for _ in range(50)} == {rt.replicas[1]}


def test_a_pick_racing_a_rebuild_that_drops_a_tier_does_not_fail() -> None:
    # A pick reads the tiers without the lock; a rebuild in between (another thread's request)
    # that leaves fewer tiers must not make it index the new counts with the old positions.
    rt, source, _ = runtime([Endpoint(url(0), priority=0), Endpoint(url(1), priority=1)])

    class Rebuilding:
        def __init__(self) -> None:
            self.done = False

        def pick(
            self, replicas: Sequence[Replica], tried: Collection[Replica], panic: bool, now: float
        ) -> Replica | None:
            if not self.done:  # first tier: another thread drops priority 1 meanwhile
                self.done = True
                source.publish([Endpoint(url(0), priority=0)])
                rt.refresh()
            return next((r for r in replicas if r not in tried), None)

    rt.balancer = Rebuilding()
    assert rt.pick(tried=(rt.replicas[0],)) is not None


def test_a_replica_whose_weight_changed_is_still_ejected_by_its_breaker() -> None:
    rt, source, _ = runtime([url(0), url(1), url(2)])
    source.publish([Endpoint(url(0), weight=2.0), Endpoint(url(1)), Endpoint(url(2))])
    rt.refresh()
    r0 = rt.replicas[0]
    breaker(r0).open()
    assert r0.ejected
    assert states(rt)[0] == "ejected"


def test_a_replica_ejected_before_its_weight_changed_comes_back_when_its_breaker_closes() -> None:
    rt, source, clock = runtime([url(0), url(1), url(2)])
    breaker(rt.replicas[0]).open()
    source.publish([Endpoint(url(0), weight=2.0), Endpoint(url(1)), Endpoint(url(2))])
    rt.refresh()
    r0 = rt.replicas[0]
    clock.advance(5.0)
    assert breaker(r0).try_acquire()
    breaker(r0).on_success(0.001)
    assert not r0.ejected
    source.publish([Endpoint(url(0), weight=3.0), Endpoint(url(1)), Endpoint(url(2))])
    rt.refresh()
    assert rt.down == 0
    assert states(rt) == ["healthy"] * 3


def test_the_breaker_of_a_removed_replica_does_not_count_against_its_successor() -> None:
    rt, source, _ = runtime([url(0), url(1), url(2)])
    old = rt.replicas[0]
    source.publish([url(1), url(2)])
    rt.refresh()
    source.publish([url(0), url(1), url(2)])
    rt.refresh()
    assert rt.replicas[0] is not old
    breaker(old).open()  # its last in-flight requests failed after it left
    assert rt.down == 0


def test_an_empty_service_has_nothing_to_pick() -> None:
    rt, source, _ = runtime([url(0)])
    source.publish([])
    rt.refresh()
    assert rt.replicas == () and rt.tiers == ()
    assert rt.pick(()) is None
    assert not rt.panic


# -- ServiceRuntime: tiers --------------------------------------------------------------------------------


def test_lower_priority_numbers_are_used_first_then_the_next_tier() -> None:
    endpoints = [
        Endpoint(url(0), priority=1),
        Endpoint(url(1), priority=0),
        Endpoint(url(2), priority=0),
        Endpoint(url(3), priority=1),
        Endpoint(url(4), priority=1),
    ]
    rt, _, _ = runtime(endpoints)
    first = {rt.replicas[1], rt.replicas[2]}
    assert [set(t) for t in rt.tiers] == [first, {rt.replicas[0], rt.replicas[3], rt.replicas[4]}]
    assert {rt.pick(()) for _ in range(100)} == first
    # A retry that tried the whole first tier goes on to the next one.
    assert {rt.pick(tuple(first)) for _ in range(100)} == set(rt.replicas) - first
    # So does every pick once the first tier is ejected (2 of 5 down: no panic).
    for r in first:
        breaker(r).open()
    assert not rt.panic
    assert {rt.pick(()) for _ in range(100)} == set(rt.replicas) - first


def test_replicas_in_the_clients_zone_are_preferred_within_a_priority() -> None:
    endpoints = [
        Endpoint(url(0), zone="b"),
        Endpoint(url(1), zone="a"),
        Endpoint(url(2), zone="b"),
        Endpoint(url(3), zone="a", priority=1),
        Endpoint(url(4), zone=None),
    ]
    rt, _, _ = runtime(endpoints, zone="a", max_ejection=1.0)
    r = rt.replicas
    assert rt.tiers == ((r[1],), (r[0], r[2], r[4]), (r[3],))
    assert {rt.pick(()) for _ in range(50)} == {r[1]}
    breaker(r[1]).open()
    assert {rt.pick(()) for _ in range(100)} == {r[0], r[2], r[4]}
    for i in (0, 2, 4):
        breaker(r[i]).open()
    assert {rt.pick(()) for _ in range(20)} == {r[3]}  # priority beats zone


def test_without_a_client_zone_zones_make_no_tiers() -> None:
    rt, _, _ = runtime([Endpoint(url(0), zone="a"), Endpoint(url(1), zone="b")])
    assert len(rt.tiers) == 1


def test_a_pick_prefers_untried_replicas_and_goes_round_again_when_all_were_tried() -> None:
    rt, _, _ = runtime([url(0), url(1), url(2)])
    r = rt.replicas
    assert {rt.pick((r[0], r[1])) for _ in range(20)} == {r[2]}
    assert {rt.pick(r) for _ in range(200)} == set(r)


def test_panic_mode_does_not_prefer_an_ejected_tier_over_a_healthy_replica() -> None:
    endpoints = [
        Endpoint(url(0), priority=0),
        Endpoint(url(1), priority=0),
        Endpoint(url(2), priority=1),
        Endpoint(url(3), priority=1),
    ]
    rt, _, _ = runtime(endpoints)
    for r in rt.replicas[:3]:
        breaker(r).open()
    assert rt.panic
    assert {rt.pick(()) for _ in range(50)} == {rt.replicas[3]}


def all_tiers_panicking() -> ServiceRuntime:
    endpoints = [
        Endpoint(url(0), priority=0),
        Endpoint(url(1), priority=0),
        Endpoint(url(2), priority=1),
        Endpoint(url(3), priority=1),
    ]
    rt, _, _ = runtime(endpoints)
    for r in rt.replicas:
        breaker(r).open()
    return rt


def test_when_every_tier_panics_the_first_one_takes_the_load_ignoring_health() -> None:
    rt = all_tiers_panicking()
    assert {rt.pick(()) for _ in range(100)} == set(rt.replicas[:2])
    assert {rt.pick(rt.replicas[:1]) for _ in range(20)} == {rt.replicas[1]}


def test_when_every_tier_panics_a_retry_still_goes_to_an_untried_replica() -> None:
    rt = all_tiers_panicking()
    assert {rt.pick(rt.replicas[:2]) for _ in range(100)} == set(rt.replicas[2:])


# -- ServiceRuntime: ejection, probes, panic -------------------------------------------------------------


def test_a_replica_is_ejected_when_its_breaker_opens_and_probed_when_its_time_is_over() -> None:
    rt, _, clock = runtime([url(0), url(1), url(2)])
    r0, r1, r2 = rt.replicas
    b0 = breaker(r0)
    for _ in range(5):  # the default replica breaker: 5 failures in a row
        assert b0.try_acquire()
        b0.on_failure(0.01)
    assert r0.ejected and r0.ejected_until == clock.monotonic() + 5.0
    assert rt.down == 1 and not rt.panic
    assert states(rt) == ["ejected", "healthy", "healthy"]
    assert r0 not in {rt.pick(()) for _ in range(200)}
    # The other two tried: go round again among them, not to the ejected one.
    assert {rt.pick((r1, r2)) for _ in range(50)} <= {r1, r2}

    clock.advance(5.0)
    assert states(rt)[0] == "half_open"
    assert rt.pick((r1, r2)) is r0  # the probe
    assert b0.try_acquire()
    assert not b0.try_acquire()  # exactly one probe
    b0.on_success(0.01)
    assert (r0.ejected, r0.ejected_until) == (False, 0.0)
    assert rt.down == 0
    assert states(rt) == ["healthy"] * 3


def measured(*seconds: float) -> tuple[ServiceRuntime, Sequence[Replica], FakeClock]:
    """A runtime of one replica per latency, each measured once at that latency."""
    rt, _, clock = runtime([url(i) for i in range(len(seconds))])
    for replica, latency in zip(rt.replicas, seconds, strict=True):
        replica.observe(latency, clock.monotonic())
    return rt, rt.replicas, clock


def test_a_replica_ejected_for_slow_answers_is_probed_as_soon_as_its_time_is_over() -> None:
    # Its slow answers (300 ms against 5 ms) would keep it out of power-of-two picks for seconds
    # after its ejection time; once that time is over it costs nothing while idle, so the next
    # pick that draws it probes it, and no second pick joins the probe while it is in flight.
    rt, (r0, r1, _), clock = measured(0.3, 0.005, 0.005)
    breaker(r0).open()
    clock.advance(4.9)
    assert r0 not in {rt.pick(()) for _ in range(200)}
    clock.advance(0.1)
    assert states(rt)[0] == "half_open"
    assert r0 in [rt.pick(()) for _ in range(20)]
    r0.in_flight += 1  # its probe
    assert r0 not in {rt.pick(()) for _ in range(200)}
    assert breaker(r0).try_acquire()
    r0.in_flight -= 1
    breaker(r0).on_success(0.004)
    assert not r0.ejected
    # Back, it costs its latency estimate again (still holding the slow answers, decaying).
    assert r0.cost(clock.monotonic()) > r1.cost(clock.monotonic())


def test_panic_mode_prefers_fast_replicas_over_ejected_slow_ones() -> None:
    rt, (r0, r1, r2), clock = measured(0.3, 0.3, 0.005)
    breaker(r0).open()
    breaker(r1).open()
    assert rt.panic
    # Health is ignored, latency is not: every draw that has the fast replica chooses it (2 in
    # 3), as the ejected ones still cost their slow answers.
    assert r0.cost(clock.monotonic()) > r2.cost(clock.monotonic())
    assert [rt.pick(()) for _ in range(300)].count(r2) > 150


def test_an_unhealthy_replica_past_its_ejection_time_keeps_its_cost() -> None:
    # In panic mode health is ignored, but an unhealthy replica must not look free.
    rt, _, clock = runtime([url(0), url(1), url(2)])
    r0 = rt.replicas[0]
    r0.observe(0.3, clock.monotonic())
    breaker(r0).open()
    rt.set_health(r0.url, True)
    clock.advance(5.0)
    assert r0.cost(clock.monotonic()) > 0.0


def test_a_failed_probe_ejects_the_replica_again_for_longer() -> None:
    rt, _, clock = runtime([url(0), url(1), url(2)])
    r0 = rt.replicas[0]
    breaker(r0).open()
    clock.advance(5.0)
    assert breaker(r0).try_acquire()
    breaker(r0).on_failure(0.01)
    assert r0.ejected and r0.ejected_until == clock.monotonic() + 10.0
    assert rt.down == 1
    assert states(rt)[0] == "ejected"


def test_panic_mode_starts_exactly_when_more_than_max_ejection_are_down() -> None:
    rt, _, _ = runtime([url(0), url(1), url(2)])  # max_ejection 0.5: 1.5 replicas
    r0, r1, r2 = rt.replicas
    breaker(r0).open()
    assert (rt.down, rt.panic) == (1, False)
    assert {rt.pick(()) for _ in range(200)} == {r1, r2}
    rt.set_health(r1.url, True)
    assert (rt.down, rt.panic) == (2, True)
    # In panic the balancer ignores health: the ejected and the unhealthy are chosen too.
    assert {rt.pick(()) for _ in range(300)} == {r0, r1, r2}
    rt.set_health(r1.url, False)
    assert (rt.down, rt.panic) == (1, False)


def test_max_ejection_bounds() -> None:
    rt, _, _ = runtime([url(0), url(1), url(2), url(3)], max_ejection=0.0)
    breaker(rt.replicas[0]).open()
    assert rt.panic  # no replica may be out
    rt, _, _ = runtime([url(0), url(1)], max_ejection=1.0)
    for r in rt.replicas:
        breaker(r).open()
    assert not rt.panic  # every replica may be out: then there is none to pick
    assert rt.pick(()) is None


def test_an_unhealthy_and_ejected_replica_counts_once() -> None:
    rt, _, _ = runtime([url(0), url(1), url(2)])
    r0 = rt.replicas[0]
    breaker(r0).open()
    rt.set_health(r0.url, True)
    assert rt.down == 1
    assert states(rt)[0] == "unhealthy"
    breaker(r0).reset()
    assert rt.down == 1
    rt.set_health(r0.url, False)
    assert rt.down == 0
    rt.set_health("http://unknown:1", True)  # not a replica of this service: ignored
    assert rt.down == 0


def test_statistics_report_each_replica() -> None:
    rt, _, clock = runtime([url(0), url(1), url(2), url(3)], max_ejection=1.0)
    r = rt.replicas
    r[0].observe(0.0125, now=clock.monotonic())
    r[0].successes, r[0].failures, r[0].in_flight = 3, 1, 2
    breaker(r[2]).open()
    clock.advance(5.0)  # r[2]'s ejection time is over: it awaits its probe
    breaker(r[1]).open()
    rt.set_health(r[3].url, True)
    stats = rt.statistics()
    assert [s.url for s in stats] == [x.url for x in r]
    assert [s.state for s in stats] == ["healthy", "ejected", "half_open", "unhealthy"]
    assert [s.breaker for s in stats] == ["closed", "open", "half_open", "closed"]
    assert (stats[0].in_flight, stats[0].successes, stats[0].failures) == (2, 3, 1)
    assert stats[0].ewma_ms == 12.5
    assert stats[1].ewma_ms == 0.0


def test_a_custom_replica_breaker_is_named_per_replica_and_ejects() -> None:
    clock = FakeClock(100.0)
    made: dict[str, rs.CircuitBreaker] = {}

    def build(name: str) -> rs.CircuitBreaker:
        made[name] = rs.CircuitBreaker(name=name, consecutive_failures=2, open_for=0.5, clock=clock)
        return made[name]

    rt, _, _ = runtime([url(0), url(1), url(2)], clock=clock, breaker=build)
    assert set(made) == {f"orders/{r.name}" for r in rt.replicas}
    r0 = rt.replicas[0]
    for _ in range(2):
        breaker(r0).on_failure(0.0)
    assert r0.ejected and r0.ejected_until == 100.5
    assert rt.down == 1


def test_weighted_through_a_service_follows_the_weights() -> None:
    rt, _, _ = runtime(
        [Endpoint(url(0), weight=3.0), Endpoint(url(1), weight=1.0)],
        balancer=Weighted(random=seeded(3)),
    )
    counts = Counter(rt.pick(()) for _ in range(10_000))
    assert abs(counts[rt.replicas[0]] - 7500) < 200
