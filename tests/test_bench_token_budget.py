"""bench/token_budget.py runs end to end on a tiny model: every row at equal mean reads, decode speed, plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_token_budget_quick_reports_rows_speed_and_plot(tmp_path, text_file):
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "bench" / "token_budget.py"), "--quick", "--calib", str(text_file),
        "--eval", str(text_file), "--no-separate", "--layer-step", "0.125", "--variants",
        "per-token, one threshold", "per-layer top-k", "per-layer caps + per-token", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for target in results["settings"]["targets"]:
        rows = {r["name"]: r for r in results["rows"] if r["target"] == target}
        assert set(rows) == {
            "uniform top-k",
            "per-token, one threshold",
            "per-layer top-k",
            "per-layer caps + per-token",
        }
        uniform = rows["uniform top-k"]["reads"]
        for name in (
            "per-token, one threshold",
            "per-layer caps + per-token",
        ):  # fitted on calibration windows, scored on held-out ones: near
            assert abs(rows[name]["reads"] - uniform) < 0.1 and rows[name]["worst"] > rows[name]["reads"]
        assert rows["per-layer top-k"]["reads"] <= uniform + 1e-9  # allocate_budgets keeps the mean
    speed = {s["target"]: s for s in results["speed"]}
    assert set(speed) == set(results["settings"]["targets"])
    assert all(set(s["variants"]) == {"per-token, one threshold", "per-layer top-k", "per-layer caps + per-token"}
               for s in speed.values())  # fmt: skip
    for target, s in speed.items():  # the timed tokens' reads: fixed per token for the fixed top-k rows
        rows = {r["name"]: r for r in results["rows"] if r["target"] == target}
        assert abs(s["uniform_reads"] - rows["uniform top-k"]["reads"]) < 1e-9
        assert abs(s["variants"]["per-layer top-k"]["reads"] - rows["per-layer top-k"]["reads"]) < 1e-9
        assert all(0 < v["reads"] <= 1 for v in s["variants"].values())
    assert (out / "token-budget.png").stat().st_size > 0
    (out / "results.md").unlink()
    replot = [sys.executable, str(ROOT / "bench" / "token_budget.py"), "--replot", "--out", str(out)]
    assert subprocess.run(replot, capture_output=True, text=True, cwd=ROOT, timeout=300).returncode == 0
    replotted = (out / "results.md").read_text()
    assert "per-layer caps + per-token" in replotted and "tokens/s (x" in replotted and "%]" in replotted
