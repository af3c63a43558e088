"""Run-time budgets: one carve re-budgeted without carving again, nested, exact on return, saved."""

from __future__ import annotations

import json

import pytest
import torch

import brickwork as bw
from brickwork.bricks.state import carved_layers
from brickwork.carving import execute_plan, plan_carve
from brickwork.carving.presets import recommended
from brickwork.errors import BrickworkError
from conftest import carved_tiny, cli_carved, tiny


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "options",
    [
        dict(experts=8, shared=1, active=3, router="fitted"),
        dict(
            experts=8,
            shared=1,
            active=3,
            router="fitted",
            combine="softmax",
            router_options={"intercept": False},
        ),
        dict(experts=16, shared=0, active=8, router="centroid", down_fraction=0.3),
    ],
)
def test_budgets_change_reads_nest_and_return_bit_for_bit(text_file, tokenizer, options):
    model = carved_tiny(text_file, tokenizer, **options)
    ids = torch.randint(3, 100, (2, 24))
    carved = _logits(model, ids)
    bricks = carved_layers(model)
    before = {i: b.read_fraction() for i, b in bricks.items()}
    small = bw.set_budget(model, min(before.values()) * 0.6)
    assert all(small[i] < before[i] and small[i] <= min(before.values()) * 0.6 + 1e-12 for i in small)
    assert model.brickwork.budget == small
    for brick in bricks.values():  # nested: a smaller budget's experts are among the larger one's
        x = torch.randn(10, brick.d_model)
        few = brick.select(x)
        bw.set_budget(model, {i: before[i] for i in bricks})
        many = brick.select(x)
        bw.set_budget(model, small)
        assert all(set(f.tolist()) <= set(m.tolist()) for f, m in zip(few, many, strict=True))
    assert not torch.equal(_logits(model, ids), carved)
    back = bw.set_budget(model, None)
    assert back == before
    assert torch.equal(_logits(model, ids), carved)  # the kernels' prepared calls were rebuilt, bit for bit
    bw.set_budget(model, 0.9)
    bw.set_budget(model, before)  # the carved fraction itself restores the carved settings
    assert torch.equal(_logits(model, ids), carved)


@pytest.mark.parametrize("budget", [0.3, 0.25, 0.4, 0.75])
def test_a_partial_router_carve_rebudgeted_is_the_preset_carve_for_that_budget(text_file, tokenizer, budget):
    # 0.25, 0.4 and 0.75: the preset computes fewer neurons than fit in the budget (it rounds down); re-budgeting must
    # take the preset's count, not the most that fits
    d_ff, d_model = 64, 32  # the tiny llama's FFN
    at = {f: recommended(f, d_ff=d_ff, d_model=d_model) for f in (0.5, budget)}
    keys = ("experts", "shared", "active", "router", "router_options", "down_fraction")
    model, other = (
        carved_tiny(text_file, tokenizer, method="activation", **{k: getattr(at[f], k) for k in keys})
        for f in (0.5, budget)
    )
    bw.set_budget(model, budget)
    for a, b in zip(carved_layers(model).values(), carved_layers(other).values(), strict=True):
        assert (a.active, a.down_keep, a.router.input_fraction) == (
            b.active,
            b.down_keep,
            b.router.input_fraction,
        )
    ids = torch.randint(3, 100, (1, 20))
    assert torch.equal(_logits(model, ids), _logits(other, ids))


def test_saved_rebudgeted_carves_remember_their_carved_settings(tmp_path, text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=4, router="fitted")
    ids = torch.randint(3, 100, (1, 20))
    carved = _logits(model, ids)
    bw.set_budget(model, 0.4)
    smaller = _logits(model, ids)
    bw.save(model, tmp_path / "m", tokenizer)
    again = bw.load(tmp_path / "m")
    assert torch.equal(_logits(again, ids), smaller)
    bw.set_budget(again, None)
    assert torch.equal(_logits(again, ids), carved)


def test_bad_budgets_are_refused_and_leave_the_model_as_it_was(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, experts=8, shared=2, active=3, router="fitted")
    before = {i: b.active for i, b in carved_layers(model).items()}
    for budget in (0.0, 1.5, "half", True):
        with pytest.raises(BrickworkError, match="budget"):
            bw.set_budget(model, budget)
    with pytest.raises(BrickworkError, match="below what this layer reads"):
        bw.set_budget(model, {0: 0.9, 1: 0.01})  # layer 1 refused: layer 0 must not have changed either
    with pytest.raises(BrickworkError, match="not carved"):
        bw.set_budget(model, {7: 0.5})
    assert {i: b.active for i, b in carved_layers(model).items()} == before
    with pytest.raises(BrickworkError, match="carved model"):
        bw.set_budget(torch.nn.Linear(2, 2), 0.5)


def test_cli_eval_at_another_budget(tmp_path, tiny_dir, text_file, capsys):
    from brickwork.cli.main import main as cli

    out = cli_carved(tmp_path, tiny_dir, text_file)
    assert cli(["eval", str(out), "--data", str(text_file), "--window", "64", "--budget", "0.4", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "budget 40.0%" in printed and "perplexity" in printed
    assert (
        cli(["eval", str(tiny_dir), "--data", str(text_file), "--window", "64", "--budget", "0.4", "-q"]) == 2
    )
    assert "dense" in capsys.readouterr().err
    fitted = tmp_path / "fitted"
    carve = f"carve {tiny_dir} --experts 16 --shared 2 --active 10 --router fitted --calib {text_file} "
    carve += (
        "--calib-tokens 512 --router-samples 256 --window 64 -q --combine sigmoid --combine-budgets 0.3 0.5"
    )
    assert cli([*carve.split(), "--out", str(fitted)]) == 0
    meta = json.loads((fitted / "brickwork.json").read_text())
    assert meta["format_version"] == 2  # older brickwork says "upgrade"
    assert all(len(layer["combine_fits"]) == 3 and layer["spec_version"] == 2 for layer in meta["layers"])
    plain = json.loads(
        (out / "brickwork.json").read_text()
    )  # a carve without fits: what older brickwork reads
    assert plain["format_version"] == 1 and all(
        "combine" not in layer["calibrated"] for layer in plain["layers"]
    )
    assert cli([*carve.replace("sigmoid", "sum").split(), "--out", str(tmp_path / "x")]) == 2
    assert "nothing to fit" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_layer_budgets_move_reads_from_the_least_to_the_most_sensitive_layers(text_file, tokenizer):
    from brickwork.bricks.budget import allocate_budgets

    model = carved_tiny(text_file, tokenizer, experts=16, shared=2, active=8, router="fitted")
    chosen = allocate_budgets(
        model, tokenizer, str(text_file), 0.5, step=0.15, tokens=256, window=64, progress=False
    )
    record = model.brickwork.budget_allocation
    assert set(chosen.values()) <= {0.35, 0.5, 0.65}
    assert sum(v > 0.5 for v in chosen.values()) == sum(v < 0.5 for v in chosen.values())  # same average
    for up in (i for i, v in chosen.items() if v > 0.5):  # every move was a measured net gain
        assert any(record["gain"][up] > record["cost"][down] for down, v in chosen.items() if v < 0.5)
    fractions = {i: b.read_fraction() for i, b in carved_layers(model).items()}
    assert all(fractions[i] <= chosen[i] + 1e-9 for i in chosen)  # the allocation is applied
    again = carved_tiny(text_file, tokenizer, experts=16, shared=2, active=8, router="fitted")
    assert (
        allocate_budgets(
            again, tokenizer, str(text_file), 0.5, step=0.15, tokens=256, window=64, progress=False
        )
        == chosen
    )
    with pytest.raises(BrickworkError, match="step"):
        allocate_budgets(model, tokenizer, str(text_file), 0.1, step=0.2, tokens=256, window=64)


def test_layer_budget_rounds_climb_several_steps_and_keep_the_average(text_file, tokenizer):
    from brickwork.bricks.budget import allocate_budgets

    options = dict(tokens=256, window=64, progress=False)
    model = carved_tiny(text_file, tokenizer, experts=16, shared=2, active=8, router="fitted")
    one = allocate_budgets(model, tokenizer, str(text_file), 0.5, step=0.07, **options)
    chosen = allocate_budgets(model, tokenizer, str(text_file), 0.5, step=0.07, rounds=3, **options)
    rounds = model.brickwork.budget_allocation["rounds"]
    assert 1 <= len(rounds) <= 3 and rounds[0]["moves"]
    first = dict.fromkeys(chosen, 0.5) | {u: 0.57 for u, _ in rounds[0]["moves"]}
    assert first | {d: 0.43 for _, d in rounds[0]["moves"]} == pytest.approx(
        one
    )  # round 1 is the one-round result
    assert sum(chosen.values()) == pytest.approx(0.5 * len(chosen))  # the same average
    for record in rounds:
        for up, down in record["moves"]:  # every move a measured net gain, from that round's allocation
            assert record["gain"][up] - record["cost"][down] > 0
    steps = {round((v - 0.5) / 0.07) for v in chosen.values()}
    assert steps <= set(range(-3, 4)) and (len(rounds) == 1 or max(map(abs, steps)) >= 1)
    with pytest.raises(BrickworkError, match="rounds"):
        allocate_budgets(model, tokenizer, str(text_file), 0.5, step=0.07, rounds=0, **options)


def test_carving_with_sensitivity_layer_budgets(text_file, tokenizer):
    uniform = carved_tiny(text_file, tokenizer, experts=16, shared=2, active=8, router="fitted")
    config = dict(
        experts=16, shared=2, active=8, router="fitted", layer_budgets="sensitivity", layer_step=0.15
    )
    model = tiny("llama").eval()
    options = dict(method="random", calib_tokens=512, router_samples=256, window=64) | config
    report = bw.carve_(
        model, bw.CarveConfig(**options), calib=str(text_file), tokenizer=tokenizer, progress=False
    )
    record = model.brickwork.budget_allocation
    assert record["step"] == 0.15 and set(record["layers"]) == set(carved_layers(model))
    fractions = [b.read_fraction() for b in carved_layers(model).values()]
    assert report.layer_fractions == fractions
    carved = [b.read_fraction() for b in carved_layers(uniform).values()]  # the same carve, uniform
    assert sum(f > u for f, u in zip(fractions, carved, strict=True)) == sum(
        f < u for f, u in zip(fractions, carved, strict=True)
    )  # as many layers raised as lowered: the same average
    # the plan says so and executing it is the same carve: print(plan) shows what executes
    planned = tiny("llama").eval()
    plan = plan_carve(planned, bw.CarveConfig(**options), str(text_file), tokenizer, progress=False)
    assert "per-layer budgets by sensitivity (allocate_budgets, step 0.15)" in str(plan)
    execute_plan(planned, plan, progress=False)
    assert [b.read_fraction() for b in carved_layers(planned).values()] == fractions
    with pytest.raises(BrickworkError, match="calib"):
        bw.carve_(tiny("llama"), bw.CarveConfig(**options), calibration=object())
    with pytest.raises(ValueError, match="layer_budgets"):
        bw.CarveConfig(layer_budgets="greedy")


@pytest.mark.parametrize("rule", ["sigmoid", "softmax"])
def test_combine_budgets_make_a_rebudgeted_carve_the_carve_made_there(tmp_path, text_file, tokenizer, rule):
    options = dict(experts=16, shared=2, router="fitted", combine=rule, router_options={"intercept": False})
    model = carved_tiny(text_file, tokenizer, active=10, combine_budgets=(0.3, 0.5), **options)
    plain = carved_tiny(text_file, tokenizer, active=10, **options)  # fitted for its own top-k only
    ids = torch.randint(3, 100, (2, 24))
    carved = _logits(model, ids)
    assert torch.equal(carved, _logits(plain, ids))  # the carve's own rule is what it was
    bricks, others = carved_layers(model), carved_layers(plain)
    assert all(not b.spec.combine_fits for b in others.values())
    assert all(
        len(b.spec.combine_fits) == 3 and b.spec.fitted_combine(10) == b.combine for b in bricks.values()
    )
    for budget in (0.3, 0.5):
        bw.set_budget(model, budget)
        k = next(iter(bricks.values())).active
        assert k < 10
        made_there = carved_tiny(text_file, tokenizer, active=k, **options)  # the same router: it ignores k
        assert torch.equal(_logits(model, ids), _logits(made_there, ids))
        bw.set_budget(plain, budget)  # without fits: the weights fitted for k = 10
        assert not torch.equal(_logits(plain, ids), _logits(made_there, ids))
    bw.set_budget(model, 0.4)  # no fit for this top-k: the carved rule, as before
    assert all(b.combine == b.spec.fitted_combine(10) for b in bricks.values())
    bw.set_budget(model, 0.3)
    bw.save(model, tmp_path / "fits", tokenizer)
    loaded = bw.load(tmp_path / "fits")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    bw.set_budget(loaded, None)  # back to the carve, exactly, after a save and load
    assert torch.equal(_logits(loaded, ids), carved)
    with pytest.raises(ValueError, match="sum rule has nothing to fit"):
        bw.CarveConfig(combine_budgets=(0.3,))
    with pytest.raises(BrickworkError, match="combine_budgets"):
        carved_tiny(text_file, tokenizer, active=10, combine_budgets=(0.01,), **options)
