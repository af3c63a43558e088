"""The shared battery: every construction method x router, on tiny models of every supported architecture."""

from __future__ import annotations

import hashlib

import pytest
import torch

import brickwork as bw
from brickwork.bricks import carved_layers
from brickwork.carving import calibrate
from brickwork.errors import BrickworkError
from brickwork.grouping import GROUPING_METHODS
from brickwork.models.tiny import TINY_FFN, TINY_MODEL_TYPES
from brickwork.routing import ROUTERS
from conftest import synthetic_text, tiny

METHODS = sorted(GROUPING_METHODS)
ROUTER_KINDS = sorted(ROUTERS)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(synthetic_text(3000, seed=3))
    return path


def small(**kwargs) -> bw.CarveConfig:
    defaults = dict(experts=8, shared=1, active=2, calib_tokens=256, window=32, router_samples=128)
    return bw.CarveConfig(**{**defaults, **kwargs})


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def calibrations(calib_file, tokenizer):
    """One calibration per architecture, shared by every method x router (as the benchmark does)."""
    return {t: calibrate(tiny(t), tokenizer, calib_file, small(), progress=False) for t in TINY_MODEL_TYPES}


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_all_active_equals_dense_and_uncarve_restores(model_type, method, router, calibrations):
    model = tiny(model_type)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    dense = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = bw.carve_(
        model, small(method=method, router=router, active=7), calibration=calibrations[model_type]
    )
    assert len(carved_layers(model)) == 2 and report.layers == [0, 1]
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-5, atol=1e-5)
    bw.uncarve_(model)
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], state[k]) for k in state), (
        "uncarve_ must restore the weights bit for bit"
    )
    assert torch.equal(logits(model, ids), dense)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_sparse_carve_runs_and_selects_the_configured_experts(model_type, method, router, calibrations):
    model = tiny(model_type)
    from brickwork.bricks.capture import SelectionCapture

    bw.carve_(model, small(method=method, router=router), calibration=calibrations[model_type])
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = logits(model, ids)  # the capture routes beside the forward: the forward's path is unchanged
    with SelectionCapture(model) as capture:
        out = logits(model, ids)
    assert torch.equal(out, reference) and torch.isfinite(out).all()
    assert not any(b._forward_pre_hooks for b in carved_layers(model).values()), "the capture left its hooks"
    for index, brick in carved_layers(model).items():
        selection = capture.selections[index]
        assert selection.shape == (24, 2)
        assert (selection.sort(1).values[:, 1:] != selection.sort(1).values[:, :-1]).all(), (
            "an expert chosen twice"
        )
        groups = brick.grouping
        assert len(groups.shared) == TINY_FFN // 8 and groups.experts.shape == (7, TINY_FFN // 8)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "bert", "phi3", "gemma3_text"])
@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_save_load_round_trip(tmp_path, model_type, router, calibrations, tokenizer):
    model = tiny(model_type)
    bw.carve_(model, small(method="activation", router=router), calibration=calibrations[model_type])
    ids = torch.randint(3, 100, (2, 12))
    before = logits(model, ids)
    bw.save(model, tmp_path / "carved", tokenizer)
    loaded = bw.load(tmp_path / "carved")
    assert torch.equal(logits(loaded, ids), before)
    assert (tmp_path / "carved" / "README.md").read_text().startswith("# Carved with brickwork")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_accumulation_is_resolved_saved_and_loaded(tmp_path, calibrations, tokenizer):
    assert bw.CarveConfig(experts=16, shared=2, active=2).resolved_accumulate() == "float32"
    assert bw.CarveConfig(experts=1536, shared=0, active=300).resolved_accumulate() == "float64"
    assert bw.CarveConfig(experts=16, active=2, accumulate="float64").resolved_accumulate() == "float64"
    with pytest.raises(ValueError, match="accumulate must be auto, float32 or float64"):
        bw.CarveConfig(accumulate="float16")
    model = tiny("llama")
    bw.carve_(model, small(accumulate="float64"), calibration=calibrations["llama"])
    assert {b.accumulate for b in carved_layers(model).values()} == {"float64"}
    ids = torch.randint(3, 100, (2, 12))
    before = logits(model, ids)
    bw.save(model, tmp_path / "carved", tokenizer)
    loaded = bw.load(tmp_path / "carved")
    assert {b.accumulate for b in carved_layers(loaded).values()} == {"float64"}
    assert torch.equal(logits(loaded, ids), before)


def test_generate_works_on_a_carved_model(calibrations):
    model = tiny("qwen2")
    bw.carve_(model, small(router="lowrank"), calibration=calibrations["qwen2"])
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def _digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_bytes(method, calib_file, tokenizer):
    digests = []
    for seed in (0, 0, 1):
        model = tiny("llama")
        bw.carve_(
            model,
            small(method=method, router="fitted", seed=seed),
            calib=calib_file,
            tokenizer=tokenizer,
            progress=False,
        )
        digests.append(_digest(model))
    assert digests[0] == digests[1]
    if method != "random":  # random depends on the seed alone; the others may converge to the same grouping
        return
    assert digests[0] != digests[2]


def test_reads_count_router_and_experts(calibrations):
    model = tiny("llama")
    report = bw.carve_(model, small(router="fitted"), calibration=calibrations["llama"])
    brick = carved_layers(model)[0]
    d, f = 32, TINY_FFN
    expected = ((1 + 2) * (f // 8) * 3 * d + 7 * d + 7) / (3 * d * f)  # shared + 2 experts, router W and bias
    assert brick.read_fraction() == pytest.approx(expected)
    assert report.reads == pytest.approx(expected)


def test_configs_refuse_what_cannot_be_built(calib_file, tokenizer):
    with pytest.raises(ValueError, match=r"active must be in \[1, experts - shared\] = \[1, 14\]"):
        bw.CarveConfig(experts=16, shared=2, active=15)
    with pytest.raises(ValueError, match="shared must be in"):
        bw.CarveConfig(experts=4, shared=4, active=1)
    with pytest.raises(ValueError, match="neuron_share must be in"):
        bw.CarveConfig(neuron_share=1.5)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        bw.CarveConfig(method="nope")
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        bw.CarveConfig(router="nope")
    assert bw.CarveConfig(experts=16, shared=2, neuron_share=0.25).active == 2
    # the older name of neuron_share still reads, as a keyword and in a saved record, and means the same
    old = bw.CarveConfig(experts=16, shared=2, active_fraction=0.25)
    assert old == bw.CarveConfig(experts=16, shared=2, neuron_share=0.25)
    record = old.to_dict()
    assert record["version"] == 2 and record["neuron_share"] == 0.25
    record["active_fraction"] = record.pop("neuron_share")
    assert bw.CarveConfig.from_dict(record) == old
    plain = bw.CarveConfig(experts=16, shared=2, active=2).to_dict()  # what older brickwork reads
    assert plain["version"] == 1 and "neuron_share" not in plain
    assert bw.CarveConfig.from_dict(plain | {"active_fraction": None}) == bw.CarveConfig.from_dict(plain)
    with pytest.raises(ValueError, match="not both"):
        bw.CarveConfig(neuron_share=0.25, active_fraction=0.5)
    model = tiny("llama")
    with pytest.raises(ValueError, match="not divisible by experts = 7"):
        bw.carve_(model, small(experts=7, shared=1), calib=calib_file, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match=r"layers must be in \[0, 1\]"):
        bw.carve_(model, small(layers=[5]), calib=calib_file, tokenizer=tokenizer, progress=False)
    with pytest.raises(BrickworkError, match="needs calibration text"):
        bw.carve_(model, small())
    bw.carve_(model, small(layers=[1]), calib=calib_file, tokenizer=tokenizer, progress=False)
    assert list(carved_layers(model)) == [1]
    with pytest.raises(BrickworkError, match="already carved"):
        bw.carve_(model, small(), calib=calib_file, tokenizer=tokenizer, progress=False)


def test_damaged_saves_give_clear_errors(tmp_path, calibrations, tokenizer):
    model = tiny("llama")
    bw.carve_(model, small(), calibration=calibrations["llama"])
    path = bw.save(model, tmp_path / "carved")
    with pytest.raises(BrickworkError, match="not a carved brickwork model"):
        bw.load(tmp_path)
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(BrickworkError, match="damaged or does not match"):
        bw.load(path)
    path = bw.save(model, tmp_path / "carved2")
    meta = (path / "brickwork.json").read_text()
    (path / "brickwork.json").write_text(meta.replace('"num_experts": 7', '"num_experts": 6'))
    with pytest.raises(BrickworkError, match="is not d_ff"):  # refused before any weight is read
        bw.load(path)
    (path / "brickwork.json").write_text("{broken")
    with pytest.raises(BrickworkError, match="is damaged"):
        bw.load(path)
    with pytest.raises(BrickworkError, match="takes a model carved"):
        bw.save(tiny("llama"), tmp_path / "dense")


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_recommended_config_reads_what_was_asked(fraction, model_type, calib_file, tokenizer):
    from brickwork.carving.presets import recommended

    model = tiny(model_type)
    first = bw.find_ffns(model)[0]
    config = recommended(
        fraction,
        d_ff=first.d_ff,
        d_model=32,
        gated=first.is_gated,
        calib_tokens=256,
        window=32,
        router_samples=128,
    )
    assert (
        config.experts == TINY_FFN
        and config.router == "partial"
        and config.down_fraction < config.planned_fraction
    )
    report = bw.carve_(model, config, calib=calib_file, tokenizer=tokenizer, progress=False)
    assert fraction - 3 / TINY_FFN <= report.reads <= fraction  # rounded down to whole neurons
    assert recommended(0.5, d_ff=64, d_model=32, router="fitted").router_options == {}
    # The SmolLM2 shapes give the configurations measured best (bench/results/carving-quality).
    best = recommended(0.5, d_ff=1536, d_model=576)
    assert (best.active, best.router_options, round(best.down_fraction * 1536)) == (
        576,
        {"input_fraction": 0.375},
        430,
    )


def test_partial_router_scores_from_the_largest_inputs_only():
    from brickwork.routing.partial import PartialInputRouter

    router = PartialInputRouter(input_fraction=0.25)
    x = torch.tensor([[0.1, -5.0, 0.2, 3.0, 0.0, 1.0, -0.3, 0.05]])
    assert torch.equal(router.sparse_inputs(x), torch.tensor([[0.0, -5.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="input_fraction must be in"):
        PartialInputRouter(0)


def test_down_fraction_reads_only_the_largest_activations(tmp_path, calibrations, tokenizer):
    model = tiny("llama")
    config = small(
        router="fitted", active=3, down_fraction=0.25
    )  # computes 4 of 8 slices, reads 16 down rows
    report = bw.carve_(model, config, calibration=calibrations["llama"])
    brick = carved_layers(model)[0]
    assert brick.down_keep == TINY_FFN // 4
    d, f = 32, TINY_FFN
    expected = ((1 + 3) * (f // 8) * 2 * d + (f // 4) * d + 7 * d + 7) / (3 * d * f)
    assert brick.read_fraction() == pytest.approx(expected) and report.reads == pytest.approx(expected)

    # The brick's output equals down applied to h with all but the 16 largest computed |h| zeroed.
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(4))
    selection = brick.select(x)
    h = brick.hidden(x, 0, brick.d_ff)
    computed = torch.zeros(5, brick.num_experts, dtype=torch.bool).scatter_(1, selection, True)
    keep_mask = torch.cat(
        [
            torch.ones(5, brick.num_shared, dtype=torch.bool),
            computed.repeat_interleave(brick.expert_size, dim=1),
        ],
        dim=1,
    )
    h = torch.where(keep_mask, h, torch.zeros_like(h))
    top = h.abs().topk(f // 4, dim=1).indices
    h = torch.zeros_like(h).scatter_(1, top, h.gather(1, top))
    with torch.no_grad():
        torch.testing.assert_close(brick(x), h @ brick.down_t, rtol=1e-5, atol=1e-6)

    ids = torch.randint(3, 100, (2, 12))
    before = logits(model, ids)
    bw.save(model, tmp_path / "carved", tokenizer)
    assert torch.equal(logits(bw.load(tmp_path / "carved"), ids), before)
    with pytest.raises(ValueError, match="down_fraction must be in"):
        small(active=3, down_fraction=0.9)


def test_routers_that_need_no_samples_calibrate_without_them(calib_file, tokenizer):
    model = tiny("llama")
    calibration = calibrate(model, tokenizer, calib_file, small(), progress=False, samples=False)
    assert calibration.sampler is None
    with pytest.raises(BrickworkError, match="calibrate with samples=True"):
        bw.carve_(model, small(router="fitted"), calibration=calibration)
    assert not carved_layers(model), "a failed carve must leave the model untouched"
    bw.carve_(model, small(router="partial"), calibration=calibration)
    assert len(carved_layers(model)) == 2
