"""``benchmarks/scale.py`` at a tiny size, so the scale benchmark and its simulator cannot rot.

A real gateway, 20 simulated providers (priced: escrow, settlement and receipts on) and 5
simulated clients speaking the wire protocol; every task must come back finished. Speed is only
recorded, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_scale_bench_runs_to_completion_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--out", str(out),
         "--providers", "5,20", "--clients", "5", "--tasks", "300", "--idle-seconds", "0.3"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["finished"], data
    rows = data["rows"]
    for n in (5, 20):
        row = rows[f"cpu_per_task_{n}"]
        assert row["error"] is None, row
        assert row["phase"]["done"] == 300 and row["phase"]["errors"] == 0, row["phase"]
        assert row["value"] > 0
    for key in ("rss_per_idle_connection", "tasks_per_s", "latency_p50", "latency_p99",
                "cpu_ratio", "cpu_ratio_net_of_idle"):
        assert rows[key]["error"] is None and rows[key]["value"] is not None, (key, rows[key])
    assert "gateway CPU per task, 20 providers" in proc.stdout
    assert not any("stray" in note for note in data["notes"]), data["notes"]
