"""bench/quality_across_models.py: one table from several quality-benchmark runs and eval reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench_run(directory: Path, rows: list[tuple[str, float, float]]) -> Path:
    directory.mkdir()
    results = {
        "machine": {"commit": "abc"},
        "rows": [
            {"name": name, "active_fraction": reads, "heldout": {"botchan": {"ratio": ratio, "tokens": 100}}}
            for name, reads, ratio in rows
        ],
    }
    (directory / "results.json").write_text(json.dumps(results))
    return directory


def test_runs_of_one_model_combine_the_first_given_wins_and_eval_reports_fill_cells(tmp_path):
    first = _bench_run(tmp_path / "a", [("neuron+partial (default 50%)", 0.5, 1.3)])
    second = _bench_run(
        tmp_path / "b",
        [("neuron+partial (default 50%)", 0.5, 9.9), ("stock sigmoid (8+24 of 64, default 50%)", 0.51, 2.5)],
    )
    report = tmp_path / "eval.json"
    report.write_text(
        json.dumps(
            {
                "active_fraction": 0.26,
                "results": [
                    {"data": "botchan", "perplexity": 30.0, "parent_perplexity": 10.0, "tokens": 100}
                ],
            }
        )
    )
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "bench" / "quality_across_models.py"), "--bench", f"m={first}", f"m={second}",
        "--eval", f"big:0.25:stock={report}", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (out / "results.md").read_text()
    assert "| m | neuron-level default | - | x1.300 (50%) | - |" in table  # the first run's cell, not x9.9
    assert "| m | stock default (64 experts, sigmoid) | - | x2.500 (51%) | - |" in table
    assert "| big | stock default (64 experts, sigmoid) | x3.000 (26%) | - | - |" in table
    script = str(ROOT / "bench" / "quality_across_models.py")
    for item in (f"big:0.25:x={report}", f"big:abc={report}", f"big={report}", "big:0.25"):
        bad = [sys.executable, script, "--eval", item, "--out", str(tmp_path / "bad")]
        failed = subprocess.run(bad, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert failed.returncode != 0 and "expected MODEL:FRACTION[:stock]=FILE" in failed.stderr, item
        assert "Traceback" not in failed.stderr and not (tmp_path / "bad").exists()
