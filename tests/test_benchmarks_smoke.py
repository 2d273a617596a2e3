"""`benchmarks/overhead.py --quick` runs end to end and reports every row; no timing is judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"

RESILIENT_ROWS = {
    "resilient.retry",
    "resilient.circuit_breaker",
    "resilient.bulkhead",
    "resilient.timeout",
    "resilient.fallback",
    "resilient.retry_budget",
    "resilient.pipeline",
    "resilient.pipeline_timeout",
}
PEER_ROWS = {
    "tenacity.retry",
    "stamina.retry",
    "backoff.on_exception",
    "pybreaker.breaker",
    "circuitbreaker.circuit",
    "tenacity+pybreaker",
    "pyresilience.retry_breaker",
    "pyresilience.full",
}
#: Rows whose every cell must be measured, not reported as an error: resilient runs everywhere.
MUST_MEASURE = {"plain", "tenacity.retry"} | RESILIENT_ROWS


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "overhead.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "TARGETS" in done.stdout
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    data["_stdout"] = done.stdout
    return data


@pytest.mark.slow
def test_every_row_is_reported(report: dict[str, Any]) -> None:
    keys = [row["key"] for row in report["rows"]]
    assert len(keys) == len(set(keys))
    assert set(keys) == {"plain"} | RESILIENT_ROWS | PEER_ROWS
    assert report["columns"] == ["sync", "asyncio", "trio"]
    assert report["quick"] is True
    for row in report["rows"]:
        assert set(row["cells"]) == {"sync", "asyncio", "trio"}
        assert row["label"] in report["_stdout"]
        for cell in row["cells"].values():
            # A cell is either not offered by the library, measured, or explains why it is not.
            if not cell["applicable"]:
                assert cell["ns"] is None
                assert cell["error"] is None
            elif cell["ns"] is None:
                assert isinstance(cell["error"], str)
                assert cell["error"]
            else:
                assert cell["ns"] > 0
                assert cell["error"] is None


@pytest.mark.slow
def test_complete_policies_are_measured_everywhere(report: dict[str, Any]) -> None:
    rows = {row["key"]: row for row in report["rows"]}
    for key in MUST_MEASURE:
        for column, cell in rows[key]["cells"].items():
            assert cell["error"] is None, (key, column, cell["error"])
            assert cell["ns"] is not None
    # Ratios are to tenacity, column by column, so tenacity's own are exactly 1.
    for cell in rows["tenacity.retry"]["cells"].values():
        assert cell["ratio"] == 1.0
    # pybreaker offers no asyncio support: its async cells are "not applicable", not errors.
    assert rows["pybreaker.breaker"]["cells"]["asyncio"]["applicable"] is False


@pytest.mark.slow
def test_targets_are_reported(report: dict[str, Any]) -> None:
    targets = {(t["row"], t["column"]): t for t in report["targets"]}
    assert set(targets) == {
        ("resilient.pipeline", "sync"),
        ("resilient.pipeline_timeout", "asyncio"),
    }
    for target in targets.values():
        assert isinstance(target["pass"], bool)
        assert (target["ratio"] is None) == (target["error"] is not None)
        verdict = "PASS" if target["pass"] else "FAIL"
        assert f"{verdict}  {target['name']}" in report["_stdout"]
