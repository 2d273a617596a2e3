"""`benchmarks/balancing.py --quick` runs end to end and reports every cell; no timing is judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "balancing.py"

PICK_ROWS = {
    "p2c",
    "least_requests",
    "random",
    "round_robin",
    "weighted",
    "service_pick",
    "p2c_ejected_50",
    "p2c_ejected_90",
}
MEMBERSHIP_ROWS = {"change_1", "change_1000", "publish", "first_build"}
MEMORY_ROWS = {"service_replica", "replica", "breaker", "window", "rest"}
TARGET_ROWS = {
    ("picks", "p2c", "max_ns"),
    ("picks", "p2c", "flat"),
    ("membership", "change_1", "min_ms"),
    ("memory", "service_replica", "bytes"),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "balancing.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    data["_stdout"] = done.stdout
    return data


@pytest.mark.slow
def test_every_pick_cell_is_measured(report: dict[str, Any]) -> None:
    assert report["quick"] is True
    assert report["sizes"] == [10, 1_000, 10_000]
    rows = {row["key"]: row for row in report["picks"]}
    assert len(rows) == len(report["picks"])
    assert set(rows) == PICK_ROWS
    for row in rows.values():
        assert row["error"] is None, row
        assert set(row["ns"]) == {"10", "1000", "10000"}
        assert all(isinstance(ns, float) and ns > 0 for ns in row["ns"].values()), row
        assert row["flat"] == pytest.approx(row["ns"]["10000"] / row["ns"]["10"])
        assert row["label"] in report["_stdout"]


@pytest.mark.slow
def test_membership_and_memory_are_measured(report: dict[str, Any]) -> None:
    assert report["service_size"] == 10_000
    membership = {row["key"]: row for row in report["membership"]}
    assert set(membership) == MEMBERSHIP_ROWS
    for row in membership.values():
        assert row["error"] is None, row
        assert 0 < row["min_ms"] <= row["median_ms"]
    memory = {row["key"]: row for row in report["memory"]}
    assert set(memory) == MEMORY_ROWS
    for row in memory.values():
        assert row["error"] is None, row
        assert row["bytes"] > 0
    parts = memory["replica"]["bytes"] + memory["breaker"]["bytes"] + memory["rest"]["bytes"]
    assert parts == pytest.approx(memory["service_replica"]["bytes"])
    assert memory["window"]["bytes"] < memory["breaker"]["bytes"]
    # Bytes counted by tracemalloc do not depend on machine load, so the suite holds the memory
    # target (issue #4) itself: a field added to a replica or its breaker shows up here.
    assert memory["service_replica"]["bytes"] <= 2048


@pytest.mark.slow
def test_targets_are_reported(report: dict[str, Any]) -> None:
    targets = {(t["section"], t["row"], t["metric"]): t for t in report["targets"]}
    assert set(targets) == TARGET_ROWS
    assert "TARGETS" in report["_stdout"]
    for target in targets.values():
        assert isinstance(target["pass"], bool)
        assert isinstance(target["value"], float) and target["error"] is None
        assert target["pass"] == (target["value"] <= target["limit"])
        verdict = "PASS" if target["pass"] else "FAIL"
        assert f"{verdict}  {target['name']}" in report["_stdout"]
