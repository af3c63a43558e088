"""brickwork.evaluation.harness: BIG-bench tasks and user tasks through lm-evaluation-harness, offline."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import yaml

from brickwork.cli.main import main
from brickwork.errors import BrickworkError
from brickwork.evaluation import harness
from brickwork.evaluation.tasks import score_task, task_from_bigbench
from conftest import tiny
from test_tasks import TASK

# A second task whose prompts end without a space (so the harness's target delimiter is empty), with the
# choices appended to the input as BIG-bench does by default, and 2-4 choices of different lengths.
LETTERS = {
    "name": "letters",
    "example_output_prefix": "\nAnswer:",
    "examples": [
        {
            "input": f"which letter comes after {chr(97 + i)}?",
            "target_scores": {chr(98 + i): 1, chr(99 + i) * (1 + i % 3): 0, "none": 0, "z": 0}
            if i % 2
            else {"no idea": 0, chr(98 + i): 1},
        }
        for i in range(16)
    ],
}


def _task_file(tmp_path, data: dict):
    path = tmp_path / data["name"] / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_bigbench_tasks_become_lm_eval_yamls_over_local_json(tmp_path):
    toy = task_from_bigbench(TASK, "toy")
    letters = task_from_bigbench(LETTERS, "letters")
    names = harness.write_bigbench_tasks([toy, letters], tmp_path)
    assert names == {"brickwork_toy": "toy", "brickwork_letters": "letters"}
    config = yaml.safe_load((tmp_path / "brickwork_toy.yaml").read_text())
    assert config["dataset_path"] == "json" and config["output_type"] == "multiple_choice"
    assert config["target_delimiter"] == " "  # every toy prompt ends in "A: "
    docs = [json.loads(line) for line in (tmp_path / "brickwork_toy.jsonl").read_text().splitlines()]
    assert len(docs) == len(toy.examples)
    assert docs[0] == {"prompt": "Answer.\n\nQ: is 0 even?\nA:", "choices": ["yes", "no"], "gold": [0]}
    assert yaml.safe_load((tmp_path / "brickwork_letters.yaml").read_text())["target_delimiter"] == ""
    # the highest target score is the gold answer; ties are all gold
    tied = task_from_bigbench({"examples": [{"input": "x", "target_scores": {"a": 1, "b": 1, "c": 0}}]}, "t")
    harness.write_bigbench_tasks([tied], tmp_path)
    assert json.loads((tmp_path / "brickwork_t.jsonl").read_text())["gold"] == [0, 1]


def test_specs_split_on_commas_and_the_builtin_scorer_refuses_other_tasks(tokenizer):
    assert harness.split_task_specs(["a,b", " c ", ""]) == ["a", "b", "c"]
    with pytest.raises(BrickworkError, match="BIG-bench tasks only"):
        harness.evaluate_builtin(tiny(), tokenizer, ["arc_easy"])
    with pytest.raises(BrickworkError, match="no tasks given"):
        harness.evaluate_builtin(tiny(), tokenizer, [","])


def test_a_clear_error_when_lm_eval_is_not_installed(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(BrickworkError, match=r"pip install 'brickwork\[eval\]'"):
        harness.evaluate_tasks(tiny(), tokenizer, ["bigbench"])


needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-evaluation-harness not installed (brickwork[eval])",
)


@needs_lm_eval
def test_lm_eval_matches_the_builtin_scorer_on_the_same_examples(tmp_path, tokenizer):
    """Same examples (the eval half), same log-likelihood argmax: the same choices and accuracy. The character
    tokeniser never merges across the prompt/choice boundary and adds no BOS, where the two could differ."""
    model = tiny()
    paths = [_task_file(tmp_path, TASK), _task_file(tmp_path, LETTERS)]
    results = harness.evaluate_tasks(model, tokenizer, [",".join(map(str, paths))], progress=False)
    assert [r.task for r in results] == ["toy", "letters"]
    for r, data in zip(results, (TASK, LETTERS), strict=True):
        task = task_from_bigbench(data, data["name"]).split("eval")
        builtin = score_task(model, tokenizer, task)
        assert (r.examples, r.source, r.harness) == (len(task.examples), "bigbench", "lm-eval")
        assert r.predictions == builtin.predictions
        assert r.accuracy == pytest.approx(builtin.accuracy)
        assert r.chance == pytest.approx(task.chance)
        assert r.accuracy_norm is not None
        # lm-eval's standard error uses the sample standard deviation, brickwork's the population one
        n = r.examples
        assert r.stderr == pytest.approx(builtin.stderr * math.sqrt(n / (n - 1)))
    # --task-examples: the first examples of the same eval half
    capped = harness.evaluate_tasks(model, tokenizer, [str(paths[1])], examples=3, progress=False)
    assert capped[0].examples == 3 and capped[0].predictions == results[1].predictions[:3]
    assert "letters" in harness.render_table(results) and "±" in harness.render_table(results)


@needs_lm_eval
def test_a_user_task_yaml_over_a_local_file_runs_by_path(tmp_path, tokenizer):
    data = tmp_path / "mine" / "qa.jsonl"
    data.parent.mkdir()
    data.write_text(
        "".join(json.dumps({"q": f"{i}+0=", "options": [str(i), "x"], "label": 0}) + "\n" for i in range(6))
    )
    config = {
        "task": "my_qa",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "cache")},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "q",
        "doc_to_choice": "options",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (data.parent / "my_qa.yaml").write_text(yaml.safe_dump(config))
    for spec in (data.parent / "my_qa.yaml", data.parent):  # the file, or the directory holding it
        (result,) = harness.evaluate_tasks(tiny(), tokenizer, [str(spec)], examples=4, progress=False)
        assert (result.task, result.source, result.examples) == ("my_qa", "yaml", 4)
        assert 0 <= result.accuracy <= 1 and result.stderr is not None


@needs_lm_eval
def test_clear_errors_for_unknown_tasks_and_hub_datasets_offline(tmp_path, tokenizer, monkeypatch):
    from lm_eval.tasks import TaskManager

    model = tiny()
    with pytest.raises(BrickworkError, match="does not exist"):
        harness.evaluate_tasks(model, tokenizer, [str(tmp_path / "missing.yaml")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BrickworkError, match="defines no lm-eval task"):
        harness.evaluate_tasks(model, tokenizer, [str(tmp_path / "empty")])
    with pytest.raises(BrickworkError, match="at least 1"):
        harness.evaluate_tasks(model, tokenizer, ["bigbench"], examples=0)
    # a task whose dataset is on the hub: refused at once, offline, with what to do
    hub_task = dict(
        task="hub_qa",
        dataset_path="brickwork-tests/no-such-dataset",
        output_type="multiple_choice",
        test_split="test",
        doc_to_text="q",
        doc_to_choice="options",
        doc_to_target="label",
    )
    (tmp_path / "hub_qa.yaml").write_text(yaml.safe_dump(hub_task))
    with pytest.raises(BrickworkError, match="not available offline.*--hub"):
        harness.evaluate_tasks(model, tokenizer, [str(tmp_path / "hub_qa.yaml")], progress=False)
    # lm-eval's own task index takes ~10 s to build: an empty one stands in for it here
    monkeypatch.setattr(harness, "_default_task_manager", lambda: TaskManager(include_defaults=False))
    with pytest.raises(BrickworkError, match=r"unknown task\(s\) \['no_such_task'\]"):
        harness.evaluate_tasks(model, tokenizer, ["no_such_task"], progress=False)


@needs_lm_eval
def test_eval_command_with_tasks(tmp_path, tiny_dir, capsys):
    task = _task_file(tmp_path, TASK)
    out = tmp_path / "eval.json"
    assert main(f"eval {tiny_dir} --tasks {task} --task-examples 6 --json {out} -q".split()) == 0
    report = json.loads(out.read_text())
    assert report["results"] == [] and report["harness"] == "lm-eval"  # --tasks alone: no perplexity
    (row,) = report["tasks"]
    assert (row["task"], row["examples"]) == ("toy", 6) and row["stderr"] is not None
    assert "toy" in capsys.readouterr().out
    assert (
        main(f"eval {tiny_dir} --tasks {task} --task-examples 6 --harness builtin --json {out} -q".split())
        == 0
    )
    builtin = json.loads(out.read_text())["tasks"][0]
    assert builtin["accuracy"] == pytest.approx(row["accuracy"]) and builtin["harness"] == "builtin"
    assert main(f"eval {tiny_dir} --task-examples 6 -q".split()) == 2  # a --tasks option without --tasks
    assert (
        main(f"eval {tiny_dir} --tasks {task} --parent {tiny_dir} -q".split()) == 2
    )  # --parent needs --data
    assert main(f"eval {tiny_dir} --tasks {tmp_path / 'x.yaml'} --harness builtin -q".split()) == 2
    assert "BIG-bench tasks only" in capsys.readouterr().err
