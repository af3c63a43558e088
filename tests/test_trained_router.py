"""The trained router: a linear gate trained on the oracle's choice, better than the ridge fit it starts from."""

from __future__ import annotations

import torch

import brickwork as bw
import brickwork.routing.trained as trained
from brickwork.routing.trained import captured_mass, oracle_targets, train_linear_router
from conftest import tiny


def synthetic(n: int = 4096, d: int = 16, experts: int = 8, seed: int = 0):
    """Inputs whose expert masses are a nonlinear (rectified, squared) function of x: regression is not ranking."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    mass = torch.relu(x @ torch.randn(d, experts, generator=g)) ** 2
    return x, mass


def test_oracle_targets_weight_the_chosen_experts_by_their_mass():
    mass = torch.tensor([[4.0, 1.0, 3.0, 0.0]])
    torch.testing.assert_close(oracle_targets(mass, 2), torch.tensor([[4 / 7, 0.0, 3 / 7, 0.0]]))
    assert captured_mass(mass, mass, 2) == 1.0
    assert abs(captured_mass(-mass, mass, 2) - 1 / 7) < 1e-6


def test_training_captures_more_held_out_mass_than_the_ridge_fit_and_is_deterministic():
    x, mass = synthetic()
    weight, bias, report = train_linear_router(x, mass, 2, intercept=True, steps=300, lr=1e-2, seed=0)
    assert report["kept"] and report["held_out_captured_after"] > report["held_out_captured_before"] + 0.02
    again = train_linear_router(x, mass, 2, intercept=True, steps=300, lr=1e-2, seed=0)
    assert torch.equal(weight, again[0]) and torch.equal(bias, again[1])


def test_a_worse_training_result_keeps_the_ridge_fit(monkeypatch):
    x, mass = synthetic()
    # train towards the lightest experts: worse on held-out samples, so the ridge fit is kept
    original = trained.oracle_targets
    monkeypatch.setattr(trained, "oracle_targets", lambda m, k: original(m.max() - m, k))
    weight, bias, report = train_linear_router(x, mass, 2, intercept=True, steps=100, lr=1e-2, seed=0)
    assert not report["kept"]
    assert report["held_out_captured_after"] < report["held_out_captured_before"]


def test_a_stock_form_trained_carve_runs_on_the_kernels_and_has_no_bias(tokenizer, text_file):
    model = tiny("llama")
    config = bw.CarveConfig(
        experts=8,
        shared=1,
        active=2,
        router="trained",
        router_options={"intercept": False, "steps": 20},
        calib_tokens=512,
        window=64,
    )
    bw.carve_(model, config, calib=str(text_file), tokenizer=tokenizer, progress=False)
    bricks = [m for m in model.modules() if isinstance(m, bw.BrickFFN)]
    assert bricks and all(b.router.kind == "trained" for b in bricks)
    assert all(torch.count_nonzero(b.router.bias) == 0 for b in bricks)
    assert all(b.router.linear_form() is not None for b in bricks)
