"""``brickwork bench quality|speed``: the benchmarks (QualityBenchConfig's and SpeedBenchConfig's fields are the
options)."""

from __future__ import annotations

import argparse
from pathlib import Path

from brickwork.cli.options import (
    add_options,
    add_quiet,
    check_model,
    command,
    config_settings,
    data_help,
    given,
    local_inputs,
    model_help,
    positive_int,
)
from brickwork.errors import BrickworkError

RESULTS = Path("bench/results")
OVERWRITE_HELP = "write into --out even when it is a non-empty directory that holds no benchmark results"


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="benchmarks: quality vs FFN weights read; speed against dense"
    )
    add_quiet(bench)
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    _add_quality(bench_sub)
    _add_speed(bench_sub)


def _add_quality(bench_sub) -> None:
    from brickwork.benchmarks.quality import HARNESSES, QualityBenchConfig
    from brickwork.evaluation.baselines import BASELINES
    from brickwork.grouping import GROUPING_METHODS
    from brickwork.routing import ROUTERS

    p = command(
        bench_sub,
        "quality",
        run_quality,
        help="carved configurations and neuron-level baselines: perplexity, KL, agreement and task accuracy "
        "against FFN weights read; writes results.json, results.md and quality.png",
    )
    settings = config_settings(QualityBenchConfig)
    _add_model(p, settings)
    add_options(
        p,
        settings,
        "fractions",
        "methods",
        "routers",
        "experts",
        "shared",
        "neuron_level",
        "stock",
        "baselines",
        "calib",
        "calib_tokens",
        "router_samples",
        "eval",
        "eval_tokens",
        "tasks",
        "task_examples",
        "harness",
        "seed",
        "quick",
        methods={"choices": sorted(GROUPING_METHODS)},
        routers={"choices": sorted(ROUTERS)},
        baselines={"nargs": "*", "choices": BASELINES},
        calib={"text": f"{settings['calib'].help}; {data_help()}"},
        tasks={"nargs": "*", "text": f"{settings['tasks'].help}; none: no downstream tasks"},
        harness={"choices": HARNESSES},
    )
    _add_out(p, RESULTS / "quality")


def _add_speed(bench_sub) -> None:
    from brickwork.benchmarks.speed import SpeedBenchConfig

    p = command(
        bench_sub,
        "speed",
        run_speed,
        help="dense vs carved, interleaved medians: FFN-only and end-to-end decode and prefill",
    )
    settings = config_settings(SpeedBenchConfig)
    _add_model(p, settings)
    add_options(p, settings, "fractions", "repeats", "quick", repeats={"type": positive_int})
    _add_out(p, RESULTS / "speed")


def _add_model(p: argparse.ArgumentParser, settings: dict) -> None:
    """The model argument, absent unless given (the benchmark's config decides)."""
    p.add_argument(
        "model",
        nargs="?",
        default=argparse.SUPPRESS,
        help=f"{model_help()} (default {settings['model'].default})",
    )


def _add_out(p: argparse.ArgumentParser, default: Path) -> None:
    p.add_argument("--out", type=Path, default=default, help=f"output directory (default {default})")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def run_quality(args: argparse.Namespace) -> None:
    from brickwork.benchmarks.quality import QualityBenchConfig, render_table, run_quality_bench, write
    from brickwork.io_utils import check_output_dir

    options = given(args, QualityBenchConfig)
    if "tasks" in options:  # "--tasks" alone or "--tasks none": no downstream tasks
        options["tasks"] = tuple(t for t in options["tasks"] if t.lower() != "none")
    config = QualityBenchConfig(**options)
    check_output_dir(args.out, "bench", args.overwrite, local_inputs(options.get("model")))
    results = run_quality_bench(config, progress=not args.quiet)
    out = write(results, args.out, args.overwrite)
    print(render_table(results))
    print(f"\nwrote {out}/results.json, results.md, quality.png")


def run_speed(args: argparse.Namespace) -> None:
    from brickwork.benchmarks.speed import SpeedBenchConfig, render_table, run_speed_bench, write
    from brickwork.io_utils import check_output_dir

    options = given(args, SpeedBenchConfig)
    if "model" in options:
        check_model(options["model"])
        if (Path(options["model"]) / "brickwork.json").is_file():
            raise BrickworkError(
                f"{options['model']} is a carved model; bench speed takes the dense parent and carves it at each "
                "--fractions itself"
            )
    check_output_dir(args.out, "bench", args.overwrite, local_inputs(options.get("model")))
    results = run_speed_bench(SpeedBenchConfig(**options), progress=not args.quiet)
    write(results, args.out, args.overwrite)
    print(render_table(results))
    print(f"\nwrote {args.out}/results.json, results.md, speed.png")
