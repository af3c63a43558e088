"""The CLI's options are generated from the library: defaults and help come from the configs and API functions."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from brickwork.cli.main import build_parser
from brickwork.cli.options import add_options, config_settings, default_of, function_settings, given


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def _command(*names: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def test_options_that_keep_a_default_hold_the_library_default():
    from brickwork.evaluation.perplexity import evaluate
    from brickwork.io.export import export
    from brickwork.ops.prune import prune_for_domain_
    from brickwork.ops.usage import expert_usage

    args = _parse("eval")
    assert (args.window, args.batch_size, args.max_tokens) == tuple(
        default_of(evaluate, n) for n in ("window", "batch_size", "max_tokens")
    )
    args = _parse("export", "carved", "--out", "x")
    assert (args.data, args.tokens, args.window, args.dtype, args.stock_routing) == tuple(
        default_of(export, n)
        for n in ("validate_data", "validate_tokens", "window", "dtype", "stock_routing")
    )
    args = _parse("prune", "carved", "--data", "wiki", "--out", "x")
    assert (args.tokens, args.window) == (
        default_of(expert_usage, "tokens"),
        default_of(expert_usage, "window"),
    )
    assert (args.coverage, args.min_experts) == (default_of(prune_for_domain_, "coverage"), None)


def test_config_options_are_absent_unless_given_and_show_the_config_help():
    from brickwork.carving.config import CarveConfig
    from brickwork.profiling.profile import ProfileConfig

    assert given(_parse("carve"), CarveConfig) == {}
    assert given(_parse("carve", "--layers", "0", "2", "--experts", "8"), CarveConfig) == {
        "layers": [0, 2],
        "experts": 8,
    }
    helps = {a.dest: a.help for a in _command("carve")._actions}
    for name, setting in config_settings(CarveConfig).items():
        if name in helps:
            assert setting.help in helps[name] or name in ("router_options",), name
    assert given(_parse("profile", "--no-coactivation"), ProfileConfig) == {"coactivation": False}
    assert given(_parse("profile"), ProfileConfig) == {}


def test_tuple_fields_are_given_as_tuples():
    from brickwork.benchmarks.quality import QualityBenchConfig

    options = given(_parse("bench", "quality", "--fractions", "0.5", "--no-neuron-level"), QualityBenchConfig)
    assert options == {"fractions": (0.5,), "neuron_level": False}


@dataclass
class _Example:
    mode: Literal["fast", "exact"] = field(default="fast", metadata={"help": "how to run"})
    sizes: tuple[int, ...] = field(default=(1, 2), metadata={"help": "sizes", "default_text": "1 2"})
    check: bool = field(default=True, metadata={"help": "check the result"})
    limit: int | None = field(default=None, metadata={"help": "at most this many", "default_text": "none"})
    internal: int = 3  # no help: never an option


def test_add_options_types_options_from_annotations():
    parser = argparse.ArgumentParser()
    settings = config_settings(_Example)
    assert set(settings) == {"mode", "sizes", "check", "limit"}
    add_options(parser, settings, "mode", "sizes", "check", "limit", keep_default=True)
    args = parser.parse_args([])
    assert (args.mode, args.sizes, args.check, args.limit) == ("fast", (1, 2), True, None)
    args = parser.parse_args(["--mode", "exact", "--sizes", "4", "8", "--no-check", "--limit", "5"])
    assert (args.mode, args.sizes, args.check, args.limit) == ("exact", [4, 8], False, 5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "slow"])
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["sizes"] == "sizes (default 1 2)" and helps["check"] == "do not check the result"


def test_add_options_refuses_overrides_of_settings_it_does_not_add():
    with pytest.raises(TypeError, match="overrides for settings not added"):
        add_options(argparse.ArgumentParser(), config_settings(_Example), "mode", limit={"type": int})


def test_function_settings_refuse_help_for_a_parameter_the_function_lacks():
    def f(a: int = 1):
        return a

    assert function_settings(f, {"a": "the a"})["a"].default == 1
    with pytest.raises(TypeError, match="no parameter 'b'"):
        function_settings(f, {"b": "the b"})
