"""Every registered router, the README's one-file example included (conftest registers it), through every place that
asks a router for something: its options, the kernels, budgets, prune, update and local recovery. A router that
lacks a capability is refused with a message that names the capability."""

from __future__ import annotations

import pytest
import torch

import brickwork as bw
from brickwork.bricks import paths
from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError
from brickwork.ops.prune import prune_brick, prune_router
from brickwork.ops.train import TrainConfig
from brickwork.ops.update import update_
from brickwork.recovery.local import LocalRecoveryConfig, recover_local_
from brickwork.routing import ROUTERS
from brickwork.routing.base import capabilities, check_router_options, parse_router_options
from conftest import carved_tiny

KINDS = sorted(ROUTERS)
# options that fit a tiny model (d_model 32): a rank-32 approximation reads more than the dense FFN
TINY_OPTIONS = {"lowrank": {"rank": 4}}


def test_the_example_router_is_registered_from_its_own_file():
    assert "weight-norm" in ROUTERS
    assert ROUTERS["weight-norm"].__module__ == "weight_norm_router"


def _carved(text_file, tokenizer, router, **config):
    options = dict(experts=16, shared=2, active=4, router=router, router_options=TINY_OPTIONS.get(router, {}))
    options |= config
    return carved_tiny(text_file, tokenizer, **options)


def _x(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router", KINDS)
def test_options_are_typed_checked_and_parsed(router):
    cls = ROUTERS[router]
    defaults = {name: getattr(cls.Options(), name) for name in cls.Options.types()}
    check_router_options(router, defaults)  # every default is in its own range
    assert set(cls.Options.help()) == set(defaults)
    for name, value in defaults.items():
        assert parse_router_options(router, [f"{name}={str(value).lower()}"]) == {name: value}
    with pytest.raises(ValueError, match=f"router '{router}' takes no option 'nonsense'"):
        check_router_options(router, {"nonsense": 1})


@pytest.mark.parametrize("router", KINDS)
def test_kernels_match_the_reference_path(router, text_file, tokenizer):
    model = _carved(text_file, tokenizer, router)
    compiled = capabilities(router)["fast_path"]
    for brick in carved_layers(model).values():
        assert paths.supports_fast_path(brick)
        plan = paths.plan(brick)
        assert (plan.kernel is not None and plan.router_batch is not None) == compiled
        with torch.no_grad():
            for tokens in (1, 5, 40):
                x = _x(tokens, tokens)
                reference = brick.forward_reference(x)
                for path in (paths.tokens_forward, paths.batch_forward, paths.grouped_forward):
                    assert (path(brick, x) - reference).abs().max() <= 1e-5, (path.__name__, tokens)


@pytest.mark.parametrize("router", KINDS)
def test_budgets_change_and_restore_exactly(router, text_file, tokenizer):
    model = _carved(text_file, tokenizer, router, active=8)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    carved = {i: b.read_fraction() for i, b in carved_layers(model).items()}
    lower = min(carved.values()) * 0.9  # a routed expert or more below (the oracle alone reads the whole FFN)
    fractions = bw.set_budget(model, lower)
    assert all(f <= lower * (1 + 1e-9) for f in fractions.values())
    if not capabilities(router)["rebudget"]:  # the default: top-k changes, selections nested
        x = _x(20)
        for i, brick in carved_layers(model).items():
            small = brick.select(x)
            bw.set_budget(model, {i: carved[i]})
            large = brick.select(x)
            bw.set_budget(model, {i: lower})
            assert all(set(s.tolist()) <= set(t.tolist()) for s, t in zip(small, large, strict=True))
    assert bw.set_budget(model, None) == pytest.approx(carved, rel=0, abs=0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("router", KINDS)
def test_prune_slices_the_router_as_it_declares(router, text_file, tokenizer):
    model = _carved(text_file, tokenizer, router)
    brick = carved_layers(model)[0]
    experts = torch.tensor([0, 3, 4, 9, 12])
    if ROUTERS[router].param_layout is None:
        with pytest.raises(BrickworkError, match="param_layout"):
            prune_router(brick.router, brick, experts)
        return
    pruned = prune_brick(brick, experts)
    x = _x(30)
    with torch.no_grad():
        torch.testing.assert_close(
            pruned.router(x, pruned), brick.router(x, brick)[:, experts], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("router", KINDS)
def test_update_trains_only_the_chosen_rows_of_the_router(router, text_file, tokenizer):
    model = _carved(text_file, tokenizer, router, combine="sigmoid")
    layout = ROUTERS[router].param_layout
    brick = carved_layers(model)[0]
    before = {n: p.detach().clone() for n, p in brick.router.named_parameters()}
    config = TrainConfig(tokens=64, window=32, batch_size=2, lr=1e-2)
    if not layout:
        with pytest.raises(BrickworkError, match="param_layout"):
            update_(model, tokenizer, str(text_file), {0: [1, 5]}, config, train_router=True, progress=False)
        return
    update_(model, tokenizer, str(text_file), {0: [1, 5]}, config, train_router=True, progress=False)
    size = brick.expert_size
    for name, param in brick.router.named_parameters():
        old = before[name]
        if layout[name] == "whole" or name in ROUTERS[router].frozen:
            assert torch.equal(param, old), name  # shared by every expert, or data: not trained
            continue
        rows = (
            [1, 5]
            if layout[name] == "expert"
            else [r for e in (1, 5) for r in range(e * size, (e + 1) * size)]
        )
        other = sorted(set(range(param.shape[0])) - set(rows))
        assert torch.equal(param[other], old[other]), name
        assert not torch.equal(param[rows], old[rows]), name


@pytest.mark.parametrize("router", KINDS)
def test_local_recovery_refits_the_routers_that_refit(router, text_file, tokenizer):
    model = _carved(text_file, tokenizer, router)
    brick = carved_layers(model)[0]
    x = _x(64)
    with torch.no_grad():
        h = brick.hidden(x, 0, brick.d_ff)
        before = {n: p.detach().clone() for n, p in brick.router.named_parameters()}
        assert brick.router.refit(brick, x, h) == capabilities(router)["refit"]
    if not capabilities(router)["refit"]:
        assert all(torch.equal(p, before[n]) for n, p in brick.router.named_parameters())
    config = LocalRecoveryConfig(tokens=256, window=32)
    report = recover_local_(model, tokenizer, str(text_file), config, progress=False)
    assert report is not None
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(3, 30)[None]).logits).all()
