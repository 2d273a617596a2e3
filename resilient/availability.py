"""The two-state Markov availability model of a fleet, and its check against a real one.

The model. Each replica alternates up ⇄ down on its own: an up replica fails at rate λ (``lam``,
per second), a down one is repaired at rate μ (``mu``), so up times are ~Exp(λ) and down times
~Exp(μ). Per replica::

    A      = μ / (λ + μ)                           steady-state availability
    P_f(t) = 1 − e^(−λt)                           an up replica fails within t
    P_r(t) = 1 − e^(−μt)                           a down replica is repaired within t
    A(t)   = μ/(λ+μ) + λ/(λ+μ) · e^(−(λ+μ)t)       up at time t, given up at 0

    MTTF = 1/λ (mean up time), MTTR = 1/μ (mean down time), MTBF = 1/λ + 1/μ (mean cycle),
    failures per second at steady state = λ·A = 1/MTBF

A request tries up to ``attempts`` replicas out of ``replicas`` (n), each one not tried yet, and
succeeds on the first that is up. With k = min(attempts, n) and q = 1 − A::

    success            = 1 − q^k
    expected attempts  = Σ_{i=1..attempts} q^min(i−1, n)   (= (1 − q^attempts)/A when attempts ≤ n)
    any of n up        = 1 − q^n
    fleet outages      n·μ·q^n per second (the rate of entering "all n down"), lasting 1/(n·μ)

Assumptions, stated once: replicas are independent and identical and at steady state, and a
request's attempts happen at one instant (no wait between them, each far shorter than
1/(λ+μ)). Attempts beyond ``replicas`` are allowed; they go back to replicas already tried at that
same instant, still down, so they add attempts but never success: that is why ``success`` uses
min(attempts, replicas). A client that waits between attempts, or stops sending to replicas that
failed (ejection), does better than this model.

The check (``resilient availability --simulate``) runs a real `resilient.testing.Fleet` whose
replicas follow exactly this chain (``Replica.set_markov(lam, mu)``; down = refusing
connections), each started in a state drawn from the steady-state distribution so there is no
warm-up. Requests go out at a fixed rate over ``--duration`` seconds through two clients: a
*model-faithful* one (plain httpx, up to ``attempts`` distinct replicas in random order, nothing
else), whose success rate the prediction must match, and `ResilientTransport` with its defaults,
shown beside it as what the library does. ``--seed`` (default 1) fixes every up/down duration, so
a run is reproducible; another seed is another sample path.

The interval. Successive requests are correlated (a down replica stays down ~1/μ, a fleet outage
lasts ~1/(n·μ)), so a binomial interval over all requests would be far too narrow: this is a
batch-means interval. The requests are cut, in time order, into 20 batches (and into 10); the
variance of the mean comes from the batch means, extrapolated from the two batch lengths (batch
means underestimate it by a share that shrinks as 1/batch length), and gives an effective sample
size n_eff = p̂(1−p̂)/Var(p̂), clipped to [20, requests] (batch means lie in [0, 1], so 20
independent batches are worth at least 20 samples). The interval is Wilson's score interval on
n_eff, with Student's t quantile in place of z since the variance is estimated: 9 degrees of
freedom, but at most one more than the number of failure episodes (runs of failed requests), as
with few bursts the variance rests on those few. When nothing failed, the data cannot show how long
bursts last: n_eff is then the 20 batches and the interval [0.82, 1].

Checked against an exact simulation of the chain (2,000 runs of 2,000 requests over 20 s each),
the prediction fell outside this 95 % interval in 1.5 % of runs at λ = 0.5, μ = 4.5, 3 replicas,
3 attempts (conservative: such a run sees only 0.27 fleet outages on average; 1.2 % for 800
requests over 8 s), 2.0 % with 2 replicas and 2 attempts, 4.8 % with 3 replicas and 2 attempts,
3.4 % with 1 attempt, and 6.4 % when the batches are short beside 1/(λ+μ) (λ = μ = 1), which the
command warns about.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from time import monotonic
from typing import Any

from resilient.policies._common import check_count, check_positive

__all__ = ["Prediction", "predict"]

#: Batches for the batch-means interval.
BATCHES = 20
#: Confidence of the printed interval.
CONFIDENCE = 0.95
_TIMEOUT = 2.0  # httpx timeout of both clients: a refused connection fails at once anyway
_PATH = "/availability"


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """What the two-state Markov model predicts; built by :func:`predict`.

    Probabilities are in [0, 1], durations in seconds, rates per second. The fields at ``time``
    (``p_fail``, ``p_repair``, ``availability_at``) are ``None`` unless ``time`` was given.

    Example::

        >>> p = predict(0.5, 4.5, replicas=3, attempts=3)
        >>> round(p.availability, 6), round(p.success, 6), round(p.expected_attempts, 6)
        (0.9, 0.999, 1.11)
        >>> round(p.mttf, 6), round(p.mttr, 6), round(p.mtbf, 6)
        (2.0, 0.222222, 2.222222)
    """

    lam: float
    """Failure rate λ of one replica (per second)."""
    mu: float
    """Repair rate μ of one replica (per second)."""
    replicas: int
    """Replicas in the fleet, n."""
    attempts: int
    """Attempts a request may make, each on a replica not tried yet while any is left."""
    effective_attempts: int
    """min(attempts, replicas): the attempts that can change the outcome."""
    availability: float
    """A = μ/(λ+μ): the share of time one replica is up."""
    unavailability: float
    """1 − A = λ/(λ+μ)."""
    mttf: float
    """Mean up time 1/λ (mean time to failure)."""
    mttr: float
    """Mean down time 1/μ (mean time to repair)."""
    mtbf: float
    """Mean time between failures of one replica, 1/λ + 1/μ (one up-down cycle)."""
    failure_frequency: float
    """Failures per second of one replica at steady state, λ·A = 1/MTBF."""
    success: float
    """A request succeeds: 1 − (1 − A)^min(attempts, replicas)."""
    expected_attempts: float
    """Mean attempts per request: Σ_{i=1..attempts} (1 − A)^min(i−1, replicas)."""
    any_up: float
    """At least one of the replicas is up: 1 − (1 − A)^n."""
    mean_up_replicas: float
    """Replicas up on average, n·A."""
    outage_frequency: float
    """Fleet outages (all n down) per second: n·μ·(1 − A)^n."""
    outage_duration: float
    """Mean length of a fleet outage, 1/(n·μ) seconds."""
    time: float | None = None
    """The ``time`` the next three fields are for, or ``None``."""
    p_fail: float | None = None
    """P_f(t) = 1 − e^(−λt): an up replica fails within ``time``."""
    p_repair: float | None = None
    """P_r(t) = 1 − e^(−μt): a down replica is repaired within ``time``."""
    availability_at: float | None = None
    """A(t) = A + (1 − A)·e^(−(λ+μ)t): up at ``time``, given up at 0."""


def predict(
    lam: float, mu: float, replicas: int = 3, attempts: int = 3, time: float | None = None
) -> Prediction:
    """The availability of replicas that fail at rate ``lam`` and are repaired at rate ``mu``.

    ``replicas`` ≥ 1 independent replicas; a request makes up to ``attempts`` ≥ 1 attempts, each on
    a replica not tried yet (beyond ``replicas`` they retry tried replicas and add nothing: see the
    module docstring). ``time`` (seconds ≥ 0), if given, fills the transient fields. Raises
    ``ValueError`` naming the field for a rate that is not finite and > 0, a count below 1 or a
    negative time.

    Example::

        >>> p = predict(lam=0.5, mu=4.5, replicas=3, attempts=3, time=1.0)
        >>> round(p.success, 6), round(p.any_up, 6), round(p.outage_frequency, 6)
        (0.999, 0.999, 0.0135)
        >>> round(p.p_fail, 6), round(p.p_repair, 6), round(p.availability_at, 6)
        (0.393469, 0.988891, 0.900674)
        >>> round(predict(0.5, 4.5, replicas=2, attempts=5).success, 6)  # only 2 distinct
        0.99
    """
    check_positive("lam", lam)
    check_positive("mu", mu)
    check_count("replicas", replicas)
    check_count("attempts", attempts)
    if time is not None:
        check_positive("time", time, allow_zero=True)
    lam, mu = float(lam), float(mu)
    total = lam + mu
    if math.isfinite(total):
        a = mu / total
        q = lam / total  # 1 − A, computed directly: exact even when A rounds to 1
    else:  # rates near the float maximum: their sum overflows, their ratio does not
        a = 1.0 / (1.0 + lam / mu)
        q = 1.0 / (1.0 + mu / lam)
    # log q, accurately whichever of A and q is small
    log_q = -math.inf if q == 0.0 else (math.log(q) if q < 0.5 else math.log1p(-a))
    k = min(attempts, replicas)
    q_n = math.exp(replicas * log_q)
    if a == 0.0:  # μ is negligible next to λ: every attempt fails
        expected = float(attempts)
    else:
        expected = _one_minus_power(log_q, k) / a + (attempts - k) * q_n
    transient: dict[str, float] = {}
    if time is not None:
        t = float(time)
        transient = {
            "time": t,
            "p_fail": -math.expm1(-lam * t),
            "p_repair": -math.expm1(-mu * t),
            "availability_at": a + q * math.exp(-(lam + mu) * t),
        }
    return Prediction(
        lam=lam,
        mu=mu,
        replicas=replicas,
        attempts=attempts,
        effective_attempts=k,
        availability=a,
        unavailability=q,
        mttf=1.0 / lam,
        mttr=1.0 / mu,
        mtbf=1.0 / lam + 1.0 / mu,
        failure_frequency=lam * a,
        success=_one_minus_power(log_q, k),
        expected_attempts=expected,
        any_up=_one_minus_power(log_q, replicas),
        mean_up_replicas=replicas * a,
        outage_frequency=replicas * (mu * q_n),  # (mu * q_n first: no overflow near the maximum)
        outage_duration=1.0 / (replicas * mu),
        **transient,
    )


def _one_minus_power(log_q: float, m: int) -> float:
    """1 − q^m without cancellation when q is close to 1."""
    return -math.expm1(m * log_q)


# -- the interval ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Interval:
    """A proportion measured from time-ordered outcomes, with its batch-means Wilson interval."""

    estimate: float
    low: float
    high: float
    effective_samples: float
    degrees_of_freedom: int
    episodes: int  # runs of the rarer outcome (failure episodes when most requests succeed)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _t_central(x: float, df: int) -> float:
    """P(|T| ≤ x) for Student's t with ``df`` degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(x / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2.0 / math.pi * (theta + s * total)
    term = total = 1.0
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def _t_quantile(confidence: float, df: int) -> float:
    """The x with P(|T| ≤ x) = ``confidence``: 12.706 for df 1, 2.093 for df 19 at 0.95."""
    low, high = 0.0, 1.0
    while _t_central(high, df) < confidence:
        low, high = high, 2.0 * high
    for _ in range(100):
        mid = (low + high) / 2.0
        if _t_central(mid, df) < confidence:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def _wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``p`` seen in ``n`` samples, at quantile ``z``."""
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denominator
    half = z / denominator * math.sqrt(max(p * (1.0 - p), 0.0) / n + z2 / (4.0 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _batch_variance(outcomes: Sequence[bool], batches: int) -> float:
    """The variance of the mean of ``outcomes``, from ``batches`` consecutive batch means."""
    n = len(outcomes)
    means = []
    for j in range(batches):
        chunk = outcomes[j * n // batches : (j + 1) * n // batches]
        means.append(sum(chunk) / len(chunk))
    grand = sum(means) / batches
    return sum((m - grand) ** 2 for m in means) / (batches - 1) / batches


def _batch_means_interval(
    outcomes: Sequence[bool], batches: int = BATCHES, confidence: float = CONFIDENCE
) -> _Interval:
    """The share of true ``outcomes`` (in time order) and its interval (see the module docstring).

    Example::

        >>> i = _batch_means_interval([True] * 40)   # nothing failed: n_eff = 20 batches
        >>> i.estimate, round(i.low, 4), i.high, i.effective_samples, i.degrees_of_freedom
        (1.0, 0.8203, 1.0, 20.0, 19)
    """
    n = len(outcomes)
    if batches < 4 or batches % 2 or n < batches:
        raise ValueError(
            f"batches must be even and >= 4, with at least that many outcomes; "
            f"got {batches} batches for {n} outcomes"
        )
    p = sum(outcomes) / n
    rarer = p < 0.5
    episodes = sum(
        1 for i, x in enumerate(outcomes) if x == rarer and (i == 0 or outcomes[i - 1] != x)
    )
    if episodes == 0:  # all one outcome: no spread to learn how long bursts last
        n_eff, df = float(batches), batches - 1
    else:
        fine = _batch_variance(outcomes, batches)
        coarse = _batch_variance(outcomes, batches // 2)
        # Batch means underestimate the variance by a share ~ 1/batch length (the correlation
        # that crosses batch edges); extrapolating from two lengths removes most of that.
        variance = max(fine, 2.0 * coarse - fine)
        binomial = p * (1.0 - p)
        n_eff = min(float(n), max(float(batches), binomial / variance if variance else n))
        df = min(batches // 2 - 1, episodes + 1)
    low, high = _wilson(p, n_eff, _t_quantile(confidence, df))
    return _Interval(p, low, high, n_eff, df, episodes)


# -- the simulation --------------------------------------------------------------------------------


@dataclass
class _Tally:
    """One client's per-request outcomes, in the order sent."""

    successes: list[bool] = field(default_factory=list)
    attempts: list[int | None] = field(default_factory=list)
    first_up: list[bool] = field(default_factory=list)
    late: float = 0.0  # the most a request went out after its scheduled time

    def summary(self, batches: int) -> dict[str, Any]:
        interval = _batch_means_interval(self.successes, batches)
        known = [a for a in self.attempts if a is not None]
        out: dict[str, Any] = {
            "requests": len(self.successes),
            "failed": len(self.successes) - sum(self.successes),
            "success": interval.estimate,
            "interval": [interval.low, interval.high],
            "effective_samples": interval.effective_samples,
            "degrees_of_freedom": interval.degrees_of_freedom,
            "failure_episodes": interval.episodes if interval.estimate >= 0.5 else None,
            "mean_attempts": sum(known) / len(known) if known else None,
            "max_late_seconds": self.late,
        }
        if self.first_up:
            out["first_attempt_up"] = sum(self.first_up) / len(self.first_up)
        return out


def _wait_until(at: float, tally: _Tally, stop: threading.Event) -> bool:
    """Wait for ``at`` (noting lateness); False if ``stop`` was set meanwhile."""
    delay = at - monotonic()
    if delay > 0:
        return not stop.wait(delay)
    tally.late = max(tally.late, -delay)
    return not stop.is_set()


def _faithful_client(
    urls: Sequence[str],
    attempts: int,
    times: Sequence[float],
    rng: random.Random,
    stop: threading.Event,
) -> _Tally:
    """Plain httpx as the model has it: up to ``attempts`` replicas in random order, at once."""
    import httpx

    tally = _Tally()
    n = len(urls)
    with httpx.Client(timeout=_TIMEOUT) as client:
        for at in times:
            if not _wait_until(at, tally, stop):
                break
            order = rng.sample(range(n), n)
            ok = False
            made = 0
            for k in range(attempts):
                made += 1
                try:
                    up = client.get(urls[order[k % n]] + _PATH).status_code == 200
                except httpx.TransportError:
                    up = False
                if k == 0:
                    tally.first_up.append(up)
                if up:
                    ok = True
                    break
            tally.successes.append(ok)
            tally.attempts.append(made)
    return tally


_GAVE_UP = re.compile(r"gave up after (\d+) attempt")


def _resilient_client(
    urls: Sequence[str], attempts: int, times: Sequence[float], stop: threading.Event
) -> _Tally:
    """`ResilientTransport` with its defaults (ejection, backoff, budget) over the same fleet."""
    import httpx

    from resilient._errors import ResilienceError
    from resilient.http import ResilientTransport

    tally = _Tally()
    transport = ResilientTransport(services={"fleet": list(urls)}, attempts=attempts)
    with httpx.Client(transport=transport, timeout=_TIMEOUT) as client:
        for at in times:
            if not _wait_until(at, tally, stop):
                break
            made: int | None = None
            try:
                response = client.get("http://fleet" + _PATH)
                ok = response.status_code == 200
                made = response.extensions.get("resilient", {}).get("attempts")
            except (httpx.HTTPError, ResilienceError) as exc:
                ok = False
                for note in getattr(exc, "__notes__", ()):
                    match = _GAVE_UP.search(str(note))
                    if match:
                        made = int(match.group(1))
            tally.successes.append(ok)
            tally.attempts.append(made)
    return tally


def _simulate(
    prediction: Prediction, *, requests: int, duration: float, seed: int
) -> dict[str, Any]:
    """Run both clients against a real Markov fleet; return the measurement as plain data."""
    from resilient.testing.fleet import Fleet

    check_count("requests", requests, minimum=BATCHES)
    check_positive("duration", duration)
    rng = random.Random(f"availability-{seed}")
    with Fleet(prediction.replicas, seed=seed) as fleet:
        for replica in fleet:
            # A steady-state start: down with probability 1 − A, and the chain is memoryless.
            if rng.random() < prediction.unavailability:
                replica.go_down()
            replica.set_markov(prediction.lam, prediction.mu)
        urls = fleet.urls
        start = monotonic() + 0.05
        spacing = duration / requests
        faithful_times = [start + (i + 0.5) * spacing for i in range(requests)]
        resilient_times = [t + spacing / 4.0 for t in faithful_times]
        tallies: dict[str, _Tally] = {}
        errors: list[BaseException] = []
        stop = threading.Event()  # set on an error or an interrupt: the other client stops too

        def run(name: str, job: Callable[[], _Tally]) -> None:
            try:
                tallies[name] = job()
            except BaseException as exc:  # re-raised in the main thread
                errors.append(exc)
                stop.set()

        threads = [
            threading.Thread(
                target=run,
                args=(
                    "faithful",
                    lambda: _faithful_client(urls, prediction.attempts, faithful_times, rng, stop),
                ),
            ),
            threading.Thread(
                target=run,
                args=(
                    "resilient",
                    lambda: _resilient_client(urls, prediction.attempts, resilient_times, stop),
                ),
            ),
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            stop.set()
            for thread in threads:
                if thread.is_alive():
                    thread.join()  # quick once stopped: at most one request in flight each
        elapsed = monotonic() - start
    if errors:
        raise errors[0]
    faithful = tallies["faithful"].summary(BATCHES)
    low, high = faithful["interval"]
    return {
        "seed": seed,
        "requests": requests,
        "duration": duration,
        "elapsed": elapsed,
        "batches": BATCHES,
        "batch_seconds": duration / BATCHES,
        "confidence": CONFIDENCE,
        "interval_method": (
            "Wilson score on the effective sample size of batch means "
            "(20 and 10 batches, extrapolated), t quantile"
        ),
        "faithful": faithful,
        "resilient": tallies["resilient"].summary(BATCHES),
        "prediction_inside": low <= prediction.success <= high,
    }


# -- the command -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``resilient availability``.

    Example::

        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--lam", "0.5", "--mu", "4.5", "--simulate"])
    """
    parser.add_argument("--lam", type=float, default=0.5, help="failure rate λ per second (0.5)")
    parser.add_argument("--mu", type=float, default=4.5, help="repair rate μ per second (4.5)")
    parser.add_argument("--replicas", type=int, default=3, help="replicas in the fleet (3)")
    parser.add_argument(
        "--attempts", type=int, default=3, help="attempts per request, on distinct replicas (3)"
    )
    parser.add_argument(
        "--time", type=float, default=None, help="also give P_f(t), P_r(t) and A(t) at t seconds"
    )
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="check the prediction against a real Markov fleet on loopback",
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="requests per client when simulating (2000)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=20.0,
        help="seconds the requests are spread over, evenly (20)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="the seed of every up/down duration (default 1, as resilient bench); "
        "another seed is another sample path",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Print the prediction (and, with ``--simulate``, the measurement); 0 on success, 2 on bad input.

    Example::

        run(argparse.Namespace(lam=0.5, mu=4.5, replicas=3, attempts=3, time=None,
                               simulate=False, requests=2000, duration=20.0, seed=1, json=True))
    """
    try:
        prediction = predict(args.lam, args.mu, args.replicas, args.attempts, args.time)
        if args.simulate:
            check_count("requests", args.requests, minimum=BATCHES)
            check_positive("duration", args.duration)
    except ValueError as exc:
        print(f"resilient availability: error: {exc}", file=sys.stderr)
        return 2
    simulation: dict[str, Any] | None = None
    if args.simulate:
        seed = int(args.seed)
        if not args.json:
            print(_render_prediction(prediction), flush=True)
            print(
                f"\nSimulating: {args.requests} requests per client over {args.duration:g} s "
                f"(seed {seed}) ...",
                flush=True,
            )
        simulation = _simulate(
            prediction, requests=args.requests, duration=args.duration, seed=seed
        )
        if not args.json:
            print(_render_simulation(prediction, simulation))
            return 0
    if args.json:
        out: dict[str, Any] = {"prediction": asdict(prediction)}
        if simulation is not None:
            out["simulation"] = simulation
        print(json.dumps(out, indent=2))
    else:
        print(_render_prediction(prediction))
    return 0


# -- rendering -------------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value:.6g} s"


def _render_prediction(p: Prediction) -> str:
    n, k = p.replicas, p.effective_attempts
    rows: list[tuple[str, str] | str] = [
        f"Two-state Markov model: λ = {p.lam:g}/s (failure), μ = {p.mu:g}/s (repair), "
        f"{n} replica{'s' * (n != 1)}, {p.attempts} attempt{'s' * (p.attempts != 1)} per request",
        "Per replica",
        ("availability A = μ/(λ+μ)", f"{p.availability:.6f}"),
        ("unavailability 1 − A", f"{p.unavailability:.6f}"),
        ("mean up time, MTTF = 1/λ", _seconds(p.mttf)),
        ("mean down time, MTTR = 1/μ", _seconds(p.mttr)),
        ("mean time between failures, MTBF = 1/λ + 1/μ", _seconds(p.mtbf)),
        ("failures per second, λ·A = 1/MTBF", f"{p.failure_frequency:.6g}"),
    ]
    if p.time is not None:
        assert p.p_fail is not None
        assert p.p_repair is not None
        assert p.availability_at is not None
        t = f"{p.time:g}"
        rows += [
            f"Within t = {t} s",
            (f"P_f({t}) = 1 − e^(−λt), an up replica fails", f"{p.p_fail:.6f}"),
            (f"P_r({t}) = 1 − e^(−μt), a down replica is repaired", f"{p.p_repair:.6f}"),
            (f"A({t}) = A + (1 − A)·e^(−(λ+μ)t), up at 0", f"{p.availability_at:.6f}"),
        ]
    rows += [
        "Per request",
        (f"success = 1 − (1 − A)^{k}", f"{p.success:.6f}"),
        (
            "expected attempts = Σ (1 − A)^" + ("min(i−1, n)" if p.attempts > n else "(i−1)"),
            f"{p.expected_attempts:.6f}",
        ),
        f"Fleet of {n}",
        (f"at least one up = 1 − (1 − A)^{n}", f"{p.any_up:.6f}"),
        ("replicas up on average = n·A", f"{p.mean_up_replicas:.6g}"),
        (f"outages (all {n} down) per second = n·μ·(1 − A)^n", f"{p.outage_frequency:.6g}"),
        ("mean outage = 1/(n·μ)", _seconds(p.outage_duration)),
        "Assumes independent replicas at steady state, and a request's attempts made at one "
        "instant,",
        "each on a replica not tried yet"
        + (
            f"; the {p.attempts - n} attempts beyond {n} replicas retry tried ones, "
            "still down: no gain in success."
            if p.attempts > n
            else "."
        ),
    ]
    width = max(len(r[0]) for r in rows if isinstance(r, tuple))
    lines = []
    for row in rows:
        if isinstance(row, tuple):
            lines.append(f"  {row[0]:<{width}}  {row[1]}")
        else:
            lines.append(row)
    return "\n".join(lines)


def _render_simulation(p: Prediction, s: dict[str, Any]) -> str:
    faithful, resilient = s["faithful"], s["resilient"]
    header = ("client", "success", f"{s['confidence']:.0%} interval", "failed", "attempts/request")
    table = [header]
    for label, row in (
        ("model-faithful (plain httpx)", faithful),
        ("resilient (defaults)", resilient),
    ):
        mean = row["mean_attempts"]
        table.append(
            (
                label,
                f"{row['success']:.6f}",
                f"[{row['interval'][0]:.6f}, {row['interval'][1]:.6f}]",
                f"{row['failed']}/{row['requests']}",
                "-" if mean is None else f"{mean:.4f}",
            )
        )
    table.append(("model", f"{p.success:.6f}", "", "", f"{p.expected_attempts:.4f}"))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    mixing = 1.0 / (p.lam + p.mu)
    lines = [
        f"Fleet({p.replicas}) on loopback, seed {s['seed']}: each replica up ~Exp({p.lam:g}/s), "
        f"down ~Exp({p.mu:g}/s), from a steady-state start;",
        f"{s['requests']} requests per client, one every "
        f"{s['duration'] / s['requests'] * 1e3:.3g} ms for {s['duration']:g} s "
        f"({s['elapsed']:.1f} s measured).",
    ]
    lines += [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table
    ]
    lines += [
        f"  replica availability seen by first attempts: {faithful['first_attempt_up']:.4f} "
        f"(model A = {p.availability:.6f})",
        "The model-faithful client tries up to the attempts on distinct replicas at once, nothing "
        "else; resilient",
        "also backs off and ejects replicas that fail, so it may beat the model.",
        f"Interval: Wilson score on the effective sample size of batch means ({s['batches']} "
        f"batches of {s['batch_seconds']:.3g} s, and {s['batches'] // 2}),",
        f"t quantile with {faithful['degrees_of_freedom']} degrees of freedom; "
        f"n_eff = {faithful['effective_samples']:.0f} of {faithful['requests']} requests.",
    ]
    if faithful["failed"] == 0:
        lines.append(
            "No request failed: how long failures last cannot be seen, so each batch counts as "
            "one sample (a wide interval)."
        )
    elif faithful["failure_episodes"] is not None and faithful["failure_episodes"] < 5:
        lines.append(
            f"Failures came in {faithful['failure_episodes']} episode(s) only: a rough "
            "interval; a longer --duration narrows it."
        )
    if s["batch_seconds"] < 2.5 * mixing:
        lines.append(
            f"Batches are short beside 1/(λ+μ) = {mixing:.3g} s: the interval may be too "
            f"narrow; use --duration {2.5 * mixing * s['batches']:.3g} or more."
        )
    if faithful["max_late_seconds"] > 0.25 * s["batch_seconds"]:  # stretches a batch
        lines.append(
            f"The model-faithful client fell behind its schedule by up to "
            f"{faithful['max_late_seconds']:.3g} s (a busy machine?)."
        )
    if s["prediction_inside"]:
        verdict = "inside the model-faithful interval: model and fleet agree."
    else:
        verdict = "OUTSIDE the model-faithful interval: model and fleet disagree."
    lines.append(f"Prediction {p.success:.6f} is {verdict}")
    return "\n".join(lines)
