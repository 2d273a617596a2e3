from __future__ import annotations

import dataclasses
import doctest
import json
import math
from typing import Any

import pytest

from resilient import availability
from resilient.availability import (
    Prediction,
    _batch_means_interval,
    _render_simulation,
    _t_quantile,
    _wilson,
    predict,
)
from resilient.cli import main

# -- the formulas, against arithmetic done by hand --------------------------------------------------


def test_the_issue_example_by_hand() -> None:
    p = predict(0.5, 4.5, replicas=3, attempts=3, time=1.0)
    # A = μ/(λ+μ) = 4.5/5 = 0.9, so 1 − A = 0.1
    assert p.availability == pytest.approx(0.9, abs=1e-12)
    assert p.unavailability == pytest.approx(0.1, abs=1e-12)
    # success = 1 − 0.1³ = 1 − 0.001 = 0.999
    assert p.success == pytest.approx(0.999, abs=1e-12)
    assert p.effective_attempts == 3
    # expected attempts = 1 + 0.1 + 0.01 = 1.11 (= (1 − 0.001)/0.9 = 0.999/0.9)
    assert p.expected_attempts == pytest.approx(1.11, abs=1e-12)
    # at least one of 3 up = 1 − 0.1³ = 0.999; replicas up on average = 3·0.9 = 2.7
    assert p.any_up == pytest.approx(0.999, abs=1e-12)
    assert p.mean_up_replicas == pytest.approx(2.7, abs=1e-12)
    # MTTF = 1/0.5 = 2 s, MTTR = 1/4.5 = 0.2222 s, MTBF = 2 + 0.2222 = 2.2222 s
    assert p.mttf == pytest.approx(2.0)
    assert p.mttr == pytest.approx(0.222222, abs=1e-6)
    assert p.mtbf == pytest.approx(2.222222, abs=1e-6)
    # failures per second = λ·A = 0.5·0.9 = 0.45 = 1/2.2222
    assert p.failure_frequency == pytest.approx(0.45, abs=1e-12)
    assert p.failure_frequency == pytest.approx(1.0 / p.mtbf)
    # fleet outages: n·μ·(1−A)^n = 3·4.5·0.001 = 0.0135 per second, lasting 1/(3·4.5) = 0.074074 s
    assert p.outage_frequency == pytest.approx(0.0135, abs=1e-12)
    assert p.outage_duration == pytest.approx(0.074074, abs=1e-6)
    # P_f(1) = 1 − e^−0.5 = 1 − 0.606531 = 0.393469
    assert p.time == 1.0
    assert p.p_fail == pytest.approx(0.393469, abs=1e-6)
    # P_r(1) = 1 − e^−4.5 = 1 − 0.011109 = 0.988891
    assert p.p_repair == pytest.approx(0.988891, abs=1e-6)
    # A(1) = 0.9 + 0.1·e^−5 = 0.9 + 0.1·0.006738 = 0.900674
    assert p.availability_at == pytest.approx(0.900674, abs=1e-6)


def test_transient_availability_at_a_tenth_of_a_second() -> None:
    # A(0.1) = 0.9 + 0.1·e^−(5·0.1) = 0.9 + 0.1·0.606531 = 0.960653
    assert predict(0.5, 4.5, time=0.1).availability_at == pytest.approx(0.960653, abs=1e-6)


def test_at_time_zero_the_replica_is_up_and_nothing_has_happened() -> None:
    p = predict(0.5, 4.5, time=0.0)
    assert p.availability_at == 1.0  # 0.9 + 0.1·e^0
    assert p.p_fail == 0.0
    assert p.p_repair == 0.0


def test_without_time_the_transient_fields_are_none() -> None:
    p = predict(0.5, 4.5)
    assert p.time is None
    assert p.p_fail is None
    assert p.p_repair is None
    assert p.availability_at is None


def test_fewer_attempts_than_replicas() -> None:
    p = predict(1.0, 3.0, replicas=5, attempts=2)
    # A = 3/4 = 0.75, 1 − A = 0.25
    # success = 1 − 0.25² = 1 − 0.0625 = 0.9375; expected attempts = 1 + 0.25 = 1.25
    assert p.success == pytest.approx(0.9375, abs=1e-12)
    assert p.expected_attempts == pytest.approx(1.25, abs=1e-12)
    # any of 5 up = 1 − 0.25⁵ = 1 − 0.0009765625 = 0.9990234375
    assert p.any_up == pytest.approx(0.9990234375, abs=1e-12)
    # outages: 5·3·0.25⁵ = 15·0.0009765625 = 0.0146484375 per second, lasting 1/15 s
    assert p.outage_frequency == pytest.approx(0.0146484375, abs=1e-12)
    assert p.outage_duration == pytest.approx(1 / 15)


def test_attempts_beyond_the_replicas_add_attempts_but_no_success() -> None:
    p = predict(0.5, 4.5, replicas=2, attempts=5)
    assert p.effective_attempts == 2
    # success = 1 − 0.1² = 0.99 (only 2 distinct replicas)
    assert p.success == pytest.approx(0.99, abs=1e-12)
    # attempts: 1 + 0.1 + then attempts 3, 4, 5 each made when both are down (0.01): 1.13
    assert p.expected_attempts == pytest.approx(1.13, abs=1e-12)
    assert predict(0.5, 4.5, replicas=2, attempts=2).expected_attempts == pytest.approx(1.1)


def test_one_replica_one_attempt_is_the_replica_availability() -> None:
    p = predict(2.0, 6.0, replicas=1, attempts=1)
    # A = 6/8 = 0.75
    assert p.success == pytest.approx(0.75, abs=1e-12)
    assert p.any_up == pytest.approx(0.75, abs=1e-12)
    assert p.expected_attempts == pytest.approx(1.0, abs=1e-12)


def test_extreme_rates_keep_their_precision() -> None:
    # A ≈ 1e-12: 1 − (1 − A)³ ≈ 3A; computed naively it would be off in the 4th digit
    p = predict(1.0, 1e-12, replicas=3, attempts=3)
    assert p.success == pytest.approx(3e-12, rel=1e-9)
    assert p.expected_attempts == pytest.approx(3.0, rel=1e-9)  # 1 + q + q², q ≈ 1
    # q ≈ 1e-12: success rounds to 1, and nothing divides by zero
    q = predict(1e-12, 1.0, replicas=3, attempts=3)
    assert q.success == 1.0
    assert q.unavailability == pytest.approx(1e-12, rel=1e-9)
    assert q.expected_attempts == pytest.approx(1.0, rel=1e-9)


def test_rates_near_the_float_maximum_do_not_overflow() -> None:
    # lam + mu overflows to inf: A = mu / (lam + mu) read 0, and the outage frequency nan.
    p = predict(1e308, 1e308, replicas=3, attempts=3)
    assert (p.availability, p.unavailability) == (0.5, 0.5)
    assert p.success == 0.875  # 1 - 0.5^3
    assert p.outage_frequency == pytest.approx(3.75e307)  # 3 * 1e308 * 0.5^3


def test_prediction_is_frozen() -> None:
    p = predict(0.5, 4.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.success = 1.0  # type: ignore[misc]
    assert isinstance(p, Prediction)


def test_the_docstring_examples_hold() -> None:
    result = doctest.testmod(availability)
    assert result.attempted >= 9
    assert result.failed == 0


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "shown"),
    [
        ({"lam": 0.0}, "lam", "0.0"),
        ({"lam": -1.0}, "lam", "-1.0"),
        ({"lam": math.nan}, "lam", "nan"),
        ({"lam": math.inf}, "lam", "inf"),
        ({"mu": 0}, "mu", "0"),
        ({"mu": "4.5"}, "mu", "'4.5'"),
        ({"replicas": 0}, "replicas", "0"),
        ({"replicas": 2.0}, "replicas", "2.0"),
        ({"replicas": True}, "replicas", "True"),
        ({"attempts": 0}, "attempts", "0"),
        ({"time": -0.5}, "time", "-0.5"),
        ({"time": math.nan}, "time", "nan"),
    ],
)
def test_invalid_input_names_the_field_and_value(
    kwargs: dict[str, Any], field: str, shown: str
) -> None:
    arguments: dict[str, Any] = {"lam": 0.5, "mu": 4.5, "replicas": 3, "attempts": 3, "time": None}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=field) as info:
        predict(**arguments)
    assert str(info.value).startswith(field)
    assert info.value.args[0].endswith(shown)


# -- the interval ----------------------------------------------------------------------------------


def test_t_quantiles_by_hand() -> None:
    # df 1 (Cauchy): P(|T| ≤ x) = 2·atan(x)/π = 0.95  →  x = tan(0.475·π) = 12.7062
    assert _t_quantile(0.95, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    assert _t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
    # df 2: P(|T| ≤ x) = x/√(2 + x²) = 0.95  →  x² = 2·0.9025/0.0975 = 18.5128, x = 4.30265
    assert _t_quantile(0.95, 2) == pytest.approx(4.30265, abs=1e-5)
    # tables: df 9 → 2.2622, df 19 → 2.0930; large df → z = 1.95996
    assert _t_quantile(0.95, 9) == pytest.approx(2.2622, abs=1e-4)
    assert _t_quantile(0.95, 19) == pytest.approx(2.0930, abs=1e-4)
    assert _t_quantile(0.95, 10_000) == pytest.approx(1.95996, abs=1e-3)


def test_wilson_by_hand() -> None:
    # 90 of 100 at z = 1.96: z² = 3.8416, 1 + z²/n = 1.038416
    # center = (0.9 + 3.8416/200)/1.038416 = 0.919208/1.038416 = 0.885202
    # half = 1.96·√(0.09/100 + 3.8416/40000)/1.038416 = 1.96·√0.00099604/1.038416 = 0.059569
    low, high = _wilson(0.9, 100, 1.96)
    assert low == pytest.approx(0.825633, abs=1e-6)
    assert high == pytest.approx(0.944771, abs=1e-6)
    # nothing failed: [n/(n + z²), 1]
    assert _wilson(1.0, 100, 1.96) == pytest.approx((100 / 103.8416, 1.0))


def test_no_failure_counts_each_batch_as_one_sample() -> None:
    interval = _batch_means_interval([True] * 40)
    assert interval.estimate == 1.0
    assert interval.episodes == 0
    assert interval.effective_samples == 20.0
    assert interval.degrees_of_freedom == 19
    # Wilson with n = 20 and t₁₉ = 2.09302: low = 20/(20 + 4.38074) = 0.820320
    assert interval.low == pytest.approx(0.820320, abs=1e-5)
    assert interval.high == 1.0


def test_one_burst_of_failures_gives_a_wide_interval() -> None:
    outcomes = [True] * 100
    outcomes[40:45] = [False] * 5  # one episode, inside batch 8 of 20 (and batch 4 of 10)
    interval = _batch_means_interval(outcomes)
    assert interval.estimate == pytest.approx(0.95)
    assert interval.episodes == 1
    # 20 batches of 5: nineteen means of 1, one of 0; grand mean 0.95
    #   Σ (m − 0.95)² = 19·0.0025 + 0.9025 = 0.95; variance of the mean = 0.95/19/20 = 0.0025
    # 10 batches of 10: nine of 1, one of 0.5: Σ = 9·0.0025 + 0.2025 = 0.225; 0.225/9/10 = 0.0025
    # extrapolated: 2·0.0025 − 0.0025 = 0.0025; n_eff = 0.95·0.05/0.0025 = 19, clipped up to 20
    assert interval.effective_samples == pytest.approx(20.0)
    assert interval.degrees_of_freedom == 2  # one episode + 1
    # Wilson(0.95, n = 20, t₂ = 4.30265): center = (0.95 + 18.5128/40)/1.92564 = 0.733689
    #   half = 4.30265·√(0.0475/20 + 18.5128/1600)/1.92564 = 0.263863
    assert interval.low == pytest.approx(0.469826, abs=1e-4)
    assert interval.high == pytest.approx(0.997552, abs=1e-4)


def test_evenly_spread_failures_count_as_independent() -> None:
    outcomes = [i % 10 != 9 for i in range(200)]  # every batch of 10 holds exactly one failure
    interval = _batch_means_interval(outcomes)
    assert interval.estimate == pytest.approx(0.9)
    assert interval.episodes == 20
    assert interval.effective_samples == 200.0  # the batch means do not vary at all
    assert interval.degrees_of_freedom == 9


def test_bursts_shrink_the_effective_sample_size() -> None:
    spread = _batch_means_interval([i % 10 != 9 for i in range(400)])
    bursty = _batch_means_interval([(i // 20) % 10 != 9 for i in range(400)])
    assert spread.estimate == bursty.estimate == pytest.approx(0.9)
    assert bursty.effective_samples < spread.effective_samples / 5
    assert bursty.high - bursty.low > 2 * (spread.high - spread.low)


def test_interval_needs_an_even_number_of_batches_and_enough_outcomes() -> None:
    with pytest.raises(ValueError, match="batches"):
        _batch_means_interval([True] * 10)
    with pytest.raises(ValueError, match="batches"):
        _batch_means_interval([True] * 40, batches=7)


# -- the command -----------------------------------------------------------------------------------


def test_cli_prints_the_prediction(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["availability", "--lam", "0.5", "--mu", "4.5", "--replicas", "3", "--attempts", "3"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "availability A = μ/(λ+μ)" in out
    assert "0.900000" in out
    assert "success = 1 − (1 − A)^3" in out
    assert "0.999000" in out
    assert "1.110000" in out  # expected attempts
    assert "independent replicas at steady state" in out
    assert "P_f" not in out  # no --time


def test_cli_time_gives_the_transient_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["availability", "--lam", "0.5", "--mu", "4.5", "--time", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "P_f(0.1)" in out
    assert "0.048771" in out  # 1 − e^−0.05
    assert "0.960653" in out  # A(0.1)


def test_cli_says_when_attempts_exceed_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["availability", "--replicas", "2", "--attempts", "5"]) == 0
    out = capsys.readouterr().out
    assert "success = 1 − (1 − A)^2" in out
    assert "the 3 attempts beyond 2 replicas retry tried ones" in out
    assert "expected attempts = Σ (1 − A)^min(i−1, n)" in out


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["availability", "--lam", "0.5", "--mu", "4.5", "--time", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"prediction"}
    prediction = data["prediction"]
    assert set(prediction) == {f.name for f in dataclasses.fields(Prediction)}
    assert prediction["success"] == pytest.approx(0.999)
    assert prediction["expected_attempts"] == pytest.approx(1.11)
    assert prediction["p_fail"] == pytest.approx(0.393469, abs=1e-6)


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--lam", "0"], "lam"),
        (["--mu", "-2"], "mu"),
        (["--replicas", "0"], "replicas"),
        (["--attempts", "0"], "attempts"),
        (["--time", "-1"], "time"),
        (["--simulate", "--requests", "19"], "requests"),
        (["--simulate", "--duration", "0"], "duration"),
    ],
)
def test_cli_rejects_bad_input_before_starting_anything(
    argv: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["availability", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"error: {field} must" in captured.err


def _simulation(*, inside: bool, failed: int, episodes: int | None, late: float) -> dict[str, Any]:
    row = {
        "requests": 2000,
        "failed": failed,
        "success": 1 - failed / 2000,
        "interval": [0.99, 0.9995] if inside else [0.95, 0.98],
        "effective_samples": 120.0,
        "degrees_of_freedom": 9,
        "failure_episodes": episodes,
        "mean_attempts": 1.1,
        "max_late_seconds": late,
        "first_attempt_up": 0.9,
    }
    return {
        "seed": 5,
        "requests": 2000,
        "duration": 4.0,
        "elapsed": 4.0,
        "batches": 20,
        "batch_seconds": 0.2,
        "confidence": 0.95,
        "faithful": row,
        "resilient": {**row, "mean_attempts": None},
        "prediction_inside": inside,
    }


def test_rendering_says_agree_or_disagree_and_warns() -> None:
    p = predict(0.5, 4.5)
    agree = _render_simulation(p, _simulation(inside=True, failed=3, episodes=2, late=0.0))
    assert "Prediction 0.999000 is inside the model-faithful interval: model and fleet agree." in (
        agree
    )
    assert "Failures came in 2 episode(s) only" in agree
    # 0.2 s batches beside 1/(λ+μ) = 0.2 s: too short
    assert "Batches are short" in agree
    assert "--duration 10 or more" in agree
    assert "fell behind" not in agree
    disagree = _render_simulation(p, _simulation(inside=False, failed=0, episodes=None, late=0.5))
    assert "OUTSIDE the model-faithful interval: model and fleet disagree." in disagree
    assert "No request failed" in disagree
    assert "fell behind its schedule by up to 0.5 s" in disagree
    lines = {line.split("  ")[1]: line for line in disagree.splitlines() if line.startswith("  ")}
    assert lines["resilient (defaults)"].endswith("-")  # attempts unknown


@pytest.mark.slow
def test_simulation_agrees_with_the_prediction(capsys: pytest.CaptureFixture[str]) -> None:
    # 800 requests over 8 s on a real fleet: λ = 0.5, μ = 4.5, 3 replicas, 3 attempts. The seed
    # fixes every up/down duration, so the run is reproducible: seed 5 has one fleet outage about
    # 40 ms long (3 or 4 failed requests), so the interval is computed from failures, not from the
    # nothing-failed fallback; the prediction would leave it only past ~16 failed requests. Over
    # random seeds the prediction falls outside in ~1 % of such runs (see the module docstring).
    argv = ["availability", "--simulate", "--json", "--duration", "8", "--requests", "800"]
    assert main([*argv, "--seed", "5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prediction"]["success"] == pytest.approx(0.999)
    sim = data["simulation"]
    assert sim["seed"] == 5
    assert sim["requests"] == 800
    assert sim["batches"] == 20
    assert 7.5 < sim["elapsed"] < 12.0
    for name in ("faithful", "resilient"):
        row = sim[name]
        assert row["requests"] == 800
        assert 0 <= row["failed"] <= 800
        assert row["success"] == pytest.approx(1 - row["failed"] / 800)
        low, high = row["interval"]
        assert 0.0 <= low <= row["success"] <= high <= 1.0
        assert 20 <= row["effective_samples"] <= 800
        assert 1.0 <= row["mean_attempts"] <= 3.0
    faithful = sim["faithful"]
    low, high = faithful["interval"]
    assert sim["prediction_inside"] is (low <= 0.999 <= high)
    assert sim["prediction_inside"]
    # loose: replicas are up 90 % of the time, so first attempts mostly succeed and few repeat
    assert 0.75 <= faithful["first_attempt_up"] <= 1.0
    assert 1.0 <= faithful["mean_attempts"] <= 1.35
    assert faithful["success"] >= 0.95
