"""Weighted combination rules: part of the brick, computed by every path, saved, fitted at carve time."""

from __future__ import annotations

import json

import pytest
import torch

import brickwork as bw
from brickwork.bricks import paths as kernels
from brickwork.bricks.combine import Combine, boundary_ties, fit_combine
from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError
from conftest import carved_tiny

WEIGHTED = ("softmax", "softmax_topk", "sigmoid")


def _brick(text_file, tokenizer, combine="softmax_topk", **overrides):
    options = dict(experts=8, shared=1, active=3, router="fitted", combine=combine) | overrides
    model = carved_tiny(text_file, tokenizer, **options)
    return model, carved_layers(model)


def test_rules_weight_as_the_stock_formats_do():
    scores = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    probs = torch.softmax(scores / 2, -1)
    idx, w = Combine("softmax", temperature=2.0, scale=3.0).route(scores, 2)
    assert idx.tolist() == [[0, 2]]
    torch.testing.assert_close(w, probs[:, [0, 2]] * 3)
    idx, w = Combine("softmax_topk", temperature=2.0).route(scores, 2)
    torch.testing.assert_close(w, probs[:, [0, 2]] / probs[:, [0, 2]].sum())
    # exact ties in the probabilities go to the lower expert, whatever the order torch.topk would give
    idx, _ = Combine("softmax").route(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), 2)
    assert idx.tolist() == [[1, 2]]
    # sigmoid (DeepSeek-V3, GLM-4.5): each expert's own probability, not renormalised
    idx, w = Combine("sigmoid", temperature=2.0, scale=3.0).route(scores, 2)
    assert idx.tolist() == [[0, 2]]
    torch.testing.assert_close(w, torch.sigmoid(scores[:, [0, 2]] / 2) * 3)
    shares = Combine("sigmoid").shares(scores)
    torch.testing.assert_close(shares.sum(-1), torch.ones(1))  # a distribution, for the balance loss
    ties = boundary_ties(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]), 2)
    assert ties.tolist() == [True, False, False]  # a tie at zero (underflow) weighs nothing either way


@pytest.mark.parametrize(
    "record",
    [
        {"rule": "max"},
        {"rule": "softmax", "temperature": 0},
        {"rule": "softmax", "scale": float("nan")},
        {"rule": "sum", "scale": 2.0},
        {"rule": "softmax", "bias": 1},
        "softmax",
    ],
)
def test_bad_rules_are_refused(record):
    with pytest.raises(ValueError):
        Combine.from_dict(record)


@pytest.mark.parametrize("combine", WEIGHTED)
@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_every_kernel_path_weights_as_the_reference(text_file, tokenizer, combine, accumulate):
    if not kernels.HAVE_NUMBA:
        pytest.skip("numba not installed")
    _, bricks = _brick(text_file, tokenizer, combine, accumulate=accumulate)
    brick = bricks[1]
    assert brick.combine.rule == combine and kernels.supports_fast_path(brick)
    x = torch.randn(40, brick.d_model)
    with torch.no_grad():
        reference = brick.forward_reference(x)
        paths = {
            "token": kernels.tokens_forward(brick, x),
            "batch": kernels.batch_forward(brick, x),
        }
        if accumulate == "float32":
            paths["grouped"] = kernels.grouped_forward(brick, x)
    for name, y in paths.items():
        torch.testing.assert_close(y, reference, atol=2e-5, rtol=2e-5, msg=name)


def test_weights_change_the_output_and_reach_the_router_by_gradient(text_file, tokenizer):
    _, bricks = _brick(text_file, tokenizer, "softmax_topk")
    brick = bricks[0]
    x = torch.randn(16, brick.d_model)
    weighted = brick.forward_reference(x)
    rule = brick.combine
    brick.combine = Combine()
    plain = brick.forward_reference(x)
    brick.combine = rule
    assert not torch.allclose(weighted, plain)
    brick.router.weight.requires_grad_(True)
    brick.forward_reference(x).pow(2).sum().backward()
    assert brick.router.weight.grad is not None and brick.router.weight.grad.abs().sum() > 0
    # the unweighted sum passes no gradient to the router
    brick.router.weight.grad = None
    brick.combine = Combine()
    brick.forward_reference(x).pow(2).sum().backward()
    assert brick.router.weight.grad is None or brick.router.weight.grad.abs().sum() == 0


def test_save_load_keeps_the_rule_and_legacy_records_load(tmp_path, text_file, tokenizer):
    import json

    model, bricks = _brick(text_file, tokenizer, "softmax")
    bw.save(model, tmp_path / "m", tokenizer)
    again = bw.load(tmp_path / "m")
    assert {i: b.combine for i, b in carved_layers(again).items()} == {
        i: b.combine for i, b in bricks.items()
    }
    ids = torch.randint(3, 100, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
    # a record from before the rule existed: the export conversion's "stock_routing"
    meta_path = tmp_path / "m" / "brickwork.json"
    meta = json.loads(meta_path.read_text())
    for record in meta["layers"]:
        combine = record.pop("combine")
        record["stock_routing"] = {
            "temperature": combine["temperature"],
            "renormalise": False,
            "scale": combine["scale"],
        }
    meta_path.write_text(json.dumps(meta))
    legacy = bw.load(tmp_path / "m")
    assert {i: b.combine for i, b in carved_layers(legacy).items()} == {
        i: b.combine for i, b in bricks.items()
    }
    meta["layers"][0]["stock_routing"]["renormalise"] = "yes"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BrickworkError, match="renormalise"):
        bw.load(tmp_path / "m")


def test_fit_finds_the_temperature_and_scale_that_reproduce_the_target():
    torch.manual_seed(0)
    n, e, k, d = 200, 6, 2, 5
    scores = torch.randn(n, e) * 3
    outputs = torch.randn(n, k, d)
    truth = Combine("softmax", temperature=4.0, scale=2.5)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    _, weights = truth.route(scores, k)
    assert torch.equal(truth.route(scores, k)[0], order)
    target = (weights[..., None] * outputs).sum(1)
    fitted, info = fit_combine("softmax", scores, outputs, target, k)
    assert fitted.temperature == 4.0 and abs(fitted.scale - 2.5) < 1e-5
    assert info["relative_error"] < 1e-10 < info["sum_relative_error"]
    with pytest.raises(ValueError, match="weighted"):
        fit_combine("sum", scores, outputs, target, k)


def test_carving_with_a_weighted_rule_is_deterministic_and_fits_better_than_no_scale(text_file, tokenizer):
    a, bricks = _brick(text_file, tokenizer, "softmax")
    b, _ = _brick(text_file, tokenizer, "softmax")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert {i: x.combine for i, x in bricks.items()} == {i: x.combine for i, x in carved_layers(b).items()}
    for brick in bricks.values():
        assert brick.combine.rule == "softmax" and brick.combine.temperature > 0
        # powers of two: dividing the router weights by it on export is exact
        assert float(torch.tensor(brick.combine.temperature).log2()).is_integer()


def test_cli_carves_with_a_weighted_rule(tmp_path, tiny_dir, text_file, capsys):
    from brickwork.cli.main import main as cli

    out = tmp_path / "carved"
    args = (
        f"carve {tiny_dir} --calib {text_file} --experts 8 --shared 1 --active 2 --method random "
        f"--calib-tokens 512 --router-samples 256 --window 64 --combine softmax_topk --out {out} -q"
    )
    assert cli(args.split()) == 0
    rules = {b.combine.rule for b in carved_layers(bw.load(out)).values()}
    assert rules == {"softmax_topk"}
    with pytest.raises(SystemExit):  # argparse: an unknown rule is a usage error
        cli([*args.split()[:-3], "--combine", "max", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'max'" in capsys.readouterr().err


def test_sigmoid_fit_recovers_its_rule_and_approaches_the_sum_where_that_is_better():
    torch.manual_seed(0)
    n, e, k, d = 300, 8, 3, 5
    scores = torch.randn(n, e) * 2
    outputs = torch.randn(n, k, d)
    truth = Combine("sigmoid", temperature=2.0, scale=1.5)
    _, weights = truth.route(scores, k)
    target = (weights[..., None] * outputs).sum(1)
    fitted, info = fit_combine("sigmoid", scores, outputs, target, k)
    assert fitted.temperature == 2.0 and abs(fitted.scale - 1.5) < 1e-5 and info["relative_error"] < 1e-10
    # an unweighted target: large temperatures flatten sigmoid weights towards scale / 2 each
    fitted, info = fit_combine("sigmoid", scores, outputs, outputs.sum(1), k)
    assert info["relative_error"] < 1e-3 * info["sum_relative_error"] + 1e-6 or info["relative_error"] < 1e-4
    assert info["fragile"] <= 1e-2 and 1.9 < fitted.scale < 2.1


def test_sigmoid_fit_counts_saturated_probabilities_as_fragile():
    """Large logits saturate sigmoid in float32 (1.0 for logits above about 17): experts whose logits differ then
    tie exactly, and engines may break the tie differently. The fit must not choose such small temperatures."""
    torch.manual_seed(0)
    n, e, k, d = 400, 6, 2, 4
    scores = torch.randn(n, e) * 40 + 60  # mostly above the saturation point at temperature 1
    outputs = torch.randn(n, k, d)
    target = (Combine("sigmoid").route(scores, k)[1][..., None] * outputs).sum(1)
    assert float(boundary_ties(Combine("sigmoid").probabilities(scores), k).double().mean()) > 0.05
    fitted, info = fit_combine("sigmoid", scores, outputs, target, k)
    assert fitted.temperature > 1.0 and info["fragile"] <= 1e-2


def test_fit_avoids_temperatures_where_rounding_could_reorder_experts():
    """Near-uniform weights (a huge temperature) would reproduce an unweighted target best, but they leave the
    k-th and (k+1)-th logits closer than rounding: the fit must not take them."""
    torch.manual_seed(0)
    n, e, k, d = 400, 8, 3, 4
    scores = torch.randn(n, e) * 1e-2
    outputs = torch.randn(n, k, d)
    target = outputs.sum(1)  # what equal weights give
    fitted, info = fit_combine("softmax_topk", scores, outputs, target, k)
    close = Combine("softmax_topk", temperature=2.0**20)
    _, near_equal = close.route(scores, k)
    assert torch.allclose(near_equal, torch.full_like(near_equal, 1 / k), atol=1e-5)  # the tempting choice
    assert info["fragile"] <= 1e-2 and fitted.temperature < 2.0**20
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    same = (fitted.route(scores, k)[0].sort(-1).values == order.sort(-1).values).all(-1)
    assert float(same.double().mean()) >= 0.99  # at most the allowed share of fragile tokens choose otherwise


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_stock_preset_reads_about_what_was_asked_and_exports(tmp_path, text_file, tokenizer, fraction):
    from brickwork.carving.presets import stock_recommended
    from brickwork.io.export import plan_export

    config = stock_recommended(fraction, d_ff=1536)
    assert config.experts == 64 and config.shared == 8 and config.combine == "sigmoid"
    assert abs((config.shared + config.active) / config.experts - fraction) < 1 / 64
    assert stock_recommended(0.5, d_ff=4864).experts == 64  # Qwen2.5-0.5B: 76 neurons per expert
    assert stock_recommended(0.5, d_ff=1000).experts in (50, 40)  # no 64: the nearest divisor in ratio
    tiny_config = stock_recommended(
        fraction, d_ff=64, method="random", calib_tokens=512, router_samples=256, window=64
    )
    model = carved_tiny(
        text_file,
        tokenizer,
        **{
            k: getattr(tiny_config, k)
            for k in ("experts", "shared", "active", "router", "router_options", "combine")
        },
    )
    for format in ("glm4_moe", "gguf"):
        plan_export(model, format)  # stock-exportable: no refusal


def test_cli_stock_needs_a_budget_and_chooses_active(tmp_path, tiny_dir, text_file, capsys):
    from brickwork.cli.main import main as cli

    base = f"carve {tiny_dir} --calib {text_file} --calib-tokens 512 --router-samples 256 --window 64 -q"
    assert cli([*base.split(), "--stock", "--out", str(tmp_path / "a")]) == 2
    assert "give --reads" in capsys.readouterr().err
    assert (
        cli(
            [
                *base.split(),
                "--stock",
                "--active-fraction",
                "0.5",
                "--active",
                "2",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert (
        cli(
            [
                *base.split(),
                "--stock",
                "--active-fraction",
                "0.5",
                "--method",
                "random",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    assert "combine sigmoid" in capsys.readouterr().out
    bricks = carved_layers(bw.load(tmp_path / "c"))
    assert {b.combine.rule for b in bricks.values()} == {"sigmoid"}
    # export without --format: the carve's own stock format (glm4_moe), or GGUF for a .gguf output
    assert (
        cli(
            [
                "export",
                str(tmp_path / "c"),
                "--out",
                str(tmp_path / "e"),
                "--data",
                str(text_file),
                "--tokens",
                "128",
                "--window",
                "64",
                "-q",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "e" / "config.json").read_text())["model_type"] == "glm4_moe"
    assert cli(["export", str(tmp_path / "c"), "--out", str(tmp_path / "e.gguf"), "--no-validate", "-q"]) == 0
    from brickwork.io.gguf import gguf_architecture

    assert gguf_architecture(tmp_path / "e.gguf") == "glm4moe"
