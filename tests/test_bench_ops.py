"""The brick-operations benchmark runs end to end (tiny model, local texts, no LoRA: peft is the bench's extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import synthetic_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("parent", ["stock", "neuron"])
def test_bench_ops_quick_runs_and_reports_every_row(tmp_path, parent):
    texts = {}
    for name, seed in (("new", 1), ("second", 2), ("old", 3)):
        texts[name] = tmp_path / f"{name}.txt"
        texts[name].write_text(synthetic_text(24000, seed=seed))  # two 64 KB documents
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "bench" / "brick_ops.py"), "--quick", "--calib", str(texts["old"]),
        "--new", str(texts["new"]), "--second", str(texts["second"]), "--old", str(texts["old"]),
        "--test-every", "2", "--parent", parent, "--rows", "full", "grow", "update", "prune", "merge", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["name"].split(" (")[0]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert {"carved parent", "full fine-tuning", "grow", "update", "merged", "averaged children"} <= set(rows)
    assert rows["full fine-tuning"]["trainable"] > rows["grow"]["trainable"] > 0
    assert "prune for new" in rows and rows["prune for new"]["prune"]["ffn_params_after"] > 0
    assert "## Merging two children" in (out / "results.md").read_text()
    assert (out / "brick-ops.png").stat().st_size > 0
    (out / "results.md").unlink()
    replot = [sys.executable, str(ROOT / "bench" / "brick_ops.py"), "--replot", "--out", str(out)]
    assert subprocess.run(replot, capture_output=True, text=True, cwd=ROOT, timeout=300).returncode == 0
    assert "## Merging two children" in (out / "results.md").read_text()
