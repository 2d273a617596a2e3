"""Every example runs as a script and says it behaved; `benchmarks/transport.py` runs end to end.

The examples start their own local replica servers and check their own results (exit 1 on a
surprise), so running them is the test. The benchmark is judged on the shape of its report, never
on its timings; its pass/fail logic is tested on made-up measurements.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import transport as bench

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HTTP_LINES = ("retries: ", "override: ", "idempotency: ", "stale-if-error: ")


def run_script(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_quickstart() -> None:
    done = run_script(str(EXAMPLES / "quickstart.py"))
    assert done.returncode == 0, done.stdout + done.stderr
    # Seeded failures: every item is answered (none by the fallback's -1), the breaker stays closed.
    assert done.stdout.splitlines()[0] == "[5, 4, 6] closed"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["http_sync", "http_asyncio", "http_trio"])
def test_http_example(name: str) -> None:
    done = run_script(str(EXAMPLES / f"{name}.py"))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == f"{name}: all 4 demonstrations behaved as expected"
    for prefix in HTTP_LINES:
        assert any(line.startswith(prefix) for line in lines), (prefix, done.stdout)
    assert "served the cached /catalog" in done.stdout


def test_every_example_is_tested() -> None:
    tested = {"quickstart.py", "http_sync.py", "http_asyncio.py", "http_trio.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


# -- benchmarks/transport.py -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "transport.json"
    done = run_script(
        str(ROOT / "benchmarks" / "transport.py"),
        "--quick",
        "--profile",
        "--json",
        str(out),
        timeout=120.0,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    data["_stdout"] = done.stdout
    return data


@pytest.mark.slow
def test_benchmark_measures_every_cpu_cell(report: dict[str, Any]) -> None:
    assert report["quick"] is True
    cpu = report["cpu"]
    assert cpu["unit"] == "µs per request"
    rows = {row["key"]: row for row in cpu["rows"]}
    assert set(rows) == {"sync", "asyncio", "trio"}
    for row in rows.values():
        assert row["errors"] == {"plain": None, "resilient": None}, row
        assert row["plain_us"] > 0
        assert row["resilient_us"] > 0
        assert row["added_us"] == pytest.approx(row["resilient_us"] - row["plain_us"])
        assert row["ratio"] == pytest.approx(row["resilient_us"] / row["plain_us"])
        assert row["label"] in report["_stdout"]


@pytest.mark.slow
def test_benchmark_measures_loopback_throughput(report: dict[str, Any]) -> None:
    throughput = report["throughput"]
    assert throughput["unit"] == "requests/s"
    rows = {row["key"]: row for row in throughput["rows"]}
    assert set(rows) == {"sync.1_thread", "sync.4_thread"}
    assert [rows[k]["threads"] for k in ("sync.1_thread", "sync.4_thread")] == [1, 4]
    for row in rows.values():
        # An error here also covers the replica counting other than one request per GET sent.
        assert row["errors"] == {"plain": None, "resilient": None}, row
        assert row["requests"] > 0
        assert row["plain_rps"] > 0
        assert row["resilient_rps"] > 0
        assert row["ratio"] == pytest.approx(row["resilient_rps"] / row["plain_rps"])


@pytest.mark.slow
def test_benchmark_reports_targets_and_profile(report: dict[str, Any]) -> None:
    targets = {(t["section"], t["row"], t["metric"]): t for t in report["targets"]}
    assert set(targets) == {
        ("cpu", "sync", "added_us"),
        ("cpu", "asyncio", "added_us"),
        ("throughput", "sync.1_thread", "ratio"),
        ("throughput", "sync.4_thread", "ratio"),
    }
    stdout = report["_stdout"]
    assert "TARGETS" in stdout
    for target in targets.values():
        assert isinstance(target["pass"], bool)
        assert target["value"] is not None
        assert target["error"] is None
        verdict = "PASS" if target["pass"] else "FAIL"
        assert f"{verdict}  {target['name']}" in stdout
    assert "cProfile:" in stdout
    assert "handle_request" in stdout


def _rows(added_us: float | None, ratio: float) -> tuple[list[bench.CpuRow], list[bench.RpsRow]]:
    resilient = (
        bench.CpuCell()
        if added_us is None
        else bench.CpuCell(us=50.0 + added_us, samples=[50.0 + added_us])
    )
    if added_us is None:
        resilient.error = "RuntimeError: broken"
    cpu = [
        bench.CpuRow(key, key, bench.CpuCell(us=50.0, samples=[50.0]), resilient)
        for key in ("sync", "asyncio")
    ]
    rps = [
        bench.RpsRow(
            f"sync.{n}_thread", "x", n, 100, bench.RpsCell(1000.0), bench.RpsCell(1000.0 * ratio)
        )
        for n in (1, 4)
    ]
    return cpu, rps


def test_targets_pass_within_limits() -> None:
    results = bench.check_targets(*_rows(added_us=9.5, ratio=0.95))
    assert [r.passed for r in results] == [True, True, True, True]
    assert [r.value for r in results] == pytest.approx([9.5, 9.5, 0.95, 0.95])


def test_targets_fail_beyond_limits() -> None:
    results = bench.check_targets(*_rows(added_us=10.5, ratio=0.85))
    assert [r.passed for r in results] == [False, False, False, False]


def test_a_missing_measurement_fails_its_target() -> None:
    results = bench.check_targets(*_rows(added_us=None, ratio=1.0))
    assert [r.passed for r in results] == [False, False, True, True]
    assert results[0].value is None
    assert results[0].error == "not measured (RuntimeError: broken)"


@pytest.mark.parametrize(
    ("added_us", "check", "code"), [(5.0, True, 0), (50.0, True, 1), (50.0, False, 0)]
)
def test_check_exits_1_on_a_missed_target(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    added_us: float,
    check: bool,
    code: int,
) -> None:
    cpu, rps = _rows(added_us=added_us, ratio=1.0)
    monkeypatch.setattr(bench, "measure_cpu", lambda settings, progress=None: cpu)
    monkeypatch.setattr(bench, "measure_throughput", lambda settings, progress=None: rps)
    assert bench.main(["--check"] if check else []) == code
    verdict = "PASS" if added_us <= 10 else "FAIL"
    assert f"{verdict}  sync: ResilientTransport adds" in capsys.readouterr().out


def test_added_cost_is_the_median_of_paired_repeats() -> None:
    # Pairs (50, 55), (80, 81), (50, 70): differences 5, 1, 20 -> 5. The minimums (50 and 55)
    # would say 5 too here, but the medians of each side (50, 70) would say 20.
    plain = bench.CpuCell(us=50.0, samples=[50.0, 80.0, 50.0])
    resilient = bench.CpuCell(us=70.0, samples=[55.0, 81.0, 70.0])
    row = bench.CpuRow("sync", "sync", plain, resilient)
    assert row.added_us == 5.0
    assert bench.CpuRow("sync", "sync", plain, bench.CpuCell()).added_us is None
