from __future__ import annotations

import copy
import importlib.util
import json

import pytest

from brickwork.benchmarks.quality import QualityBenchConfig, compare, render_table, run_quality_bench, write
from brickwork.cli.main import main as cli
from test_tasks import TASK


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(TASK))
    return str(path)


def _quick(text_file, task_file, **overrides) -> QualityBenchConfig:
    options = dict(
        quick=True,
        fractions=(0.5, 1.0),
        methods=("random", "activation"),
        routers=("oracle", "fitted"),
        calib=str(text_file),
        eval=(str(text_file),),
        tasks=(task_file,),
    )
    return QualityBenchConfig(**(options | overrides))


def test_quality_bench_rows_metrics_and_files(tmp_path, text_file, task_file):
    results = run_quality_bench(_quick(text_file, task_file), progress=False)
    rows = {r["name"]: r for r in results["rows"]}
    corpus = str(text_file)
    dense = rows["dense"]
    assert dense["heldout"][corpus]["ratio"] == 1.0 and dense["tasks"]["toy"]["agreement"] == 1.0
    # 2 methods x 2 routers + the neuron-level default, and 3 baselines, at each of 2 fractions
    assert len(rows) == 1 + 2 * (2 * 2 + 1) + 2 * 3
    # With every neuron kept, carving and the baselines compute the dense model: ratio 1, KL 0.
    for name, row in rows.items():
        if "100%" in name or "(1+7 of 8)" in name:
            metrics = row["heldout"][corpus]
            assert metrics["ratio"] == pytest.approx(1.0, abs=1e-4), name
            assert metrics["kl"] == pytest.approx(0.0, abs=1e-7), name
            assert row["tasks"]["toy"]["agreement"] == 1.0, name
    half = rows["cats keep 50%"]
    assert half["heldout"][corpus]["kl"] > 1e-6  # thresholding half the neurons changes the (tiny) model
    assert 0 < half["active_fraction"] < 1
    for row in rows.values():
        assert {"accuracy", "chance", "agreement", "stderr"} <= set(row["tasks"]["toy"])
    assert results["settings"]["tasks"] == ["toy"] and results["settings"]["task_sources"] == [task_file]
    assert results["machine"]["commit"] and results["versions"]["torch"]
    out = write(results, tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "quality.png"}
    assert "Carved vs baselines" in (out / "results.md").read_text()
    without_tasks = copy.deepcopy(results)
    without_tasks["settings"]["tasks"] = []
    for row in without_tasks["rows"]:
        row["tasks"] = {}
    for rendered in (results, without_tasks):  # every line of the main table has the header's columns
        table = next(b for b in render_table(rendered).split("\n\n") if b.startswith("| row |")).splitlines()
        assert len(table) == len(rows) + 2
        assert {line.count("|") for line in table} == {len(rendered["settings"]["tasks"]) + 6}
    dense_line = next(b for b in render_table(without_tasks).split("\n\n") if b.startswith("Dense: "))
    assert "perplexity" in dense_line and not dense_line.rstrip().endswith(";")


def test_comparisons_pick_the_best_carved_row_reading_no_more():
    def row(name, kind, reads, ratio):
        return {"name": name, "kind": kind, "active_fraction": reads, "heldout": {"c": {"ratio": ratio}}}

    results = {
        "rows": [
            row("dense", "dense", 1.0, 1.0),
            row("b", "baseline", 0.5, 2.0),
            row("cheap", "carved", 0.3, 3.0),
            row("good", "carved", 0.5, 1.5),
            row("better but dearer", "carved", 0.6, 1.1),
            row("b2", "baseline", 0.2, 9.0),
        ]
    }
    first, second = compare(results)
    assert first["per_corpus"]["c"]["carved"] == "good" and first["per_corpus"]["c"]["carved_wins"]
    assert second["per_corpus"]["c"] == {"carved": None, "carved_wins": False}


def test_bad_settings_are_refused_clearly(text_file, task_file):
    with pytest.raises(ValueError, match="fractions"):
        _quick(text_file, task_file, fractions=(0.0,))
    with pytest.raises(ValueError, match="unknown router"):
        _quick(text_file, task_file, routers=("magic",))


def test_bench_quality_command(tmp_path, text_file, task_file, capsys):
    out = tmp_path / "bench"
    command = (
        f"bench quality --quick --fractions 0.5 --methods random --routers fitted --baselines cats --stock "
        f"--calib {text_file} --eval {text_file} --tasks {task_file} --out {out} -q"
    )
    assert cli(command.split()) == 0
    printed = capsys.readouterr().out
    assert "random+fitted" in printed and "cats keep 50%" in printed
    stock = next(
        r for r in json.loads((out / "results.json").read_text())["rows"] if r["name"].startswith("stock")
    )
    assert stock["config"]["combine"] == "sigmoid" and stock["name"] in printed
    assert 0.4 < stock["active_fraction"] < 0.6
    assert (out / "quality.png").stat().st_size > 0
    none = tmp_path / "none"
    command = (
        "bench quality --quick --fractions 0.5 --methods random --routers fitted --baselines --tasks none"
    )
    assert cli(f"{command} --calib {text_file} --eval {text_file} --out {none} -q".split()) == 0
    assert json.loads((none / "results.json").read_text())["settings"]["tasks"] == []
    assert cli(f"bench quality --quick --tasks no_such_task --out {out} -q".split()) == 2
    assert "Unknown task 'no_such_task'" in capsys.readouterr().err


def test_recovered_rows_merge_into_the_table_and_plot(tmp_path):
    from brickwork.benchmarks.quality import merge_recovery

    def heldout(ratio):
        return {"c": {"perplexity": 10 * ratio, "ratio": ratio, "kl": 0.1, "agreement": 0.9, "tokens": 10}}

    task = {"t": {"accuracy": 0.5, "chance": 0.25, "agreement": 1.0, "stderr": 0.1}}
    results = {
        "machine": {"commit": "x", "date": "d", "cpu": "c", "torch_threads": 2, "torch": "t"},
        "settings": {
            "model": "m",
            "eval": ["c"],
            "tasks": ["t"],
            "calib": "wiki",
            "calib_tokens": 1,
            "calibration_seconds": 1.0,
            "eval_tokens": 10,
            "window": 5,
            "task_examples": 1,
            "seed": 0,
        },
        "rows": [
            {
                "name": "dense",
                "kind": "dense",
                "config": {},
                "active_fraction": 1.0,
                "heldout": heldout(1.0),
                "tasks": task,
                "seconds": {},
            },
            {
                "name": "a",
                "kind": "carved",
                "config": {"method": "random", "router": "fitted", "experts": 16},
                "active_fraction": 0.3,
                "heldout": heldout(3.0),
                "tasks": task,
                "seconds": {},
            },
        ],
        "comparisons": [],
    }
    recovery = {
        "machine": {},
        "settings": {},
        "rows": [
            {
                "name": "a",
                "config": {"method": "random", "router": "fitted", "experts": 16},
                "active_fraction": 0.3,
                "before": heldout(3.0),
                "local": {"heldout": heldout(2.0), "seconds": 5.0},
                "e2e": {"heldout": heldout(1.5), "seconds": 50.0, "tokens": 2**20},
            }
        ],
    }
    merged = merge_recovery(results, recovery)
    names = [r["name"] for r in merged["rows"]]
    assert names[-2:] == ["a + local recovery", "a + local + e2e 1M recovery"]
    assert (
        merge_recovery(merged, recovery)["rows"] == merged["rows"]
    )  # merging again replaces, not duplicates
    out = write(merged, tmp_path / "q")
    table = (out / "results.md").read_text()
    assert "a + local + e2e 1M recovery | 30.0% | x1.500" in table
    longer = dict(
        recovery,
        rows=[dict(recovery["rows"][0], e2e={"heldout": heldout(1.2), "seconds": 9.0, "tokens": 2**22})],
    )
    both = merge_recovery(results, recovery, longer)
    assert [r["name"] for r in both["rows"]][-3:] == [
        "a + local recovery",
        "a + local + e2e 1M recovery",
        "a + local + e2e 4M recovery",
    ]  # one local row, one row per e2e budget
    assert len(both["recovery_sources"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness not installed")
def test_quality_bench_scores_tasks_through_lm_eval(text_file, task_file):
    """The same examples through lm-eval: the builtin scorer's accuracies (0/1 scores, a character tokeniser),
    lm-eval's standard error and acc_norm, and agreement with the dense choices."""
    options = dict(
        fractions=(1.0,), methods=("random",), routers=("oracle",), baselines=(), neuron_level=False
    )
    builtin = run_quality_bench(_quick(text_file, task_file, **options), progress=False)
    harnessed = run_quality_bench(_quick(text_file, task_file, harness="lm-eval", **options), progress=False)
    assert harnessed["settings"]["harness"] == "lm-eval"
    for a, b in zip(builtin["rows"], harnessed["rows"], strict=True):
        toy = b["tasks"]["toy"]
        assert toy["accuracy"] == pytest.approx(a["tasks"]["toy"]["accuracy"]) and toy["agreement"] == 1.0
        assert toy["harness"] == "lm-eval" and toy["accuracy_norm"] is not None and toy["stderr"] > 0
    with pytest.raises(ValueError, match="harness must be one of"):
        QualityBenchConfig(harness="nope")


def test_held_out_scores_do_not_depend_on_the_scoring_batch(text_file, tokenizer):
    import torch

    from brickwork.benchmarks.quality import HeldOut
    from conftest import carved_tiny, tiny

    dense, carved = tiny(), carved_tiny(text_file, tokenizer, experts=8, shared=1, active=3)
    scores = []
    for batch in (4, 1):
        held_out = HeldOut(tokenizer, str(text_file), 512, 64, batch=batch)
        held_out.cache_dense(dense)
        assert len(held_out.dense) == -(-len(held_out.windows) // batch)
        scores.append(held_out.score(carved))
    assert scores[0]["tokens"] == scores[1]["tokens"] and scores[0]["kl"] > 0  # the carve differs
    for key in ("perplexity", "ratio", "kl", "agreement"):
        assert torch.isclose(torch.tensor(scores[0][key]), torch.tensor(scores[1][key]), rtol=1e-5), key
