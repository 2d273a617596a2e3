"""`resilient bench`: structure and sanity of a short real run; the targets' logic on made-up runs.

Timings and the targets themselves are for the benchmark, never for this suite.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Any

import pytest

from resilient import _bench
from resilient._bench import CLIENTS, SCENARIOS, TARGETS, RunResult, check_targets
from resilient.cli import main

SHORT = ["--requests", "200", "--threads", "4", "--clients", "plain,resilient"]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_short_run_reports_every_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    status = main(["bench", "crash", "outage", *SHORT, "--json", str(out)])
    assert status == 0  # without --check a missed target does not fail the command
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert data["settings"]["requests"] == 200
    assert data["settings"]["threads"] == 4
    assert set(data["scenarios"]) == {"crash", "outage"}
    assert set(data["clients"]) == {"plain", "resilient"}
    runs = {(r["scenario"], r["client"]): r for r in data["runs"]}
    assert list(runs) == [
        ("crash", "plain"),
        ("crash", "resilient"),
        ("outage", "plain"),
        ("outage", "resilient"),
    ]
    for run in runs.values():
        assert run["skipped"] is None
        assert run["requests"] == 200
        assert 0.0 <= run["success_pct"] <= 100.0
        assert run["succeeded"] == run["outcomes"].get("200", 0)
        assert sum(run["outcomes"].values()) == 200
        assert len(run["seen_by_replica"]) == 3
        assert run["seen"] == sum(run["seen_by_replica"])
        assert run["amplification"] > 0
        assert run["amplification"] == pytest.approx(run["seen"] / 200)
        assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
        assert run["wall_s"] > 0
        assert "samples" not in run
    # A plain client sends every request once, to replicas that all listen: each is seen once.
    plain = runs[("outage", "plain")]
    assert plain["seen"] == 200
    assert plain["success_pct"] == 0.0
    assert plain["outcomes"] == {"503": 200}
    assert runs[("outage", "resilient")]["success_pct"] == 0.0

    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["outage", "plain"])
    row = lines[start + 1].split()
    assert row[0] == "resilient"
    amplification = f"{runs[('outage', 'resilient')]['amplification']:.3f}"
    assert row[5] == amplification  # success, p50, p99, max, amplification, wall

    verdicts: dict[str, set[str]] = {t["scenario"]: set() for t in data["targets"]}
    for target in data["targets"]:
        verdicts[target["scenario"]].add(target["verdict"])
        if target["verdict"] != "SKIP":
            assert f"{target['verdict']}  {target['name']}: " in stdout
    assert verdicts["crash"] <= {"PASS", "FAIL"}
    assert verdicts["outage"] <= {"PASS", "FAIL"}
    assert verdicts["gray"] == verdicts["hang"] == verdicts["tail"] == {"SKIP"}


def _run(scenario: str, client: str = "resilient", **values: float) -> RunResult:
    result = RunResult(scenario, client, client, requests=1000)
    for name, value in values.items():
        setattr(result, name, value)
    return result


def _perfect() -> list[RunResult]:
    good = {"success_pct": 100.0, "p99_ms": 5.0, "amplification": 1.0, "wall_s": 2.0}
    return [_run(name, "resilient", **good) for name in SCENARIOS] + [
        _run("outage", "plain", wall_s=9.0)
    ]


def test_targets_pass_on_good_runs_and_only_judge_resilient() -> None:
    results = _perfect()
    results[-2].amplification = 0.2  # resilient's outage
    judged = check_targets(results)
    assert [t.target for t in judged] == list(TARGETS)
    assert {t.verdict for t in judged} == {"PASS"}
    hang_wall = next(t for t in judged if t.target.metric == "wall_vs_crash")
    assert hang_wall.value == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("scenario", "metric", "value"),
    [
        ("crash", "success_pct", 99.94),
        ("crash", "amplification", 1.06),
        ("gray", "p99_ms", 30.5),
        ("hang", "wall_s", 3.1),  # > 1.5x crash's 2.0 s
        ("tail", "amplification", 1.11),
        ("outage", "amplification", 0.51),
        ("outage", "p99_ms", 21.0),
    ],
)
def test_each_missed_target_fails(scenario: str, metric: str, value: float) -> None:
    results = _perfect()
    next(r for r in results if r.scenario == "outage").amplification = 0.2
    run = next(r for r in results if (r.scenario, r.client) == (scenario, "resilient"))
    setattr(run, metric, value)
    failed = [t.target for t in check_targets(results) if t.verdict == "FAIL"]
    expected = "wall_vs_crash" if metric == "wall_s" else metric
    assert [(t.scenario, t.metric) for t in failed] == [(scenario, expected)]


def test_targets_of_scenarios_not_run_are_skipped() -> None:
    judged = check_targets([_run("hang", success_pct=100.0, p99_ms=1.0, wall_s=1.0)])
    verdicts = {(t.target.scenario, t.target.metric): t.verdict for t in judged}
    assert verdicts[("hang", "success_pct")] == "PASS"
    assert verdicts[("hang", "wall_vs_crash")] == "SKIP"  # no crash run to compare with
    assert verdicts[("crash", "success_pct")] == "SKIP"
    assert check_targets([_run("crash", "plain", success_pct=50.0)])[0].verdict == "SKIP"


def test_a_skipped_resilient_run_fails_its_targets() -> None:
    result = _run("tail")
    result.skipped = "not installed"
    judged = [t for t in check_targets([result]) if t.target.scenario == "tail"]
    assert {t.verdict for t in judged} == {"FAIL"}


@pytest.mark.parametrize(("good", "status"), [(True, 0), (False, 1)])
def test_check_exits_1_on_a_failed_target(
    monkeypatch: pytest.MonkeyPatch, good: bool, status: int
) -> None:
    def fake_bench(scenarios: list[str], clients: list[str], *args: object) -> list[RunResult]:
        assert scenarios == ["tail"]
        assert clients == ["resilient"]
        return [_run("tail", p99_ms=5.0 if good else 50.0, amplification=1.0, wall_s=1.0)]

    monkeypatch.setattr(_bench, "run_bench", fake_bench)
    assert main(["bench", "tail", "--clients", "resilient", "--check"]) == status
    assert main(["bench", "tail", "--clients", "resilient"]) == 0


def test_plot_without_matplotlib_says_so_before_running(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_bench(*args: object) -> list[RunResult]:
        raise AssertionError("nothing may run when the plot cannot be drawn")

    monkeypatch.setattr(_bench, "_load_pyplot", lambda: None)
    monkeypatch.setattr(_bench, "run_bench", no_bench)
    assert main(["bench", "crash", "--plot", "out.png"]) == 2
    assert "matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_output_path_that_cannot_be_written_is_refused_before_running(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    option: str,
) -> None:
    def no_bench(*args: object) -> list[RunResult]:
        raise AssertionError("nothing may run when its results could not be kept")

    monkeypatch.setattr(_bench, "run_bench", no_bench)
    missing = tmp_path / "no-such-dir" / "out"
    assert main(["bench", "crash", option, str(missing)]) == 2
    assert f"{option} {missing}: no such directory" in capsys.readouterr().err
    assert main(["bench", "crash", option, str(tmp_path)]) == 2
    assert "it is a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "meltdown"],
        ["bench", "--clients", "plain,curl"],
        ["bench", "--requests", "0"],
        ["bench", "--threads", "x"],
    ],
)
def test_bad_arguments_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2


def test_every_client_is_described() -> None:
    assert list(CLIENTS) == ["plain", "httpx-retries", "tenacity", "pyresilience", "resilient"]
    assert list(SCENARIOS) == ["crash", "gray", "hang", "tail", "outage"]
    for spec in CLIENTS.values():
        assert spec.configuration


@pytest.mark.slow
def test_overhead_runs_from_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "overhead", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data) == {"overhead"}  # no scenario was asked for
    assert data["overhead"]["quick"] is True
    assert {t["row"] for t in data["overhead"]["targets"]} == {
        "resilient.pipeline",
        "resilient.pipeline_timeout",
    }
    assert "TARGETS" in capsys.readouterr().out


def test_a_missing_peer_is_reported_and_skipped() -> None:
    spec = dataclasses.replace(CLIENTS["tenacity"], requires=("no_such_peer_package",))
    result = _bench.run_one(SCENARIOS["tail"], spec, _bench.Settings())  # starts no fleet
    assert result.skipped is not None
    assert "no_such_peer_package" in result.skipped
    assert result.requests == 0
    table = _bench.render([result], check_targets([result]))
    assert "skipped [1]" in table
    assert f"[1] tenacity failover: {result.skipped}" in table


def test_the_markov_column_uses_the_availability_model() -> None:
    pytest.importorskip("resilient.availability")
    assert _bench.markov_prediction(3) == pytest.approx(99.9)
    assert _bench.markov_prediction(1) == pytest.approx(90.0)


def test_the_harness_heap_is_frozen_out_of_the_collector_only_while_a_run_lasts() -> None:
    # Earlier runs' samples must not cost the client under test full-collection pauses; the
    # freeze must end with the run, even when the client raises.
    kept = [object() for _ in range(1000)]  # stands for earlier runs' results
    seen: list[int] = []

    class Client:
        def get(self, path: str) -> _bench.Outcome:
            seen.append(gc.get_freeze_count())
            return _bench.Outcome(ok=True, status=200)

        def close(self) -> None:
            pass

    samples, _ = _bench._drive(
        Client(), _bench.Settings(requests=20, threads=2), None, lambda: None
    )
    assert len(samples) == 20
    assert min(seen) >= len(kept)
    assert gc.get_freeze_count() == 0

    class Failing(Client):
        def get(self, path: str) -> _bench.Outcome:
            raise RuntimeError("client broke")

    with pytest.raises(RuntimeError, match="client broke"):
        _bench._drive(Failing(), _bench.Settings(requests=5, threads=1), None, lambda: None)
    assert gc.get_freeze_count() == 0
