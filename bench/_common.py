"""The bench scripts' shared helpers live in the package (``brickwork bench`` uses them too)."""

from brickwork.benchmarks.common import machine_info, write_results

__all__ = ["add_model_arguments", "machine_info", "replot", "write_results"]


def add_model_arguments(parser) -> None:
    """The model, calibration and held-out options the quality benchmarks share."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--router-samples", type=int, default=8192)
    parser.add_argument("--eval", nargs="+", default=["botchan", "lee-news"])


def add_allocation_arguments(parser, step: float) -> None:
    """``--layer-step`` (default ``step``) and ``--layer-rounds``: the options of ``bw.allocate_budgets`` the budget
    benchmarks pass on."""
    parser.add_argument("--layer-step", type=float, default=step, help="allocate_budgets' step")
    parser.add_argument(
        "--layer-rounds",
        type=int,
        default=1,
        help="allocate_budgets' rounds (a layer moves one step per round)",
    )


def replot(out, render, plot, name: str) -> None:
    """--replot: render ``out``'s results.json again (results.md with ``render``, ``out / name`` with ``plot``)."""
    import json

    if not (out / "results.json").is_file():
        raise SystemExit(f"--replot: {out} holds no results.json; give the --out of an earlier run")
    results = json.loads((out / "results.json").read_text())
    write_results(out, results, render(results))
    plot(results, out / name)
