"""Held-out perplexity of carved SmolLM2 (or any model) for method x router x active fraction.

One calibration pass serves every configuration; each configuration is carved, evaluated on the same
held-out windows, and uncarved (bit-exact) before the next. Writes results.json and results.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import brickwork as bw
from brickwork.benchmarks.common import CONFIG_KEYS
from brickwork.benchmarks.harness import Bench, add_model_arguments
from brickwork.carving import calibrate


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/carving-quality")
    add_model_arguments(parser)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per corpus")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="one configuration (repeatable), a carve string (CarveConfig.from_string); e.g. "
        "experts=16,shared=2,active=2,method=activation,router=fitted,router.intercept=false, or "
        "preset=neuron@0.25",
    )
    parser.add_argument(
        "--grid", action="store_true", help="every method x router at 25/50/75%% with 16 experts"
    )
    parser.add_argument(
        "--granularity",
        nargs="*",
        type=int,
        help="the granularity grid: these experts per FFN (default 16 to the neuron level) at 25%% and 50%% of "
        "FFN reads, fitted (linear, stock-exportable) and oracle routers, 1/8 of the experts shared",
    )
    parser.add_argument(
        "--granularity-routers",
        nargs="+",
        default=["fitted", "oracle"],
        help="linear routers (fitted, trained) and the oracle bound for --granularity",
    )
    parser.add_argument(
        "--granularity-targets",
        nargs="+",
        type=float,
        default=[0.25, 0.5],
        help="read budgets of --granularity",
    )
    parser.add_argument(
        "--granularity-combine",
        nargs="+",
        default=["sum"],
        help="combine rules for the linear-router rows of --granularity (sum, softmax, softmax_topk)",
    )
    parser.add_argument(
        "--accumulate", default="auto", choices=("auto", "float32", "float64"), help="sums (see CarveConfig)"
    )
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out, args.replot)

    configs: list[dict | str] = list(args.config)  # carve strings, and the grids' CarveConfig keywords
    if args.grid:
        from brickwork.carving.presets import recommended
        from brickwork.grouping import GROUPING_METHODS
        from brickwork.routing import ROUTERS

        for active in (2, 6, 10):  # 25%, 50%, 75% of 16 experts with 2 shared
            for method in GROUPING_METHODS:
                # lowrank is a neuron-level predictor (its rows are below); at 16 experts it is slow to fit and
                # was measured worse than fitted (x42.7 at 30% reads, commit a5f7703).
                for router in (r for r in ROUTERS if r != "lowrank"):
                    configs.append(dict(experts=16, shared=2, active=active, method=method, router=router))
        # The measured default (neuron level, partial router) and the neuron-level oracle bounds. These rows
        # are the SmolLM2 shapes (d_ff 1536, gated); for another model pass them with --config.
        for fraction in (0.25, 0.5, 0.75):
            c = recommended(fraction, d_ff=1536, d_model=576)
            configs.append(
                dict(
                    experts=c.experts,
                    shared=0,
                    active=c.active,
                    method=c.method,
                    router=c.router,
                    down_fraction=c.down_fraction,
                    router_options=c.router_options,
                )
            )
        for active, input_fraction in ((77, 0.25), (35, 0.125)):  # 50% and 25% with experts of 8 neurons
            configs.append(
                dict(
                    experts=192,
                    shared=0,
                    active=active,
                    method="activation",
                    router="partial",
                    router_options={"input_fraction": input_fraction},
                )
            )
        for active in (384, 768):
            configs.append(dict(experts=1536, shared=0, active=active, method="activation", router="oracle"))
        for active in (306, 690):
            configs.append(dict(experts=1536, shared=0, active=active, method="activation", router="lowrank"))

    results = BENCH.start(args)  # at the start: the commit that runs, not the one checked out at the end
    model, tokenizer = bw.load_model(args.model)
    from brickwork.models.specs import find_ffns

    ffn = find_ffns(model)[0]
    d_ff, d_model, gated = ffn.d_ff, ffn.read().d_model, ffn.is_gated
    if args.granularity is not None:
        experts = args.granularity or [16, 32, 64, 96, 192, 384, 768, 1536]
        configs += granularity_grid(
            experts,
            routers=args.granularity_routers,
            combines=args.granularity_combine,
            d_ff=d_ff,
            gated=gated,
            targets=args.granularity_targets,
        )
        configs += neuron_level_defaults(
            d_ff=d_ff, d_model=d_model, gated=gated, targets=args.granularity_targets
        )
    base = bw.CarveConfig(calib_tokens=args.calib_tokens, router_samples=args.router_samples)
    started = time.perf_counter()
    calibration = calibrate(model, tokenizer, args.calib, base)
    calibration_seconds = time.perf_counter() - started

    def evaluate() -> dict:
        return {
            data: bw.evaluate(model, tokenizer, data, max_tokens=args.eval_tokens, progress=False).perplexity
            for data in args.eval
        }

    dense = evaluate()
    print("dense", dense, flush=True)
    rows = []
    results |= {
        "settings": {
            "model": args.model,
            "calib": args.calib,
            "calib_tokens": args.calib_tokens,
            "router_samples": args.router_samples,
            "eval": args.eval,
            "eval_tokens": args.eval_tokens,
            "accumulate": args.accumulate,
            "calibration_seconds": calibration_seconds,
        },
        "dense": dense,
        "rows": rows,  # the same list: rows appended below are in it
    }
    for item in configs:
        target = None
        if isinstance(item, str):
            config = bw.CarveConfig.from_string(item, d_ff=d_ff, d_model=d_model, gated=gated)
        else:
            kwargs = dict(item)
            target = kwargs.pop("target", None)
            config = bw.CarveConfig(**kwargs)
        config = replace(
            config,
            calib_tokens=args.calib_tokens,
            router_samples=args.router_samples,
            accumulate=args.accumulate,
        )
        started = time.perf_counter()
        report = bw.carve_(model, config, calibration=calibration, progress=False)
        carve_seconds = time.perf_counter() - started
        with torch.no_grad():
            perplexity = evaluate()
        bw.uncarve_(model)
        row = {
            "config": {k: v for k, v in config.to_dict().items() if k in CONFIG_KEYS},
            "active_fraction": report.reads,
            "carve_seconds": carve_seconds,
            "perplexity": perplexity,
            "ratio": {d: perplexity[d] / dense[d] for d in args.eval},
            "experts_run_fraction": (config.shared + config.active) / config.experts,
        }
        if target is not None:
            row["target"] = target
        if report.combine_fits:  # weighted combine rules: what the fit found, averaged over layers
            fits = list(report.combine_fits.values())
            row["combine_fit"] = {
                key: sum(f[key] for f in fits) / len(fits)
                for key in ("relative_error", "sum_relative_error", "fragile")
            } | {"temperatures": sorted({f["temperature"] for f in fits})}
        rows.append(row)
        BENCH.write(args.out, results, plots=False)  # a run stopped early keeps its rows
        print(
            f"{row['config']} fraction {report.reads:.3f} ratio "
            f"{' '.join(f'{d}={r:.3f}' for d, r in row['ratio'].items())} ({carve_seconds:.1f} s)",
            flush=True,
        )

    print(BENCH.write(args.out, results))


def merge_runs(results: dict, others: list[Path]) -> dict:
    """``results`` with the rows of other runs' results.json files (same model, corpora and dense figures); a later
    file's row replaces an earlier row of the same configuration."""

    def key(row: dict) -> str:
        return json.dumps(row["config"], sort_keys=True)

    for extra in others:
        other = json.loads(Path(extra).read_text())
        replaced = {key(r) for r in other["rows"]}
        results["rows"] = [r for r in results["rows"] if key(r) not in replaced]
        results["rows"] += [dict(r, source=str(extra)) for r in other["rows"]]
        results.setdefault("merged_from", []).append(
            {
                "file": str(extra),
                "machine": other["machine"],
                "settings": other["settings"],
                "dense": other["dense"],
            }
        )
    return results


def neuron_level_defaults(d_ff: int, d_model: int, gated: bool, targets=(0.25, 0.5)) -> list[dict]:
    """The measured default carve (``presets.recommended``: neuron level, partial router) at 25% and 50% reads,
    the quality that no stock format can hold, as the reference line of the granularity grid."""
    from brickwork.carving.presets import recommended

    rows = []
    for target in targets:
        c = recommended(target, d_ff=d_ff, d_model=d_model, gated=gated)
        rows.append(
            dict(
                experts=c.experts,
                shared=c.shared,
                active=c.active,
                method=c.method,
                router=c.router,
                down_fraction=c.down_fraction,
                router_options=c.router_options,
                target=target,
            )
        )
    return rows


def granularity_grid(
    expert_counts: list[int],
    routers: list[str],
    combines: tuple[str, ...] | list[str] = ("sum",),
    d_ff: int = 1536,
    gated: bool = True,
    targets=(0.25, 0.5),
) -> list[dict]:
    """Carves from 16 experts to the neuron level at 25% and 50% of FFN reads (SmolLM2's d_ff by default).

    1/8 of the experts are shared (2 of 16, as the 16-expert default). The linear routers (fitted, trained) read
    an ``[experts, d_model]`` matrix, ``experts / (3 d_ff)`` of a gated FFN's weights, so their rows run fewer
    experts to read the same total; the oracle rows (the bound on any router: it computes every neuron to
    choose) run the target fraction of experts.
    """
    rows = []
    for experts in expert_counts:
        if d_ff % experts:
            raise SystemExit(f"--granularity: {experts} does not divide d_ff {d_ff}")
        shared = max(1, experts // 8)
        router_reads = experts / ((3 if gated else 2) * d_ff)
        for target in targets:
            for router in routers:
                budget = target if router == "oracle" else target - router_reads
                active = round(budget * experts) - shared
                if active < 1:
                    continue
                for combine in ["sum"] if router == "oracle" else combines:
                    rows.append(
                        dict(
                            experts=experts,
                            shared=shared,
                            active=active,
                            method="activation",
                            router=router,
                            combine=combine,
                            target=target,
                        )
                    )
    return rows


def plot_granularity(results: dict, path: Path) -> None:
    """Perplexity ratio against experts per FFN at each read budget, one line per router and budget (nothing
    without granularity rows)."""
    if not any("target" in r for r in results["rows"]):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = results["settings"]["eval"]
    fig, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 4.2), squeeze=False)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in results["rows"]:
            if "target" in r:
                c = r["config"]
                combine = "" if c.get("combine", "sum") == "sum" else f" {c['combine']}"
                label = f"{c['router']}{combine}, {r['target']:.0%} reads"
                series.setdefault(label, []).append((r["config"]["experts"], r["ratio"][corpus]))
        for label, points in sorted(series.items()):
            points.sort()
            style = "--s" if label.startswith("oracle") else "-o"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("experts per FFN (1/8 shared; d_ff = neuron level)")
        ax.set_ylabel(f"perplexity / dense ({corpus})")
        ax.axhline(1, color="black", linewidth=0.8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Carved {results['settings']['model']}, training-free: quality against granularity", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_table(results: dict) -> str:
    settings, dense, rows = results["settings"], results["dense"], results["rows"]
    corpora = settings["eval"]
    m = results["machine"]
    # columns added later: runs before them render as they did
    experts_run = any("experts_run_fraction" in r for r in rows)
    combine = any("combine" in r["config"] for r in rows)
    lines = [
        f"# Carving quality ({settings['model']})",
        "",
        f"commit `{m['commit']}`, {m['date']}, {m['cpu']}, torch {m['torch']}; calibration `{settings['calib']}` "
        f"{settings['calib_tokens']} tokens ({settings['calibration_seconds']:.0f} s); {settings['eval_tokens']} "
        "held-out tokens per corpus",
        "",
        "Perplexity ratio to dense (dense: " + ", ".join(f"{d} {p:.2f}" for d, p in dense.items()) + ")",
        "",
        f"| experts | shared | active | method | router{' (, combine)' if combine else ''} | down rows | "
        + ("experts run | " if experts_run else "")
        + "FFN weights read | "
        + " | ".join(corpora)
        + " | carve s |",
        "|"
        + "---:|" * 3
        + "---|---|---:|"
        + "---:|" * experts_run
        + "---:|"
        + "---:|" * len(corpora)
        + "---:|",
    ]
    for r in sorted(rows, key=lambda r: (round(r["active_fraction"] * 4) / 4, r["ratio"][corpora[0]])):
        c = r["config"]
        options = ", ".join(f"{k} {v}" for k, v in c["router_options"].items())
        router = c["router"] + (f" ({options})" if options else "")
        if c.get("combine", "sum") != "sum":
            router += f", {c['combine']}"
        lines.append(
            f"| {c['experts']} | {c['shared']} | {c['active']} | {c['method']} | {router} | "
            f"{'all' if c.get('down_fraction') is None else format(c['down_fraction'], '.0%')} | "
            + (f"{r['experts_run_fraction']:.1%} | " if "experts_run_fraction" in r else "| " * experts_run)
            + f"{r['active_fraction']:.1%} | "
            + " | ".join(f"x{r['ratio'][d]:.3f}" for d in corpora)
            + f" | {r['carve_seconds']:.1f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Perplexity ratio (first corpus, log scale) against FFN weights read, one series per router x granularity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpus = results["settings"]["eval"][0]
    series: dict[str, list[tuple[float, float]]] = {}
    for r in results["rows"]:
        c = r["config"]
        size = "neuron" if c["experts"] >= 1000 else f"{c['experts']} experts"
        label = f"{c['router']}, {size}" + (", down-sparse" if c.get("down_fraction") else "")
        if c["experts"] == 16:
            label += f", {c['method']}"
        series.setdefault(label, []).append((r["active_fraction"], r["ratio"][corpus]))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, points in sorted(series.items()):
        points.sort()
        style = "-o" if "neuron" in label or "192" in label else ":."
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, markersize=4, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("FFN weights read per token (fraction of dense, router included)")
    ax.set_ylabel(f"perplexity / dense ({corpus})")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(
        f"Carved {results['settings']['model']}: quality vs weights read (lower left is better)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BENCH = Bench(
    "carving_quality",
    render_table,
    plots={"quality.png": plot, "granularity.png": plot_granularity},
    merge=merge_runs,
)

if __name__ == "__main__":
    main()
