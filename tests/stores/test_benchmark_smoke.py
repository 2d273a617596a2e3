"""`benchmarks/shared_state.py --quick` runs end to end and reports every row; no timing is judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stores.conftest import RedisServer

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "shared_state.py"


@pytest.mark.slow
def test_shared_state_benchmark_reports_every_row(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    out = tmp_path / "shared_state.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--url", redis_server.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "TARGETS" in done.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == {
        "ping",
        "breaker_local",
        "breaker_redis",
        "round_trips",
        "breaker_redis_async",
        "breaker_redis_open",
        "deposit_local",
        "withdraw_local",
        "deposit_redis",
        "withdraw_redis",
    }
    assert all(row["error"] is None for row in rows.values()), rows
    assert rows["round_trips"]["value"] == pytest.approx(1.0)
    assert len(report["targets"]) == 4
