from __future__ import annotations

import json

import pytest
import torch

import brickwork as bw
from brickwork.bricks.budget import calibrated
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.state import carved_layers
from brickwork.data.sources import token_windows
from brickwork.errors import BrickworkError
from brickwork.ops.prune import prune_for_domain_
from brickwork.ops.usage import ExpertUsage, expert_usage
from conftest import carved_tiny


@pytest.fixture
def domain(tmp_path):
    """A narrow domain: a few words repeated, so that each layer routes to a part of its experts."""
    path = tmp_path / "domain.txt"
    path.write_text(" ".join(["the quick fox"] * 80))
    return path


def _pruned(text_file, tokenizer, domain, **config):
    model = carved_tiny(text_file, tokenizer, **({"experts": 32, "shared": 2, "active": 2} | config))
    usage = expert_usage(model, tokenizer, str(domain), tokens=128, window=32, progress=False)
    windows = token_windows(tokenizer, str(domain), 32, 128)
    with torch.no_grad():  # inference: the kernels' paths (weights wanting gradients take the reference path)
        before = model(input_ids=windows).logits
    report = prune_for_domain_(model, usage)
    return model, usage, windows, before, report


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"combine": "sigmoid"},
        {"router": "centroid"},
        {"router": "lowrank"},
        {"router": "representative"},
        {"router": "partial"},
    ],
)
def test_pruning_at_full_coverage_keeps_the_domains_logits_bit_for_bit(text_file, tokenizer, domain, config):
    model, usage, windows, before, report = _pruned(
        text_file, tokenizer, domain, **({"accumulate": "float64"} | config)
    )
    assert any(layer.pruned for layer in report.layers)  # the test must prune something to mean anything
    for layer in report.layers:
        used = torch.nonzero(usage.counts[layer.layer]).flatten().tolist()
        assert layer.kept == sorted(used) or (
            len(used) < layer.active_before and set(used) <= set(layer.kept)
        )
        assert layer.experts_after == len(layer.kept) and layer.params_after < layer.params_before
    assert report.reduction > 0 and report.ffn_params_after < report.ffn_params_before
    assert report.notes == []
    for use_kernels in (True, False):
        BrickFFN.use_kernels = use_kernels
        try:
            with torch.no_grad():
                assert torch.equal(model(input_ids=windows).logits, before), use_kernels
        finally:
            BrickFFN.use_kernels = True


def test_the_pruned_brick_holds_the_kept_experts_in_order(text_file, tokenizer, domain):
    model = carved_tiny(text_file, tokenizer, experts=32, shared=2, active=2)
    old = {
        i: (b.up.detach().clone(), b.neuron_order.clone(), b.router.weight.detach().clone(), b.d_ff)
        for i, b in carved_layers(model).items()
    }
    usage = expert_usage(model, tokenizer, str(domain), tokens=128, window=32, progress=False)
    report = prune_for_domain_(model, usage)
    for layer in report.layers:
        brick = carved_layers(model)[layer.layer]
        up, order, router, d_ff = old[layer.layer]
        s, size = brick.num_shared, brick.expert_size
        rows = list(range(s)) + [s + e * size + j for e in layer.kept for j in range(size)]
        assert torch.equal(brick.up, up[rows]) and torch.equal(brick.neuron_order, order[rows])
        assert torch.equal(brick.router.weight, router[layer.kept])
        assert brick.spec.num_experts == len(layer.kept) and brick.d_ff == len(rows)
        if layer.pruned:
            assert brick.pruned_from == d_ff
            assert calibrated(brick)["active"] == brick.active


def test_coverage_and_min_experts_choose_fewer_or_more(text_file, tokenizer, domain):
    model = carved_tiny(text_file, tokenizer, experts=32, shared=2, active=4)
    usage = expert_usage(model, tokenizer, str(domain), tokens=128, window=32, progress=False)
    report = prune_for_domain_(model, usage, coverage=0.5)
    for layer in report.layers:
        assert layer.experts_after >= 4  # never fewer than active
        shares = usage.shares(layer.layer)
        assert shares[layer.kept].sum() >= 0.5 - 1e-9
    assert any("coverage" in note for note in report.notes)
    fake = ExpertUsage(
        counts={i: torch.zeros(30, dtype=torch.long) for i in carved_layers(model)}, tokens=1, source="x"
    )
    for counts in fake.counts.values():
        counts[[3, 7]] = 5
    model = carved_tiny(text_file, tokenizer, experts=32, shared=2, active=4)
    report = prune_for_domain_(model, fake, min_experts=2)  # below active: active is lowered, and said
    assert all(layer.kept == [3, 7] and layer.active_after == 2 for layer in report.layers)
    assert any("active lowered" in note for note in report.notes)
    model = carved_tiny(text_file, tokenizer, experts=32, shared=2, active=4)
    report = prune_for_domain_(model, fake)  # filled up to active with the most used, then the lowest index
    assert all(layer.kept == [0, 1, 3, 7] for layer in report.layers)


def test_float32_sums_and_softmax_rules_are_reported(text_file, tokenizer, domain):
    model, _, windows, before, report = _pruned(text_file, tokenizer, domain, accumulate="float32")
    assert any("float32" in note for note in report.notes)
    with torch.no_grad():  # a sum over fewer rows may round differently
        torch.testing.assert_close(model(input_ids=windows).logits, before, rtol=1e-6, atol=1e-6)
    model, _, windows, before, report = _pruned(text_file, tokenizer, domain, combine="softmax")
    assert any("softmax" in note and "changed" in note for note in report.notes)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=windows).logits, before)  # the note is true
    model, _, windows, before, report = _pruned(text_file, tokenizer, domain, combine="softmax_topk")
    assert any("rounding" in note for note in report.notes)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=windows).logits, before, rtol=1e-5, atol=1e-5)


def test_pruned_model_saves_loads_and_refuses_uncarving(text_file, tokenizer, domain, tmp_path):
    model, _, windows, before, report = _pruned(text_file, tokenizer, domain, accumulate="float64")
    out = bw.save(model, tmp_path / "pruned", tokenizer)
    loaded = bw.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=windows).logits, before)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    for index, brick in carved_layers(loaded).items():
        assert brick.pruned_from == carved_layers(model)[index].pruned_from
        assert calibrated(brick) == calibrated(carved_layers(model)[index])
    assert bw.set_budget(loaded, 0.9)  # budgets are fractions of the pruned FFNs
    assert bw.set_budget(loaded, None)  # the carved budgets are still valid
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=windows).logits, before)
    with pytest.raises(BrickworkError, match="pruned"):
        bw.uncarve_(loaded)
    assert all(isinstance(b, BrickFFN) for b in carved_layers(loaded).values())  # nothing half undone
    pruned = next(b for b in carved_layers(loaded).values() if b.pruned_from is not None)
    with pytest.raises(BrickworkError, match="cannot be rebuilt"):
        pruned.to_dense_weights()

    meta_path = out / "brickwork.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format_version"] == 2  # older brickwork says "upgrade", not "damaged"
    layer = next(r for r in meta["layers"] if "pruned_from" in r)
    for damage in ({"pruned_from": layer["pruned_from"] + 1}, {"pruned_from": "64"}, {"pruned_from": None}):
        record = dict(layer) | damage
        if damage["pruned_from"] is None:
            del record["pruned_from"]
        bad = dict(meta) | {"layers": [record if r is layer else r for r in meta["layers"]]}
        meta_path.write_text(json.dumps(bad))
        with pytest.raises(BrickworkError, match="d_ff|pruned_from"):
            bw.load(out)


def test_pruning_refuses_mismatched_usage(text_file, tokenizer, domain):
    model = carved_tiny(text_file, tokenizer, experts=32, shared=2, active=2)
    usage = expert_usage(model, tokenizer, str(domain), tokens=128, window=32, progress=False)
    other = ExpertUsage(counts={0: usage.counts[0]}, tokens=1, source="x")
    with pytest.raises(BrickworkError, match="measure expert_usage on this model"):
        prune_for_domain_(model, other)
    with pytest.raises(ValueError, match="coverage"):
        prune_for_domain_(model, usage, coverage=0)
    with pytest.raises(ValueError, match="min_experts"):
        prune_for_domain_(model, usage, min_experts=0)
    from brickwork.routing.fitted import FittedRouter

    class Custom(FittedRouter):  # a router that does not say how its parameters split per expert
        kind = "custom"
        param_layout = None

    router = carved_layers(model)[1].router
    router.__class__ = Custom
    with pytest.raises(BrickworkError, match="'custom' router cannot be pruned.*declares none.*fitted"):
        prune_for_domain_(model, usage)
    assert all(b.num_experts == 30 for b in carved_layers(model).values())  # refused before any change
    router.__class__ = FittedRouter
    prune_for_domain_(model, usage)
    with pytest.raises(BrickworkError, match="measure expert_usage on this model"):
        prune_for_domain_(model, usage)  # counts of the unpruned bricks


def test_cli_prune_prints_the_summary_and_saves_a_loadable_model(
    tmp_path, tiny_dir, text_file, domain, capsys
):
    from brickwork.cli.main import main as cli
    from conftest import cli_carved

    carved = cli_carved(tmp_path, tiny_dir, text_file)
    out = tmp_path / "pruned"
    args = f"prune {carved} --data {domain} --tokens 256 --window 64 --coverage 0.5 --eval {text_file} --eval-tokens 128"
    assert cli([*args.split(), "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "layer   0: experts    7 ->" in printed and "FFN parameters" in printed and "fewer" in printed
    assert "unpruned ->" in printed and f"saved to {out}/" in printed
    record = json.loads((out / "prune.json").read_text())
    assert record["eval"] and record["usage"]["tokens"] == 256 and record["coverage"] == 0.5
    assert record["reduction"] > 0 and any(layer["experts_after"] < 7 for layer in record["layers"])
    loaded = bw.load(out)
    assert [b.num_experts for b in carved_layers(loaded).values()] == [
        p["experts_after"] for p in record["layers"]
    ]
    assert (
        cli(f"prune {carved} --data {domain} --tokens 32 --window 64 --out {tmp_path / 'x'} -q".split()) == 2
    )
    assert "less than one --window" in capsys.readouterr().err
    assert cli(f"prune {tiny_dir} --data {domain} --window 64 --out {tmp_path / 'y'} -q".split()) == 2
    assert "not a carved model" in capsys.readouterr().err
    assert cli([*args.split(), "--device", "cuda:99", "--out", str(tmp_path / "z"), "-q"]) == 2
    assert "CUDA device(s)" in capsys.readouterr().err and not (tmp_path / "z").exists()
