from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

import brickwork.evaluation.tasks as tasks_module
from brickwork import assets
from brickwork.errors import BrickworkError
from brickwork.evaluation.tasks import (
    Example,
    MultipleChoiceTask,
    _encode,
    choice_logprobs,
    load_task,
    prepare_tasks,
    score_task,
    task_from_bigbench,
)
from conftest import CAUSAL_TYPES, publish, tiny

TASK = {
    "name": "toy",
    "task_prefix": "Answer.\n",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "append_choices_to_input": "false",
    "examples": [
        {"input": f"is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}}
        for i in range(20)
    ]
    + [
        {"input": "pick a colour", "target_scores": {"red": 1, "green": 0, "deep blue sea": 0}},
        {"input": "no choices here", "target": "x"},
    ],
}


def test_prompts_are_built_like_bigbench_json_tasks():
    task = task_from_bigbench(TASK, "toy")
    assert len(task.examples) == 21  # the example without target_scores is not multiple-choice
    assert task.examples[0].prompt == "Answer.\n\nQ: is 0 even?\nA: "
    appended = task_from_bigbench({"examples": [{"input": "2+2", "target_scores": {"4": 1, "5": 0}}]}, "t")
    assert appended.examples[0].prompt == "\nQ: 2+2\n  choice: 4\n  choice: 5\nA: "
    with pytest.raises(BrickworkError, match="no multiple-choice examples"):
        task_from_bigbench({"examples": [{"input": "a", "target": "b"}]}, "t")


def test_chance_majority_and_disjoint_seeded_splits():
    task = task_from_bigbench(TASK, "toy")
    assert task.chance == pytest.approx((20 * 0.5 + 1 / 3) / 21)
    assert task.majority == pytest.approx(10 / 21)  # always "yes" (or always "no")
    a, b = task.split("eval", 5), task.split("select", 5)
    assert len(a.examples) == len(b.examples) == 5
    assert not set(a.examples) & set(b.examples)
    assert task.split("eval", 5).examples == a.examples  # seeded
    assert len(task.split("eval", 100).examples) == 10  # never more than half
    assert len(task.split("eval").examples) == 10


def _naive(model, tokenizer, task) -> list[list[float]]:
    out = []
    for example in task.examples:
        row = []
        for context, ids in _encode(tokenizer, example):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([context + ids])).logits[0, :-1]
            lp = torch.log_softmax(logits.float(), -1)[len(context) - 1 :]
            row.append(lp.gather(-1, torch.tensor(ids)[:, None]).sum().item())
        out.append(row)
    return out


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_batched_scoring_with_shared_prompts_matches_one_sequence_at_a_time(model_type, tokenizer):
    model = tiny(model_type).eval()
    task = task_from_bigbench(TASK, "toy")  # prompts of different lengths; choices of 1-13 tokens, 2 or 3
    fast = choice_logprobs(model, tokenizer, task, batch_tokens=64)
    slow = _naive(model, tokenizer, task)
    assert torch.allclose(torch.tensor(sum(fast, [])), torch.tensor(sum(slow, [])), atol=1e-4)


def test_accuracy_is_the_score_of_the_highest_likelihood_choice(tokenizer):
    model = tiny().eval()
    task = task_from_bigbench(TASK, "toy")
    logprobs = choice_logprobs(model, tokenizer, task)
    best = [max(range(len(lp)), key=lp.__getitem__) for lp in logprobs]

    def relabel(pick):
        examples = [
            Example(e.prompt, e.choices, tuple(float(i == pick(b)) for i in range(len(e.choices))))
            for e, b in zip(task.examples, best, strict=True)
        ]
        return MultipleChoiceTask("relabelled", examples)

    assert score_task(model, tokenizer, relabel(lambda b: b)).accuracy == 1.0
    assert score_task(model, tokenizer, relabel(lambda b: 1 - min(b, 1))).accuracy == 0.0
    result = score_task(model, tokenizer, task)
    assert result.predictions == best
    assert result.accuracy == pytest.approx(
        sum(e.scores[b] for e, b in zip(task.examples, best, strict=True)) / 21
    )


def _archive(tmp_path, tasks: dict) -> Path:
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in tasks.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return path


def _pin(monkeypatch, archive) -> None:
    """Make the pinned archive the test's own (its name, and the SHA-256 of its bytes)."""
    spec = tasks_module.BIGBENCH_ARCHIVE
    monkeypatch.setattr(
        tasks_module, "BIGBENCH_ARCHIVE", dataclasses.replace(spec, sha256=assets.sha256_of(archive))
    )


def test_prepare_tasks_extracts_from_the_archive_and_load_task_reads_them(
    tmp_path, isolated_home, monkeypatch
):
    archive = _archive(tmp_path, {"hyperbaton": TASK, "navigate": TASK})
    with pytest.raises(BrickworkError, match="has sha256.*BRICKWORK_BIGBENCH_ARCHIVE"):
        prepare_tasks(["hyperbaton"], archive=archive)  # not the pinned archive
    _pin(monkeypatch, archive)
    paths = prepare_tasks(["hyperbaton", "navigate"], archive=archive)
    assert load_task("hyperbaton").examples == task_from_bigbench(TASK, "hyperbaton").examples
    assert paths["navigate"].is_file()
    with pytest.raises(BrickworkError, match="holds no task.json"):
        prepare_tasks(["snarks"], archive=archive)
    with pytest.raises(BrickworkError, match="Unknown task"):
        prepare_tasks(["no_such_task"], archive=archive)


def test_a_built_in_task_is_fetched_from_the_index_on_first_use(
    tmp_path, isolated_home, monkeypatch, local_index
):
    archive = _archive(tmp_path, {"hyperbaton": TASK, "navigate": TASK, "snarks": TASK})
    _pin(monkeypatch, archive)
    publish(local_index, "bigbench", "bigbench-1.0.0.tar.gz", archive.read_bytes())
    assert load_task("navigate").examples == task_from_bigbench(TASK, "navigate").examples
    # every built-in task in the archive was extracted at once, so the archive is fetched once
    assert sorted(p.stem for p in (isolated_home / "tasks").glob("*.json") if p.stem != "SOURCE") == [
        "hyperbaton",
        "navigate",
        "snarks",
    ]
    (local_index / "files" / "bigbench-1.0.0.tar.gz").unlink()
    assert load_task("snarks").name == "snarks"  # from the cache, no download


def test_task_files_by_path_and_clear_errors(tmp_path):
    good = tmp_path / "toy" / "task.json"
    good.parent.mkdir()
    good.write_text(json.dumps(TASK))
    assert load_task(good).name == "toy"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BrickworkError, match="Could not read task file"):
        load_task(bad)
    with pytest.raises(BrickworkError, match="Unknown task 'nope'"):
        load_task("nope")
