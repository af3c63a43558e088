"""Per-token budgets: variable k within the carve's top-k, exact on return, the same on every path, saved, fitted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import brickwork as bw
from brickwork.bricks import paths as kernels
from brickwork.bricks.adaptive import TokenBudget, dropped_share, kept_counts
from brickwork.bricks.state import carved_layers
from brickwork.bricks.token_budget import ReadCounter
from brickwork.errors import BrickworkError
from conftest import carved_tiny, cli_carved

CONFIGS = {
    "sum fitted": dict(experts=8, shared=1, active=4, router="fitted", router_options={"intercept": False}),
    "sigmoid": dict(
        experts=8, shared=0, active=5, router="fitted", combine="sigmoid", router_options={"intercept": False}
    ),
    "softmax_topk": dict(
        experts=8,
        shared=1,
        active=4,
        router="fitted",
        combine="softmax_topk",
        router_options={"intercept": False},
    ),
    "partial + down rows": dict(experts=16, shared=0, active=8, router="partial", down_fraction=0.3),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _inputs(tokens: int = 48, seed: int = 0) -> torch.Tensor:
    """Tokens of widely different sizes: small ones carry little router mass, large ones much."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 0.5, tokens)[torch.randperm(tokens, generator=generator)]
    return torch.randn(tokens, 32, generator=generator) * scale[:, None]


def _budgets(brick, x: torch.Tensor) -> dict[str, TokenBudget]:
    """A budget under which about half the tokens run no routed expert, and one under which k varies up to the
    cap (from the tokens' own masses, so that each case is sure to occur)."""
    with torch.no_grad():
        cumulative = brick.cap_mass(x)[1].double().cumsum(-1)
    total = cumulative[:, -1]
    all_but_last = (cumulative[:, -2] / total)[total > 0]  # the tokens above the median keep fewer than all
    return {
        "zero": TokenBudget(threshold=0.5, min_active=0, zero_mass=float(total.median())),
        "variable": TokenBudget(threshold=float(all_but_last.median()), min_active=1),
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_a_threshold_of_one_or_none_is_the_carve_bit_for_bit(name, text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS[name])
    ids = torch.randint(3, 100, (2, 24))
    carved = _logits(model, ids)
    assert set(bw.set_token_budget(model, 1.0, min_active=0).values()) == {TokenBudget(1.0, min_active=0)}
    assert torch.equal(_logits(model, ids), carved)
    bw.set_token_budget(model, 0.5)
    assert not torch.equal(_logits(model, ids), carved)
    assert set(bw.set_token_budget(model, None).values()) == {None}
    assert torch.equal(_logits(model, ids), carved)  # the kernels' prepared calls were rebuilt, bit for bit
    assert all(b.spec.token_budget is None for b in carved_layers(model).values())


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("case", ["zero", "variable"])
@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_every_path_is_the_reference_path_with_variable_k(
    name, case, accumulate, text_file, tokenizer, monkeypatch
):
    model = carved_tiny(text_file, tokenizer, accumulate=accumulate, **CONFIGS[name])
    x = _inputs()
    for index, brick in carved_layers(model).items():
        budget = _budgets(brick, x)[case]
        bw.set_token_budget(model, {index: budget})
        with torch.no_grad():
            kept = (brick.select(x) >= 0).sum(-1)
        if case == "zero":
            assert (kept == 0).any() and (kept > 0).any()
        else:
            assert (kept == brick.active).any() and (kept < brick.active).any() and (kept >= 1).all()
        assert kernels.plan(brick).kernel is None  # routed in torch, as the reference path routes
        with torch.no_grad():
            reference = brick.forward_reference(x)
            paths = {"token": kernels.tokens_forward(brick, x)}
            for dense_down in (1, 10**9):
                monkeypatch.setitem(kernels.SWITCH_POINTS, "dense_down_min", dense_down)
                paths[f"batch {dense_down}"] = kernels.batch_forward(brick, x)
            if brick.down_keep is None and accumulate == "float32":
                paths["grouped"] = kernels.grouped_forward(brick, x)
            paths["auto"] = brick(x)
        for path, y in paths.items():
            if accumulate == "float64" and path != "batch 1":  # exact bricks never take the dense down matmul
                assert torch.equal(y, reference), path
            else:
                assert (y - reference).abs().max() <= 1e-5, path


def test_kept_experts_are_nested_prefixes_of_the_carve_selection(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["sigmoid"])
    brick = next(iter(carved_layers(model).values()))
    x = _inputs(seed=3)
    with torch.no_grad():
        carve = brick.select(x)
        rows = {}
        for threshold in (0.3, 0.6, 0.9):
            bw.set_token_budget(model, threshold)
            rows[threshold] = brick.select(x)
    for low, high in ((0.3, 0.6), (0.6, 0.9)):
        for few, many, full in zip(rows[low], rows[high], carve, strict=True):
            kept = few[few >= 0]
            assert torch.equal(kept, many[: len(kept)])  # a prefix, in router order
            assert set(many[many >= 0].tolist()) <= set(full.tolist())
    assert (rows[0.3] >= 0).sum() < (rows[0.9] >= 0).sum()


def test_kept_counts_follow_the_rule():
    mass = torch.tensor(
        [[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [9.0, 0.5, 0.3, 0.2]]
    )
    assert kept_counts(mass, TokenBudget(0.75)).tolist() == [3, 1, 3, 1]  # 7.5 of 10; no mass: min_active
    assert kept_counts(mass, TokenBudget(0.75, min_active=0)).tolist() == [3, 0, 3, 1]
    assert kept_counts(mass, TokenBudget(0.75, min_active=2)).tolist() == [3, 2, 3, 2]
    assert kept_counts(mass, TokenBudget(1.0)).tolist() == [4, 4, 4, 4]  # 1 keeps the cap, zero masses too
    # the zero expert (mass 20): a token may drop 25% of (its mass + 20); with 4 of mass it keeps none
    assert kept_counts(mass, TokenBudget(0.75, min_active=0, zero_mass=20.0)).tolist() == [1, 0, 0, 1]


def test_reads_are_counted_per_token_mean_within_worst(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["sum fitted"])
    bricks = carved_layers(model)
    ids = torch.randint(3, 100, (2, 30))
    with ReadCounter(model) as counter:
        _logits(model, ids)
    fixed = counter.reads()
    assert fixed.tokens == 60 and fixed.mean == pytest.approx(fixed.worst)
    assert all(r["worst"] == bricks[i].read_fraction() for i, r in fixed.layers.items())
    bw.set_token_budget(model, 0.5, min_active=0, zero_mass=1e9)  # every token: no routed expert
    with ReadCounter(model) as counter:
        _logits(model, ids)
    none = counter.reads()
    for index, layer in none.layers.items():
        assert layer["kept"][0] == 60 and layer["routed_mean"] == 0
        assert layer["mean"] == pytest.approx(bricks[index].routed_fraction(0))
        assert layer["worst"] == bricks[index].read_fraction()  # the cap: unchanged
    bw.set_token_budget(model, 0.6)
    with ReadCounter(model) as counter:
        _logits(model, ids)
    some = counter.reads()
    assert none.mean < some.mean < some.worst == fixed.worst
    assert all(sum(r["kept"]) == r["tokens"] == 60 for r in some.layers.values())
    assert not any(b._forward_hooks for b in bricks.values())  # the counter's hooks are gone


def test_tokens_may_skip_every_routed_expert_and_still_run_the_shared_ones(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["sum fitted"])
    brick = next(iter(carved_layers(model).values()))
    bw.set_token_budget(model, 0.5, min_active=0, zero_mass=1e9)
    x = _inputs()
    with torch.no_grad():
        assert (brick.select(x) == -1).all()
        shared = brick.hidden(x, 0, brick.num_shared) @ brick.down_t[: brick.num_shared]
        assert (brick(x) - shared).abs().max() <= 1e-5 and shared.abs().max() > 0


@pytest.mark.parametrize("per_layer", [False, True])
def test_fit_token_budget_reads_the_target_on_calibration_text(per_layer, text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["sigmoid"])
    worst = next(iter(carved_layers(model).values())).read_fraction()
    target = 0.75 * worst
    fit = bw.fit_token_budget(
        model, tokenizer, str(text_file), target, per_layer=per_layer, tokens=512, window=64, progress=False
    )
    assert fit.reads.mean <= target * 1.02 and fit.reads.mean >= target - 0.1 * worst
    if not per_layer:
        assert len({b.threshold for b in fit.budgets.values()}) == 1
    else:
        assert all(r["mean"] <= target * 1.02 for r in fit.reads.layers.values())
    assert {i: b.spec.token_budget for i, b in carved_layers(model).items()} == fit.budgets
    with pytest.raises(BrickworkError, match="below the least"):
        bw.fit_token_budget(model, tokenizer, str(text_file), 0.01, tokens=512, window=64, progress=False)


def test_the_copy_expert_is_fitted_in_closed_form_and_adds_only_where_mass_was_dropped(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["sum fitted"])
    worst = next(iter(carved_layers(model).values())).read_fraction()
    fit = bw.fit_token_budget(
        model, tokenizer, str(text_file), 0.8 * worst, copy=True, tokens=512, window=64, progress=False
    )
    for index, brick in carved_layers(model).items():
        copy = fit.copy[index]
        assert copy["gain"] == brick.spec.token_budget.copy_gain != 0
        # least squares: never worse on what it was fitted to
        assert copy["after"] <= copy["lost"] * (1 + 1e-6)
        x = _inputs()
        with torch.no_grad():
            selection, _, coefficients = brick.route_tokens(x)
            share = dropped_share(brick.cap_mass(x)[1], (selection >= 0).sum(-1))
        assert coefficients is not None and torch.equal(coefficients != 0, share > 0)
        assert torch.equal(coefficients, (copy["gain"] * share).float())
        with torch.no_grad():
            assert (brick(x) - brick.forward_reference(x)).abs().max() <= 1e-5
            assert (kernels.batch_forward(brick, x) - brick.forward_reference(x)).abs().max() <= 1e-5


def test_a_saved_token_budget_loads_back(tmp_path, text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["softmax_topk"])
    budget = TokenBudget(threshold=0.6, min_active=0, copy_gain=0.25, zero_mass=0.05)
    bw.set_token_budget(model, {0: budget})
    ids = torch.randint(3, 100, (1, 20))
    bw.save(model, tmp_path / "m", tokenizer)
    meta = json.loads((tmp_path / "m" / "brickwork.json").read_text())
    records = {r["layer"]: r for r in meta["layers"]}
    assert records[0]["token_budget"] == budget.to_dict() and "token_budget" not in records[1]
    again = bw.load(tmp_path / "m")
    assert {i: b.spec for i, b in carved_layers(again).items()} == {
        i: b.spec for i, b in carved_layers(model).items()
    }
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    records[0]["token_budget"] = {"threshold": 2.0}
    (tmp_path / "m" / "brickwork.json").write_text(json.dumps(meta))
    with pytest.raises(BrickworkError, match="threshold must be in"):
        bw.load(tmp_path / "m")


def test_bad_token_budgets_are_refused_and_leave_the_model_as_it_was(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["sum fitted"])
    bw.set_token_budget(model, 0.7)
    before = {i: b.spec for i, b in carved_layers(model).items()}
    for value, message in [
        (0.0, "threshold must be in"),
        (1.5, "threshold must be in"),
        ("half", "a token budget is a threshold"),
        ({9: 0.5}, "not carved"),
    ]:
        with pytest.raises(BrickworkError, match=message):
            bw.set_token_budget(model, value)
    with pytest.raises(BrickworkError, match="above layer 0's cap of 4"):
        bw.set_token_budget(model, 0.5, min_active=5)
    with pytest.raises(BrickworkError, match="min_active must be an integer"):
        bw.set_token_budget(model, 0.5, min_active=-1)
    with pytest.raises(BrickworkError, match="keeps at least 3 routed experts"):
        bw.set_token_budget(model, 0.5, min_active=3)
        bw.set_budget(model, 0.3)
    bw.set_token_budget(model, 0.7)
    assert {i: b.spec for i, b in carved_layers(model).items()} == before
    with pytest.raises(BrickworkError, match="carved model"):
        bw.set_token_budget(torch.nn.Linear(2, 2), 0.5)
    centroid = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=3, router="centroid")
    with pytest.raises(BrickworkError, match="'centroid' router's scores do not estimate"):
        bw.set_token_budget(centroid, 0.5)


def test_run_time_top_k_budgets_keep_the_token_budget_within_the_new_cap(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["sum fitted"])
    bw.set_token_budget(model, 0.6)
    bw.set_budget(model, 0.3)
    assert all(
        b.spec.token_budget == TokenBudget(0.6) and b.active < 4 for b in carved_layers(model).values()
    )
    x = _inputs()
    for brick in carved_layers(model).values():
        with torch.no_grad():
            assert brick.select(x).shape == (len(x), brick.active)
            assert (kernels.batch_forward(brick, x) - brick.forward_reference(x)).abs().max() <= 1e-5


def test_training_with_a_token_budget_reaches_the_router(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["sigmoid"])
    bw.set_token_budget(model, 0.5, min_active=0, zero_mass=0.5)
    from brickwork.bricks.capture import BalanceCapture

    brick = next(iter(carved_layers(model).values())).train()
    with BalanceCapture(brick) as capture:
        brick(_inputs()).sum().backward()
        terms, loads = capture.take()
    assert brick.router.weight.grad is not None and len(terms) == 1 and terms[0].requires_grad
    assert loads[0].shape == (brick.num_experts,)


def test_export_refuses_a_token_budget(text_file, tokenizer):
    from brickwork.io.export import plan_export

    model = carved_tiny(text_file, tokenizer, **CONFIGS["softmax_topk"])
    plan_export(model, "qwen2_moe")
    bw.set_token_budget(model, 0.8)
    with pytest.raises(BrickworkError, match="fixed top-k: remove it with brickwork.set_token_budget"):
        plan_export(model, "qwen2_moe")


def test_cli_eval_with_a_token_threshold_or_a_fitted_token_budget(tmp_path, tiny_dir, text_file, capsys):
    from brickwork.cli.main import main as cli

    out = cli_carved(tmp_path, tiny_dir, text_file)
    capsys.readouterr()
    common = ["eval", str(out), "--data", str(text_file), "--window", "64", "--max-tokens", "256", "-q"]
    report = tmp_path / "eval.json"
    assert cli([*common, "--token-threshold", "0.6", "--token-min-active", "0", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "threshold 0.6" in printed and "FFN reads per token" in printed
    written = json.loads(report.read_text())
    reads = written["results"][0]["reads"]
    assert reads["mean"] < reads["worst"]
    layers = json.loads((out / "brickwork.json").read_text())["layers"]  # equal sizes: the plain mean
    assert written["reads"] == pytest.approx(sum(x["reads"] for x in layers) / len(layers))
    fit = [*common, "--token-budget", "0.4", "--token-calib", str(text_file), "--token-copy"]
    assert cli(fit) == 0
    assert "per-token budget fitted to 40.0%" in capsys.readouterr().out
    for extra, message in [
        (["--token-copy"], "option(s) of --token-budget"),
        (["--token-min-active", "1"], "an option of --token-threshold or --token-budget"),
    ]:
        assert cli([*common, *extra]) == 2
        assert message in capsys.readouterr().err
    for wrong in (["--token-threshold", "0.5", "--token-budget", "0.3"], ["--token-threshold", "1.5"]):
        with pytest.raises(SystemExit):  # argparse: one or the other; a fraction in (0, 1]
            cli([*common, *wrong])
    err = capsys.readouterr().err
    assert "not allowed with" in err and "must be a fraction in (0, 1]" in err
    assert (
        cli(["eval", str(tiny_dir), "--data", str(text_file), "--window", "64", "--token-threshold", "0.5"])
        == 2
    )
    assert "dense" in capsys.readouterr().err


def test_the_compiled_cut_is_the_torch_one_ties_and_zeros_included():
    from brickwork.bricks.adaptive import drop_slots
    from brickwork.kernels import cpu
    from brickwork.routing.base import topk_by_position

    if not kernels.HAVE_NUMBA:
        pytest.skip("numba not installed")
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        experts = [5, 16, 64, 100][trial % 4]
        active = int(torch.randint(1, experts + 1, (1,), generator=generator))
        values = torch.randn(40, experts, generator=generator)
        if trial % 3 == 0:  # ties, negative and zero masses
            values = (values * 2).round() / 2
        clamp = trial % 2 == 0
        if not clamp:
            values = values.abs()
        budget = TokenBudget(
            threshold=float(torch.rand(1, generator=generator)) * 0.99 + 0.005,
            min_active=trial % 3,
            zero_mass=[0.0, 0.5, 3.0][trial % 3],
        )
        if budget.min_active > active:
            continue
        selection = topk_by_position(values, active)
        mass = values.gather(1, selection)
        mass = mass.clamp_min(0) if clamp else mass
        kept = kept_counts(mass, budget)
        expected = selection.masked_fill(drop_slots(selection, kept), -1)
        chosen, dropped = cpu.cut_by_mass(
            values.numpy(), active, budget.threshold, budget.min_active, budget.zero_mass, clamp
        )
        assert torch.equal(torch.from_numpy(chosen), expected), trial
        assert torch.equal(torch.from_numpy(dropped), dropped_share(mass, kept)), trial
        serial = cpu.cut_by_mass_serial(  # batch-1 decode's cut: the same rows, in the calling thread
            values.numpy(), active, budget.threshold, budget.min_active, budget.zero_mass, clamp
        )
        assert np.array_equal(serial[0], chosen) and np.array_equal(serial[1], dropped), trial
