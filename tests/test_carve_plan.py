"""plan_carve then execute_plan: an inspectable plan made without touching the model, applied by carve_."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import brickwork as bw
from brickwork.bricks import carved_layers
from brickwork.carving import calibrate, execute_plan, plan_carve
from brickwork.errors import BrickworkError
from conftest import tiny


def _config(**overrides) -> bw.CarveConfig:
    options = dict(experts=8, shared=1, active=2, method="activation", router="fitted")
    return bw.CarveConfig(**(options | dict(calib_tokens=512, router_samples=256, window=64) | overrides))


@pytest.mark.parametrize("combine", ["sum", "softmax_topk"])
def test_planning_changes_nothing_and_executing_the_plan_is_carve_(text_file, tokenizer, combine):
    config = _config(combine=combine)
    model = tiny("llama").eval()
    calibration = calibrate(model, tokenizer, str(text_file), config, progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_carve(model, config, calibration=calibration, progress=False)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(v, after[k]) for k, v in state.items())
    assert not carved_layers(model) and not hasattr(model, "brickwork")

    summary = str(plan)
    for layer in plan.layers:
        assert f"layer {layer.index}:" in summary
        spec = layer.spec
        assert (spec.router, spec.num_experts, spec.active, spec.combine.rule) == ("fitted", 7, 2, combine)
        assert torch.equal(layer.grouping.neuron_order.sort().values, torch.arange(spec.d_ff))
        assert (layer.combine_fit is None) == (combine == "sum")

    report = execute_plan(model, plan)
    reference = tiny("llama").eval()
    expected = bw.carve_(reference, config, calibration=calibration, progress=False)
    assert dataclasses.replace(report, seconds=0.0) == dataclasses.replace(expected, seconds=0.0)
    assert model.brickwork.record() == reference.brickwork.record()
    carved, wanted = model.state_dict(), reference.state_dict()
    assert carved.keys() == wanted.keys() and all(torch.equal(v, wanted[k]) for k, v in carved.items())
    assert {i: b.spec for i, b in carved_layers(model).items()} == {
        layer.index: layer.spec for layer in plan.layers
    }
    ids = torch.randint(3, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    with pytest.raises(BrickworkError, match="already carved"):
        execute_plan(model, plan)


def test_a_plan_belongs_to_its_model(text_file, tokenizer):
    config = _config()
    model = tiny("llama").eval()
    plan = plan_carve(model, config, calib=str(text_file), tokenizer=tokenizer, progress=False)
    with pytest.raises(BrickworkError, match="another model"):
        execute_plan(tiny("llama").eval(), plan)
