"""BrickSpec: one frozen, versioned description of a brick that the module, saving and loading read."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import brickwork as bw
from brickwork.bricks.combine import Combine
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.spec import SPEC_VERSION, BrickSpec
from brickwork.bricks.state import carved_layers
from brickwork.routing import ROUTERS
from conftest import carved_tiny

# The per-layer keys brickwork.json held, in order, before the spec (brickwork at commit 5035203).
PRE_SPEC_KEYS = [
    "layer",
    "d_model",
    "d_ff",
    "num_shared",
    "num_experts",
    "expert_size",
    "active",
    "gated",
    "up_bias",
    "gate_bias",
    "down_bias",
    "router",
    "router_config",
    "down_keep",
    "accumulate",
    "combine",
    "active_fraction",  # what files before the spec wrote for the layer's reads
]


def _spec(**overrides) -> BrickSpec:
    options = dict(d_model=8, num_shared=4, num_experts=6, expert_size=2, active=2, router="fitted")
    return BrickSpec(**(options | overrides))


def test_a_spec_round_trips_and_is_frozen():
    spec = _spec(
        router="partial",
        router_config={"input_fraction": 0.5},
        down_keep=5,
        accumulate="float64",
        combine=Combine("softmax", temperature=2.0, scale=3.0),
    )
    record = spec.to_dict()
    assert record["spec_version"] == 1 and record["d_ff"] == 16 == spec.d_ff  # what a version-1 reader reads
    assert BrickSpec.from_dict(json.loads(json.dumps(record))) == spec
    fits = (
        (1, Combine("softmax", temperature=4.0, scale=2.0)),
        (4, Combine("softmax", temperature=1.0, scale=1.5)),
    )
    fitted = dataclasses.replace(spec, combine_fits=fits)
    record = fitted.to_dict()
    assert record["spec_version"] == SPEC_VERSION == 2 and record["combine_fits"][1]["active"] == 4
    assert BrickSpec.from_dict(json.loads(json.dumps(record))) == fitted
    assert fitted.fitted_combine(4) == fits[1][1] and fitted.fitted_combine(2) is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.active = 3
    config = {"rank": 4}
    held = _spec(router="lowrank", router_config=config)
    config["rank"] = 8  # the spec holds its own copy
    assert held.router_config == {"rank": 4}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"active": 7}, "active 7 is not in"),
        ({"active": 0}, "active 0 is not in"),
        ({"num_experts": 0}, "num_experts >= 1"),
        ({"gated": 1}, "gated must be true or false"),
        ({"accumulate": "float16"}, "accumulate must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"down_keep": 0}, "down_keep 0"),
        ({"version": SPEC_VERSION + 1}, "newer than this brickwork"),
        ({"router_config": [1]}, "router_config must be a dict"),
        ({"combine_fits": ((2, Combine("softmax")),)}, "weighted rule"),  # the carve's own rule is sum
        ({"combine": Combine("sigmoid"), "combine_fits": ((7, Combine("sigmoid")),)}, "k must be in"),
        ({"combine": Combine("sigmoid"), "combine_fits": ((2, Combine("softmax")),)}, "weighted rule"),
        (
            {
                "combine": Combine("sigmoid"),
                "combine_fits": ((3, Combine("sigmoid")), (2, Combine("sigmoid"))),
            },
            "increasing k",
        ),
        ({"combine_fits": [(2, Combine())]}, "must be a tuple"),
    ],
)
def test_invalid_specs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        _spec(**overrides)


def test_from_dict_checks_d_ff_and_fields_and_fills_what_old_records_lack():
    record = _spec().to_dict()
    with pytest.raises(ValueError, match="is not d_ff = 17"):
        BrickSpec.from_dict(record | {"d_ff": 17})
    with pytest.raises(ValueError, match="unknown brick spec field"):
        BrickSpec.from_dict(record | {"colour": "red"})
    for key in ("down_keep", "accumulate", "combine", "dtype", "spec_version"):
        del record[key]
    old = BrickSpec.from_dict(record)
    assert (old.down_keep, old.accumulate, old.combine, old.dtype, old.version) == (
        None,
        "float32",
        Combine(),
        "float32",
        1,
    )
    # a cap at or above the computed neurons (4 shared + 2 x 2) is no cap
    assert _spec(down_keep=8).down_keep is None and _spec(down_keep=7).down_keep == 7


def test_a_brick_is_built_from_its_spec_and_reads_it():
    spec = _spec(router="centroid", down_keep=6, combine=Combine("softmax_topk"))
    router = ROUTERS["centroid"].empty(6, 8, 16, True)
    brick = BrickFFN.from_spec(spec, torch.nn.SiLU(), router)
    assert brick.spec is spec
    shapes = (brick.d_model, brick.d_ff, brick.num_shared, brick.num_experts, brick.expert_size)
    assert shapes == (8, 16, 4, 6, 2)
    assert (brick.active, brick.down_keep, brick.combine.rule) == (2, 6, "softmax_topk")
    assert brick.up.shape == (16, 8) and brick.gate is not None and brick.up_bias is None
    brick.accumulate = "float64"  # a new spec, not an edit of the old one
    assert brick.spec is not spec and spec.accumulate == "float32" and brick.spec.accumulate == "float64"
    with pytest.raises(ValueError, match="router"):
        BrickFFN.from_spec(spec, torch.nn.SiLU(), ROUTERS["oracle"].empty(6, 8, 16, True))


def test_carved_bricks_carry_their_spec_and_saving_writes_it(tmp_path, text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=3, router="partial")
    bw.save(model, tmp_path / "m", tokenizer)
    meta = json.loads((tmp_path / "m" / "brickwork.json").read_text())
    bricks = carved_layers(model)
    for record in meta["layers"]:
        spec = bricks[record["layer"]].spec
        assert spec.router == "partial" and spec.router_config == {"input_fraction": 0.25}
        # the saved record is the spec's own, less the layer and its reads
        assert {k: v for k, v in record.items() if k not in ("layer", "reads")} == spec.to_dict()
    again = carved_layers(bw.load(tmp_path / "m"))
    assert {i: b.spec for i, b in again.items()} == {i: b.spec for i, b in bricks.items()}


@pytest.mark.parametrize("era", ["pre-spec", "pre-accumulate"])
def test_files_written_before_the_spec_still_load(tmp_path, text_file, tokenizer, era):
    """brickwork.json as the code before BrickSpec wrote it (and, older still, without down_keep, accumulate and
    combine): the same model, the same outputs, bit for bit."""
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2, accumulate="float32")
    bw.save(model, tmp_path / "m", tokenizer)
    path = tmp_path / "m" / "brickwork.json"
    meta = json.loads(path.read_text())
    keys = PRE_SPEC_KEYS
    if era == "pre-accumulate":
        keys = [k for k in keys if k not in ("down_keep", "accumulate", "combine")]
    for record in meta["layers"]:  # the layer's reads, under the name of those files
        record["active_fraction"] = record.pop("reads")
    meta["layers"] = [{k: record[k] for k in keys} for record in meta["layers"]]
    path.write_text(json.dumps(meta, indent=2))
    again = bw.load(tmp_path / "m")
    assert {i: b.spec for i, b in carved_layers(again).items()} == {
        i: b.spec for i, b in carved_layers(model).items()
    }
    ids = torch.randint(3, 100, (2, 24))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_record_that_is_not_an_object_is_refused_clearly(tmp_path, text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2)
    bw.save(model, tmp_path / "m", tokenizer)
    path = tmp_path / "m" / "brickwork.json"
    meta = json.loads(path.read_text())
    for record in (5, {k: v for k, v in meta["layers"][0].items() if k != "layer"}):
        meta["layers"][0] = record
        path.write_text(json.dumps(meta))
        with pytest.raises(bw.BrickworkError, match="carved layer record"):
            bw.load(tmp_path / "m")
