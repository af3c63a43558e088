"""One carved artefact at many budgets (bw.set_budget) against models carved separately for each budget.

One calibration pass serves every carve. For each family, the model is carved once at --carve-at and evaluated at
every --budgets value by re-budgeting it (no re-carving), then carved afresh at each budget with the same
calibration and evaluated on the same held-out windows. Writes results.json, results.md and budget.png.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

import brickwork as bw
from brickwork.benchmarks.harness import Bench, add_allocation_arguments, add_model_arguments
from brickwork.bricks import carved_layers
from brickwork.bricks.budget import allocate_budgets
from brickwork.carving import calibrate
from brickwork.models.specs import find_ffns

# Each family's carve at a budget, as a carve string (CarveConfig.from_string) with the budget filled in.
FAMILY_CARVES = {
    "neuron-level default": "preset=neuron@{budget}",
    "stock 64 experts softmax": "preset=stock@{budget},combine=softmax",  # carve --stock --combine softmax
    "stock 64 experts sigmoid": "preset=stock@{budget},combine=sigmoid",  # carve --stock
    "16 experts sum": "experts=16,shared=2,neuron_share={budget},method=activation,router=fitted",
}
FAMILIES = tuple(FAMILY_CARVES)


def family_config(family: str, budget: float, d_ff: int, d_model: int) -> bw.CarveConfig:
    return bw.CarveConfig.from_string(FAMILY_CARVES[family].format(budget=budget), d_ff=d_ff, d_model=d_model)


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/budget-smollm2")
    add_model_arguments(parser)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--carve-at", type=float, default=0.5, help="the artefact's own budget")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument(
        "--layer-budgets",
        type=float,
        nargs="*",
        default=[0.25, 0.5],
        help="at these budgets also evaluate the artefact with per-layer budgets (allocate_budgets on the "
        "calibration text) against the uniform one",
    )
    add_allocation_arguments(parser, step=0.1)
    parser.add_argument(
        "--fit-budgets",
        action="store_true",
        help="carve the weighted families' artefact with combine_budgets = --budgets (the rule fitted for each)",
    )
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    results = BENCH.start(args)
    model, tokenizer = bw.load_model(args.model, progress=False)
    ffn = find_ffns(model)[0]
    d_ff, d_model = ffn.d_ff, ffn.read().d_model
    base = bw.CarveConfig(calib_tokens=args.calib_tokens, router_samples=args.router_samples)
    started = time.perf_counter()
    calibration = calibrate(model, tokenizer, args.calib, base)

    def evaluate() -> dict:
        with torch.no_grad():
            return {
                d: bw.evaluate(model, tokenizer, d, max_tokens=args.eval_tokens, progress=False).perplexity
                for d in args.eval
            }

    def carve(config: bw.CarveConfig) -> float:
        config = replace(
            config, calib_tokens=args.calib_tokens, router_samples=args.router_samples, accumulate="float32"
        )
        return bw.carve_(model, config, calibration=calibration, progress=False).reads

    dense = evaluate()
    results |= {"dense": dense, "rows": []}
    for family in args.families:
        config = family_config(family, args.carve_at, d_ff, d_model)
        if args.fit_budgets and config.combine != "sum":
            config = replace(config, combine_budgets=tuple(args.budgets))
        carve(config)
        artefact = {}
        for budget in args.budgets:
            fractions = bw.set_budget(model, budget)
            artefact[budget] = {
                "fraction": sum(fractions.values()) / len(fractions),
                "perplexity": evaluate(),
            }
        for budget in args.layer_budgets:
            chosen = allocate_budgets(
                model,
                tokenizer,
                args.calib,
                budget,
                step=args.layer_step,
                rounds=args.layer_rounds,
                progress=False,
            )
            fractions = {i: b.read_fraction() for i, b in carved_layers(model).items()}
            per_layer = {
                "family": family,
                "budget": budget,
                "layers": chosen,
                "fraction": sum(fractions.values()) / len(fractions),
                "perplexity": evaluate(),
                "allocation": model.brickwork.budget_allocation,
            }
            per_layer["ratio"] = {d: per_layer["perplexity"][d] / dense[d] for d in args.eval}
            results.setdefault("per_layer", []).append(per_layer)
            print(family, budget, "per-layer", per_layer["ratio"], flush=True)
        bw.uncarve_(model)
        for budget in args.budgets:
            fraction = carve(family_config(family, budget, d_ff, d_model))
            separate = {"fraction": fraction, "perplexity": evaluate()}
            bw.uncarve_(model)
            row = {
                "family": family,
                "budget": budget,
                "artefact": artefact[budget],
                "separate": separate,
                "ratio_artefact": {d: artefact[budget]["perplexity"][d] / dense[d] for d in args.eval},
                "ratio_separate": {d: separate["perplexity"][d] / dense[d] for d in args.eval},
            }
            results["rows"].append(row)
            BENCH.write(args.out, results, plots=False)
            print(family, budget, row["ratio_artefact"], row["ratio_separate"], flush=True)
    results["seconds"] = time.perf_counter() - started
    print(BENCH.write(args.out, results))


def render(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    corpora = s["eval"]
    lines = [
        f"# One carve, many budgets ({s['model']})",
        "",
        f"commit `{m['commit']}`, {m['date']}, {m['cpu']} ({', '.join(m.get('cpu_flags', []))}); calibration "
        f"`{s['calib']}` {s['calib_tokens']} tokens; {s['eval_tokens']} held-out tokens per corpus; artefact "
        f"carved at {s['carve_at']:.0%} and re-budgeted with `bw.set_budget`"
        + (" (weighted rules fitted for every budget: `combine_budgets`)" if s.get("fit_budgets") else ""),
        "",
        "Perplexity ratio to dense, " + " / ".join(corpora) + "; *gap*: artefact over separately carved - 1",
        "",
        "| family | budget | artefact reads | artefact | separately carved reads | separately carved | gap |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        a, b = r["ratio_artefact"], r["ratio_separate"]
        gap = " / ".join(f"{a[d] / b[d] - 1:+.1%}" for d in corpora)
        lines.append(
            f"| {r['family']} | {r['budget']:.0%} | {r['artefact']['fraction']:.1%} | "
            + " / ".join(f"x{a[d]:.3f}" for d in corpora)
            + f" | {r['separate']['fraction']:.1%} | "
            + " / ".join(f"x{b[d]:.3f}" for d in corpora)
            + f" | {gap} |"
        )
    if results.get("per_layer"):
        lines += [
            "",
            f"## Per-layer budgets (allocate_budgets, step {s['layer_step']}"
            + (f", {s['layer_rounds']} round(s)" if "layer_rounds" in s else "")  # earlier runs had one round
            + ") against the uniform budget, same artefact",
            "",
            "| family | budget | uniform reads | uniform | per-layer reads | per-layer | per-layer / uniform | "
            "layers lowered / raised |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in results["per_layer"]:
            uniform = next(
                (r for r in results["rows"] if r["family"] == p["family"] and r["budget"] == p["budget"]),
                None,
            )
            if uniform is None:  # a run in progress: its uniform row comes later
                continue
            u = uniform["ratio_artefact"]
            moved = [v - p["budget"] for v in p["layers"].values()]
            lines.append(
                f"| {p['family']} | {p['budget']:.0%} | {uniform['artefact']['fraction']:.1%} | "
                + " / ".join(f"x{u[d]:.3f}" for d in corpora)
                + f" | {p['fraction']:.1%} | "
                + " / ".join(f"x{p['ratio'][d]:.3f}" for d in corpora)
                + " | "
                + " / ".join(f"{p['ratio'][d] / u[d]:.3f}" for d in corpora)
                + f" | {sum(m < 0 for m in moved)} / {sum(m > 0 for m in moved)} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpus = results["settings"]["eval"][0]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, family in enumerate(dict.fromkeys(r["family"] for r in results["rows"])):
        rows = [r for r in results["rows"] if r["family"] == family]
        color = f"C{i}"
        ax.plot(
            [r["artefact"]["fraction"] for r in rows],
            [r["ratio_artefact"][corpus] for r in rows],
            "-o",
            color=color,
            label=f"{family}: one artefact",
        )
        ax.plot(
            [r["separate"]["fraction"] for r in rows],
            [r["ratio_separate"][corpus] for r in rows],
            "--s",
            color=color,
            alpha=0.6,
            label=f"{family}: carved per budget",
        )
        layered = [r for r in results.get("per_layer", []) if r["family"] == family]
        if layered:
            ax.plot(
                [r["fraction"] for r in layered],
                [r["ratio"][corpus] for r in layered],
                "x",
                markersize=9,
                color=color,
                label=f"{family}: per-layer budgets (allocate_budgets)",
            )
    ax.set_yscale("log")
    ax.set_xlabel("FFN weights read per token")
    ax.set_ylabel(f"perplexity / dense ({corpus})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


BENCH = Bench("budget_curve", render, plots={"budget.png": plot})

if __name__ == "__main__":
    main()
