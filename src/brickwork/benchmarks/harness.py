"""The bench scripts' one loop: common options, results.json, results.md and plots, and --replot.

A script in ``bench/`` declares what it renders and plots once, and runs its rows between :meth:`Bench.start` and
:meth:`Bench.write`::

    BENCH = Bench("token_budget", render, plots={"token-budget.png": plot})

    def main():
        parser = BENCH.parser(__doc__, out="bench/results/token-budget-smollm2", quick=True)
        add_model_arguments(parser)
        args = parser.parse_args()
        if args.replot is not None:
            return BENCH.replot(args.out, args.replot)
        results = BENCH.start(args)  # the machine (CPU flags, commit) and the settings, before any row runs
        for ...:
            results["rows"].append(row)
            BENCH.write(args.out, results, plots=False)  # after every row: a run cut off keeps its rows
        BENCH.write(args.out, results)

``--replot`` renders ``results.md`` and the plots again from ``--out``'s ``results.json`` without running a model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from brickwork.benchmarks.common import machine_info, write_results

__all__ = [
    "Bench",
    "add_allocation_arguments",
    "add_model_arguments",
    "import_package",
    "load_bench_model",
    "machine_info",
    "settings_of",
    "write_results",
]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, calibration and held-out options the quality benchmarks share."""
    parser.add_argument("--model", default="smollm2-135m", help="alias, model directory or .gguf file")
    parser.add_argument("--calib", default="wiki", help="calibration text")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--router-samples", type=int, default=8192)
    parser.add_argument("--eval", nargs="+", default=["botchan", "lee-news"], help="held-out corpora")


def add_allocation_arguments(parser: argparse.ArgumentParser, step: float) -> None:
    """``--layer-step`` (default ``step``) and ``--layer-rounds``: the options of ``bw.allocate_budgets`` the budget
    benchmarks pass on."""
    parser.add_argument("--layer-step", type=float, default=step, help="allocate_budgets' step")
    parser.add_argument(
        "--layer-rounds",
        type=int,
        default=1,
        help="allocate_budgets' rounds (a layer moves one step per round)",
    )


def settings_of(args: argparse.Namespace) -> dict:
    """The parsed options as JSON values (paths as strings)."""

    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {key: plain(value) for key, value in vars(args).items()}


def load_bench_model(name: str, progress: bool = False):
    """``(model, tokenizer)``: ``tiny-<type>`` is a tiny random model (the scripts' --quick), else ``bw.load_model``."""
    if name.startswith("tiny-"):
        from brickwork.models.tiny import build_tiny_model, build_tiny_tokenizer

        return build_tiny_model(name.removeprefix("tiny-")).eval(), build_tiny_tokenizer()
    from brickwork.models.loading import load_model

    return load_model(name, progress=progress)


def import_package(directory: Path, name: str) -> ModuleType:
    """Import the package ``directory / name`` (e.g. the Python binding shipped inside a llama.cpp build) without
    putting ``directory`` on the import path."""
    init = Path(directory) / name / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"{init} does not exist: {directory} holds no package {name!r}")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Bench:
    """One benchmark script: its ``name`` (recorded in results.json), how its results render as markdown, the
    plots drawn from them (file name -> function of ``(results, path)``), and for ``--replot FILE ...`` how the
    rows of other results files are merged in (scripts without ``merge`` take ``--replot`` alone)."""

    name: str
    render: Callable[[dict], str]
    plots: dict[str, Callable[[dict, Path], None]] = field(default_factory=dict)
    merge: Callable[[dict, list[Path]], dict] | None = None

    def parser(self, description: str | None, out: str, quick: bool = False, raw: bool = False):
        """An argument parser with ``--out`` (default ``out``), ``--replot`` and, with ``quick``, ``--quick``."""
        parser = argparse.ArgumentParser(
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter,
        )
        parser.add_argument("--out", type=Path, default=Path(out), help="results directory")
        shown = ", ".join(["results.md", *self.plots])
        if self.merge is None:
            parser.add_argument(
                "--replot",
                action="store_const",
                const=[],  # args.replot: [] when given, None otherwise (as with files to merge)
                default=None,
                help=f"only render --out's results.json again ({shown}); runs no model",
            )
        else:
            parser.add_argument(
                "--replot",
                nargs="*",
                type=Path,
                default=None,
                metavar="RESULTS_JSON",
                help=f"only render --out's results.json again ({shown}), adding the rows of these other "
                "results.json files; runs no model",
            )
        if quick:
            parser.add_argument(
                "--quick", action="store_true", help="smoke run: a tiny random model, a few rows"
            )
        return parser

    def start(self, args: argparse.Namespace | None = None, settings: dict | None = None) -> dict:
        """The results of a run about to start: this bench's name, the machine (at the start: the commit that
        runs, not the one checked out at the end) and ``settings`` (default: every parsed option)."""
        if settings is None:
            settings = {} if args is None else settings_of(args)
        return {"bench": self.name, "machine": machine_info(), "settings": settings}

    def write(self, out: Path, results: dict, plots: bool = True) -> str:
        """results.json and results.md in ``out`` (and the plots, with ``plots``); returns the markdown."""
        table = self.render(results)
        write_results(Path(out), results, table)
        if plots:
            for name, plot in self.plots.items():
                plot(results, Path(out) / name)
        return table

    def replot(self, out: Path, extra: list[Path] | None = None) -> None:
        """Render ``out``'s results.json again (with the rows of ``extra`` results files merged in) and print it."""
        path = Path(out) / "results.json"
        if not path.is_file():
            raise SystemExit(f"--replot: {out} holds no results.json; give the --out of an earlier run")
        results = json.loads(path.read_text())
        if extra:
            if self.merge is None:
                raise SystemExit(f"--replot takes no files in {self.name}")
            results = self.merge(results, list(extra))
        print(self.write(Path(out), results))
