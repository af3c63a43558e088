"""CarveConfig.from_string / to_string: one line names a carve; every committed carve string still reads."""

from __future__ import annotations

import pytest

from brickwork.carving.config import CarveConfig
from brickwork.carving.presets import recommended, stock_recommended

ROUND_TRIP = [
    CarveConfig(),
    CarveConfig(
        experts=16,
        shared=2,
        active=2,
        router="fitted",
        router_options={"intercept": False},
        combine="sigmoid",
    ),
    CarveConfig(experts=64, shared=8, neuron_share=0.5, combine="softmax", combine_budgets=(0.25, 0.5)),
    CarveConfig(
        experts=1536,
        shared=0,
        active=330,
        router="partial",
        router_options={"input_fraction": 0.125},
        down_fraction=0.12,
        accumulate="float64",
    ),  # fmt: skip
    CarveConfig(
        experts=1536, shared=0, active=306, router="lowrank", router_options={"rank": 32}, layers=[0, 3]
    ),
    CarveConfig(
        router="fitted",
        router_options={"target": "output"},
        seed=3,
        calib_tokens=4096,
        window=256,
        router_samples=512,
        layer_budgets="sensitivity",
        layer_step=0.125,
    ),  # fmt: skip
    recommended(0.25, d_ff=1536, d_model=576),
    stock_recommended(0.5, d_ff=1536),
]


@pytest.mark.parametrize("config", ROUND_TRIP, ids=lambda c: c.to_string())
def test_to_string_round_trips(config):
    text = config.to_string()
    assert CarveConfig.from_string(text) == config
    assert CarveConfig.from_string(text).to_string() == text


def test_values_are_typed_from_the_fields():
    c = CarveConfig.from_string(
        "experts=16,shared=2,active=2,method=weight_kmeans,router=fitted,router.intercept=false,"
        "down_fraction=0.2,layers=0/1,combine=sigmoid,combine_budgets=0.5/0.25"
    )
    assert (c.experts, c.shared, c.active, c.method, c.down_fraction) == (16, 2, 2, "weight_kmeans", 0.2)
    assert (
        c.router_options == {"intercept": False} and c.layers == [0, 1] and c.combine_budgets == (0.25, 0.5)
    )
    assert CarveConfig.from_string("experts=16,shared=2,down_fraction=none").down_fraction is None
    assert CarveConfig.from_string("router=lowrank,router.rank=8").router_options == {"rank": 8}


def test_presets_are_the_preset_functions_with_overrides():
    assert CarveConfig.from_string("preset=neuron@0.25", d_ff=1536, d_model=576) == recommended(
        0.25, d_ff=1536, d_model=576
    )
    assert CarveConfig.from_string("preset=stock@0.5,combine=softmax", d_ff=1536) == stock_recommended(
        0.5, d_ff=1536, combine="softmax"
    )
    ungated = CarveConfig.from_string("preset=neuron@0.5", d_ff=1536, d_model=576, gated=False)
    assert ungated == recommended(0.5, d_ff=1536, d_model=576, gated=False)


@pytest.mark.parametrize(
    "text, says",
    [
        ("expert=16", "known keys: experts, shared, active"),
        ("experts=many", "takes int values"),
        ("experts", "is not key=value"),
        ("", "known keys"),
        ("experts=16,experts=8", "twice"),
        ("router.intercept=maybe", "true or false"),
        ("router=centroid,router.rank=4", "takes no option 'rank'"),
        ("preset=neuron@0.25", "give from_string its d_ff and d_model"),
        ("preset=huge@0.25", "preset must be NAME@FRACTION"),
        ("router_options=x", "unknown carve string key"),
        ("experts=16,shared=16", "shared must be in"),
    ],
)
def test_bad_strings_are_refused_with_what_to_write(text, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        CarveConfig.from_string(text)


def test_the_earlier_bare_router_option_names_still_read():
    """bench/carving_quality.py's --config wrote router options bare (rank=, input_fraction=, target=, intercept=)."""
    old = CarveConfig.from_string(
        "experts=64,shared=8,active=24,router=fitted,intercept=false,combine=softmax"
    )
    assert old.router_options == {"intercept": False}
    assert CarveConfig.from_string("experts=1536,shared=0,active=300,router=partial,input_fraction=0.25") == (
        CarveConfig(
            experts=1536, shared=0, active=300, router="partial", router_options={"input_fraction": 0.25}
        )
    )

    # neuron_share's older name, as bench/budget_curve.py's strings wrote it
    assert CarveConfig.from_string("experts=16,shared=2,active_fraction=0.5") == CarveConfig(
        experts=16, shared=2, neuron_share=0.5
    )
    assert CarveConfig.from_string("experts=16,shared=2,active_fraction=0.5").to_string() == (
        "experts=16,shared=2,active=6,neuron_share=0.5"
    )


# Carve strings as the committed benchmarks' READMEs give them (bench/results/combine-smollm2, llama-cpp-smollm2).
COMMITTED = [
    "experts=64,shared=8,active=24,router=fitted,intercept=false,combine=softmax_topk",
    "experts=192,shared=24,active=72,router=fitted,intercept=false,combine=sum",
    "experts=256,shared=32,active=92,method=activation,router=fitted",
    "experts=16,shared=2,active=6,router=fitted,intercept=false,combine=sigmoid",
]


@pytest.mark.parametrize("text", COMMITTED)
def test_committed_carve_strings_read_and_rewrite_in_the_one_syntax(text):
    config = CarveConfig.from_string(text)
    assert CarveConfig.from_string(config.to_string()) == config
    if "intercept" in text:
        assert "router.intercept=false" in config.to_string()
