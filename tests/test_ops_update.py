from __future__ import annotations

import pytest
import torch

import brickwork as bw
from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError
from brickwork.ops.train import TrainConfig
from brickwork.ops.update import choose_bricks, update_
from brickwork.ops.usage import ExpertUsage, expert_usage
from conftest import carved_tiny

CONFIG = TrainConfig(tokens=256, window=32, batch_size=4, lr=1e-2)


def _usage(counts: list[int], layers=(0, 1)) -> ExpertUsage:
    return ExpertUsage(counts={i: torch.tensor(counts) for i in layers}, tokens=sum(counts), source="x")


def test_choose_bricks_by_coverage_or_number():
    usage = _usage([0, 10, 50, 40, 0, 0])
    assert choose_bricks(usage)[0].tolist() == [2]  # 50% of the selections
    assert choose_bricks(usage, coverage=0.6)[1].tolist() == [2, 3]
    assert choose_bricks(usage, coverage=1.0)[0].tolist() == [1, 2, 3]  # every expert used at least once
    assert choose_bricks(usage, experts=4)[0].tolist() == [0, 1, 2, 3]  # ties: the lower index first
    with pytest.raises(ValueError, match="not both"):
        choose_bricks(usage, coverage=0.5, experts=2)
    with pytest.raises(ValueError, match="more than"):
        choose_bricks(usage, experts=7)
    with pytest.raises(ValueError, match="coverage"):
        choose_bricks(usage, coverage=1.5)


def _stored_rows(brick, experts):
    s, size = brick.num_shared, brick.expert_size
    return [s + e * size + j for e in experts for j in range(size)]


def test_update_trains_only_the_chosen_experts_rows(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2)
    usage = expert_usage(model, tokenizer, str(text_file), tokens=128, window=32, progress=False)
    bricks = choose_bricks(usage, experts=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = update_(model, tokenizer, str(text_file), bricks, CONFIG, progress=False)
    carved = carved_layers(model)
    names = {p: n for n, p in model.named_parameters()}
    rows_trained = 0
    for layer, brick in carved.items():
        chosen = _stored_rows(brick, bricks[layer].tolist())
        other = sorted(set(range(brick.d_ff)) - set(chosen))
        for name in ("up", "gate", "down_t"):
            param = getattr(brick, name)
            old = before[names[param]]
            assert torch.equal(param[other], old[other]), (layer, name)  # shared neurons and other experts
            assert not torch.equal(param[chosen], old[chosen]), (layer, name)
            rows_trained += len(chosen) * param.shape[1]
        for name, p in brick.router.named_parameters():
            assert torch.equal(p, before[names[p]]), (layer, name)
    for name, p in model.named_parameters():
        if not any(p is getattr(b, n) for b in carved.values() for n in ("up", "gate", "down_t")):
            assert torch.equal(p, before[name]), name  # attention, embeddings, norms, routers
        assert not p.requires_grad
    assert report.trainable == rows_trained and report.steps == 2 and len(report.losses) == 2
    assert report.experts == {k: v.tolist() for k, v in bricks.items()}


def test_update_is_deterministic_and_saves_loads_bit_for_bit(text_file, tokenizer, tmp_path):
    def run():
        model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2)
        update_(model, tokenizer, str(text_file), {0: [1, 5], 1: [2]}, CONFIG, progress=False)
        return model

    first, second = run(), run()
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    out = bw.save(first, tmp_path / "updated", tokenizer)
    loaded = bw.load(out)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    ids = torch.arange(40).view(2, 20)
    with torch.no_grad():  # a loaded model's weights want gradients: the same (kernel) path for both
        assert torch.equal(first(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_update_with_the_router_trains_only_the_chosen_router_rows(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2, combine="sigmoid")
    routers = {i: b.router.weight.detach().clone() for i, b in carved_layers(model).items()}
    update_(model, tokenizer, str(text_file), {0: [1, 5]}, CONFIG, train_router=True, progress=False)
    carved = carved_layers(model)
    weight = carved[0].router.weight
    assert not torch.equal(weight[[1, 5]], routers[0][[1, 5]])
    assert torch.equal(weight[[0, 2, 3, 4, 6]], routers[0][[0, 2, 3, 4, 6]])
    assert torch.equal(carved[1].router.weight, routers[1])


def test_update_refuses_bad_choices(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2)
    data = str(text_file)
    with pytest.raises(BrickworkError, match="not carved"):
        update_(model, tokenizer, data, {9: [0]}, CONFIG, progress=False)
    with pytest.raises(BrickworkError, match="not distinct experts"):
        update_(model, tokenizer, data, {0: [3, 3]}, CONFIG, progress=False)
    with pytest.raises(BrickworkError, match="not distinct experts"):
        update_(model, tokenizer, data, {0: [3]} | {1: [7]}, CONFIG, progress=False)
    with pytest.raises(BrickworkError, match="nothing to train"):
        update_(model, tokenizer, data, {0: []}, CONFIG, progress=False)
    with pytest.raises(BrickworkError, match="unweighted sum"):
        update_(model, tokenizer, data, {0: [1]}, CONFIG, train_router=True, progress=False)


def test_cli_update_trains_and_saves(tmp_path, tiny_dir, text_file, capsys):
    import json

    from brickwork.cli.main import main as cli
    from conftest import cli_carved

    carved = cli_carved(tmp_path, tiny_dir, text_file)
    out = tmp_path / "updated"
    args = f"update {carved} --data {text_file} --bricks 2 --tokens 256 --window 32 --batch-size 4 --lr 1e-2"
    assert cli([*args.split(), "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "layer   0: experts [" in printed and "trained" in printed and f"saved to {out}/" in printed
    record = json.loads((out / "update.json").read_text())
    assert all(len(v) == 2 for v in record["experts"].values()) and record["steps"] == 2
    updated, original = bw.load(out), bw.load(carved)
    assert any(
        not torch.equal(a, b) for a, b in zip(updated.parameters(), original.parameters(), strict=True)
    )
    bad = (
        f"update {carved} --data {text_file} --bricks 2 --coverage 0.5 --window 32 --out {tmp_path / 'x'} -q"
    )
    assert cli(bad.split()) == 2
    assert "--coverage" in capsys.readouterr().err
    assert cli(f"update {carved} --data {text_file} --bricks two --out {tmp_path / 'y'} -q".split()) == 2
    assert "--bricks" in capsys.readouterr().err
    assert cli([*args.split(), "--device", "cuda:99", "--out", str(tmp_path / "z"), "-q"]) == 2
    assert "CUDA device(s)" in capsys.readouterr().err and not (tmp_path / "z").exists()
