"""The quality benchmark across models, side by side (issue 17): one table from several ``brickwork bench quality``
runs, and from ``brickwork eval --parent --json`` reports of models carved layer by layer (too large for the
benchmark's in-memory carves on this machine).

For each model and each budget (25/50/75% of FFN weights read): the neuron-level default, the stock-exportable
default (``carve --stock``: 64 experts, sigmoid-weighted), the best 16-expert grid carve the benchmark measured
(activation grouping, fitted router), and the CATS and TEAL activation-sparsity baselines, as perplexity ratios to
the dense parent on botchan / lee-news. Writes results.md and results.json (the rows it read).

    python bench/quality_across_models.py --bench smollm2-135m=DIR gemma3-270m=DIR ... \\
        --eval qwen2.5-1.5b:0.5=FILE qwen2.5-1.5b:0.25=FILE --out bench/results/quality-across-models
"""

from __future__ import annotations

import json
from pathlib import Path

from brickwork.benchmarks.harness import Bench

FAMILIES = ("neuron-level default", "stock default (64 experts, sigmoid)", "16 experts, activation + fitted")
BASELINES = ("cats", "teal")


def _family(row: dict, fraction: float) -> str | None:
    name, c = row["name"], row.get("config", {})
    if name == f"neuron+partial (default {fraction:.0%})":
        return FAMILIES[0]
    if name.startswith("stock ") and name.endswith(f"default {fraction:.0%})"):
        return FAMILIES[1]
    if name.startswith("activation+fitted (") and c.get("active") == round(
        fraction * c.get("experts", 0)
    ) - c.get("shared", 0):
        return FAMILIES[2]
    for b in BASELINES:
        if name == f"{b} keep {fraction:.0%}":
            return b.upper()
    return None


def collect(
    bench: list[tuple[str, Path]], evals: dict[tuple[str, float, str], Path], fractions
) -> list[dict]:
    """Every cell the runs measured: the benchmark runs' in the order given, then the eval reports'. Where two
    measured one cell, the table shows the first of these."""
    cells = []
    for model, directory in bench:
        results = json.loads((directory / "results.json").read_text())
        for fraction in fractions:
            for row in results["rows"]:
                family = _family(row, fraction)
                if family is None:
                    continue
                h = row["heldout"]
                cells.append(
                    {
                        "model": model,
                        "fraction": fraction,
                        "family": family,
                        "reads": row["active_fraction"],
                        "ratio": {d: m["ratio"] for d, m in h.items()},
                        "tokens": {d: m["tokens"] for d, m in h.items()},
                        "source": str(directory),
                        "commit": results["machine"]["commit"],
                    }
                )
    for (model, fraction, family), path in evals.items():
        report = json.loads(path.read_text())
        cells.append(
            {
                "model": model,
                "fraction": fraction,
                "family": family,
                "reads": report.get(
                    "reads", report.get("active_fraction", fraction)
                ),  # eval --json; the older key
                "ratio": {r["data"]: r["perplexity"] / r["parent_perplexity"] for r in report["results"]},
                "tokens": {r["data"]: r["tokens"] for r in report["results"]},
                "source": str(path),
                "commit": None,
            }
        )
    return cells


def _ratio(r: float) -> str:
    return f"x{r:.3f}" if r < 10 else f"x{r:.1f}"


def render(results: dict) -> str:
    s, cells, machine = results["settings"], results["cells"], results["machine"]
    fractions = s["fractions"]
    models = list(dict.fromkeys([*(item.split("=", 1)[0] for item in s["bench"]),
                                 *(item.split("=", 1)[0].split(":")[0] for item in s["eval"])]))  # fmt: skip
    corpora = sorted({d for c in cells for d in c["ratio"]})
    families = [*FAMILIES, *(b.upper() for b in BASELINES)]
    lines = [
        "# Quality across models: perplexity ratio to the dense parent, training-free",
        "",
        f"rendered at commit `{machine['commit']}`, {machine['date']}; each cell's own run is named in results.json "
        "(`source`, `commit`). Cells: " + " / ".join(corpora) + " ratio, and the FFN weights read per token "
        "(router included; CATS reads its whole gate). `-`: not measured.",
        "",
        "| model | row | " + " | ".join(f"{f:.0%}" for f in fractions) + " |",
        "|---|---|" + "---:|" * len(fractions),
    ]
    for model in models:
        for family in families:
            row = []
            for fraction in fractions:
                cell = next(
                    (
                        c
                        for c in cells
                        if c["model"] == model and c["family"] == family and c["fraction"] == fraction
                    ),
                    None,
                )
                if cell is None:
                    row.append("-")
                else:
                    ratios = " / ".join(_ratio(cell["ratio"][d]) for d in corpora if d in cell["ratio"])
                    row.append(f"{ratios} ({cell['reads']:.0%})")
            if any(r != "-" for r in row):
                lines.append(f"| {model} | {family} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/quality-across-models", raw=True)
    parser.add_argument(
        "--bench",
        nargs="*",
        default=[],
        help="MODEL=DIR of a brickwork bench quality run (a model may repeat: where runs overlap, the first given "
        "wins)",
    )
    parser.add_argument(
        "--eval",
        nargs="*",
        default=[],
        help="MODEL:FRACTION[:stock]=FILE of a brickwork eval --json (the neuron-level default, or with :stock the "
        "stock default)",
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    bench = [(k, Path(v)) for k, v in (item.split("=", 1) for item in args.bench)]
    evals = {}
    for item in args.eval:
        try:
            key, path = item.split("=", 1)
            model, fraction, *stock = key.split(":")
            if stock not in ([], ["stock"]):
                raise ValueError(stock)
            cell = (model, float(fraction), FAMILIES[1] if stock else FAMILIES[0])
        except ValueError:
            raise SystemExit(f"--eval {item}: expected MODEL:FRACTION[:stock]=FILE") from None
        if cell in evals:
            raise SystemExit(f"--eval {item}: {key} is given twice")
        evals[cell] = Path(path)
    results = BENCH.start(args)
    results["cells"] = collect(bench, evals, args.fractions)
    print(BENCH.write(args.out, results))


BENCH = Bench("quality_across_models", render)

if __name__ == "__main__":
    main()
