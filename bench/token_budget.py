"""Per-token budgets (bw.fit_token_budget) against the uniform top-k at equal average reads.

One carve with a cap above the targets (by default 64 experts, 8 shared, the sigmoid combine rule, the fitted router
without intercept, top-k for 75% reads). For each target:

- ``uniform``: the same artefact at a fixed top-k within the target (``bw.set_budget``);
- ``uniform, carved at the target``: a separate carve with the uniform row's top-k, its combine weights fitted for
  it (``--no-separate`` leaves it out);
- per-token budgets fitted on the calibration text to the uniform row's reads (so that both read the same on
  average): one threshold for every layer, one per layer, with MoE++'s copy expert, and with the zero expert
  (``min_active=0`` and ``--zero-share``).

Every row is scored on the same held-out windows (perplexity ratio to dense, KL, top-1 agreement) and its reads per
token are counted on them (mean and worst case). Per-layer budgets (``bw.allocate_budgets``, measured sensitivity)
come alone and as per-layer caps under one per-token threshold. Batch-1 decode speed of the global per-token budget
and of the per-layer rows against the uniform row: interleaved runs of copies of the artefact, medians.
Writes results.json and results.md.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

import brickwork as bw
from brickwork.benchmarks.harness import (
    Bench,
    add_allocation_arguments,
    add_model_arguments,
    load_bench_model,
)
from brickwork.benchmarks.quality import HeldOut
from brickwork.benchmarks.speed import _decode_steps, _interleaved
from brickwork.bricks import carved_layers
from brickwork.bricks.budget import allocate_budgets
from brickwork.bricks.token_budget import ReadCounter
from brickwork.carving import calibrate

# name -> fit_token_budget options (None: the uniform top-k rows)
VARIANTS = {
    "per-token, one threshold": {},
    "per-token, per layer": {"per_layer": True},
    "per-token + copy expert": {"copy": True},
    "per-token + zero expert": {"min_active": 0, "zero_share": None},  # zero_share from --zero-share
}
# per-layer budgets (bw.allocate_budgets, HMoE / Mix'n'Match), alone and as per-layer caps under one per-token
# threshold; --layer-step is the allocation's step, --layer-lift how far above the target the caps' mean sits
LAYER_VARIANTS = ("per-layer top-k", "per-layer caps + per-token")
# rows whose batch-1 decode speed is measured against the uniform top-k's (interleaved with it)
SPEED_VARIANTS = ("per-token, one threshold", *LAYER_VARIANTS)


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/token-budget-smollm2", quick=True)
    add_model_arguments(parser)
    parser.add_argument(
        "--fit-tokens",
        type=int,
        default=2048,
        help="calibration tokens fit_token_budget and allocate_budgets use",
    )
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument(
        "--score-batch",
        type=int,
        default=4,
        help="held-out windows scored at once (1 for large vocabularies: each batch holds a few "
        "[batch, window, vocab] float32 tensors)",
    )
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--shared", type=int, default=8)
    parser.add_argument(
        "--cap", type=float, default=0.75, help="the carve's own top-k, as a fraction of the FFN"
    )
    parser.add_argument("--combine", default="sigmoid")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument(
        "--variants", nargs="+", default=[*VARIANTS, *LAYER_VARIANTS], choices=[*VARIANTS, *LAYER_VARIANTS]
    )
    add_allocation_arguments(parser, step=0.05)
    parser.add_argument(
        "--layer-lift",
        type=float,
        default=0.1,
        help="per-layer caps + per-token: the caps are allocated at the uniform row's mean reads plus this, and one per-token "
        "threshold brings the mean reads back to the uniform row's",
    )
    parser.add_argument(
        "--zero-share", type=float, default=0.5, help="the zero expert's mass / mean token mass"
    )
    parser.add_argument("--no-separate", action="store_true", help="leave out the carves made at each target")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-speed", action="store_true")
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    if args.quick:
        args.model, args.calib_tokens, args.router_samples, args.fit_tokens = "tiny-llama", 1024, 512, 512
        args.eval_tokens, args.window, args.experts, args.shared = 512, 64, 16, 2
        args.decode_steps, args.repeats, args.targets = 4, 3, [0.6, 0.45]
    started = time.perf_counter()
    results = BENCH.start(args) | {"rows": [], "speed": []}
    model, tokenizer = load_bench_model(args.model)
    held_out = {d: HeldOut(tokenizer, d, args.eval_tokens, args.window, args.score_batch) for d in args.eval}
    for h in held_out.values():
        h.cache_dense(model)
    base = bw.CarveConfig(
        calib_tokens=args.calib_tokens, router_samples=args.router_samples, window=args.window
    )
    calibration = calibrate(model, tokenizer, args.calib, base, progress=False)

    def carve(fraction: float | None = None, active: int | None = None) -> float:
        config = bw.CarveConfig(
            experts=args.experts,
            shared=args.shared,
            neuron_share=fraction,
            active=active,
            method="activation",
            router="fitted",
            router_options={"intercept": False},
            combine=args.combine,
            accumulate="float32",
            calib_tokens=args.calib_tokens,
            router_samples=args.router_samples,
            window=args.window,
        )
        return bw.carve_(model, config, calibration=calibration, progress=False).reads

    def layer_variant(name: str, reads: float) -> dict:
        """Per-layer budgets averaging ``reads`` (the uniform row's mean reads, not the nominal target: each layer
        then reads at most what the uniform row does, on average), moved by measured sensitivity on the
        calibration text; or per-layer caps ``--layer-lift`` above it with a per-token threshold under them fitted
        back to ``reads``. Leaves the artefact at its cap."""
        lift = 0.0 if name == "per-layer top-k" else args.layer_lift
        layers = allocate_budgets(
            model, tokenizer, args.calib, reads + lift, step=args.layer_step, tokens=args.fit_tokens,
            window=args.window, progress=False, rounds=args.layer_rounds,
        )  # fmt: skip
        fit = None
        if lift:
            fit = bw.fit_token_budget(
                model,
                tokenizer,
                args.calib,
                reads,
                tokens=args.fit_tokens,
                window=args.window,
                progress=False,
            ).to_dict()
        budgets = {str(i): b for i, b in layers.items()}  # score()'s "layers" are the reads per layer
        row = {"budgets": budgets, "fit": fit, **score()}
        if not args.no_speed:
            timed[name] = copy.deepcopy(model)
        bw.set_token_budget(model, None)
        bw.set_budget(model, None)
        return row

    def score() -> dict:
        with ReadCounter(model) as counter:
            scores = {d: h.score(model) for d, h in held_out.items()}
        reads = counter.reads()
        return {"heldout": scores, "reads": reads.mean, "worst": reads.worst, "layers": reads.layers}

    cap = carve(args.cap)
    results["cap"] = {"fraction": cap, **score()}
    print(
        f"cap {cap:.1%}: " + ", ".join(f"{d} x{s['ratio']:.3f}" for d, s in results["cap"]["heldout"].items())
    )
    for target in args.targets:
        bw.set_token_budget(model, None)
        fractions = bw.set_budget(model, target)
        sizes = {i: b.d_ff * b.weights_per_neuron for i, b in carved_layers(model).items()}
        uniform_reads = sum(fractions[i] * sizes[i] for i in sizes) / sum(sizes.values())
        rows = [{"target": target, "name": "uniform top-k", **score()}]
        top_k = next(iter(carved_layers(model).values())).active
        uniform = copy.deepcopy(model) if not args.no_speed else None
        bw.set_budget(model, None)  # back to the cap: tokens choose within it
        timed = {}  # the adaptive rows whose decode speed is measured against the uniform one
        for name in args.variants:
            if name in LAYER_VARIANTS:
                rows.append({"target": target, "name": name, **layer_variant(name, uniform_reads)})
                continue
            options = dict(VARIANTS[name])
            if "zero_share" in options:
                options["zero_share"] = args.zero_share
            fit = bw.fit_token_budget(
                model, tokenizer, args.calib, uniform_reads, tokens=args.fit_tokens, window=args.window,
                progress=False, **options,
            )  # fmt: skip
            row = {"target": target, "name": name, "options": options, "fit": fit.to_dict(), **score()}
            rows.append(row)
            if name in SPEED_VARIANTS and not args.no_speed:
                timed[name] = copy.deepcopy(model)
            bw.set_token_budget(model, None)
        if not args.no_separate:
            bw.uncarve_(model)
            carve(active=top_k)  # the uniform row's top-k, its combine weights fitted for it
            rows.append({"target": target, "name": "uniform, carved at the target", **score()})
            bw.uncarve_(model)
            carve(args.cap)
        for row in rows:
            row["ratio"] = {d: s["ratio"] for d, s in row["heldout"].items()}
            print(f"{target:.0%} {row['name']:<32} reads {row['reads']:.1%} (worst {row['worst']:.1%}) "
                  + " ".join(f"{d} x{r:.3f}" for d, r in row["ratio"].items()), flush=True)  # fmt: skip
        results["rows"] += rows
        if uniform is not None and timed:
            prompt = torch.randint(
                3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
            )
            runs = {"uniform top-k": _decode_steps(uniform, prompt, args.decode_steps)}
            runs |= {name: _decode_steps(m, prompt, args.decode_steps) for name, m in timed.items()}
            times = _interleaved(runs, args.repeats)
            decode_reads = {}  # what the timed tokens read (prompt and decoded tokens), counted outside the timing
            for name, timed_model in [("uniform top-k", uniform), *timed.items()]:
                with ReadCounter(timed_model) as counter:
                    runs[name]()
                decode_reads[name] = counter.reads().mean
            speed = {
                "target": target,
                "uniform_s": times.pop("uniform top-k"),
                "uniform_reads": decode_reads["uniform top-k"],
                "variants": {},
            }
            for name, seconds in times.items():
                speed["variants"][name] = {
                    "s": seconds,
                    "speedup": speed["uniform_s"] / seconds,
                    "reads": decode_reads[name],
                }
                print(
                    f"{target:.0%} batch-1 decode: {name} / uniform speed x{speed['uniform_s'] / seconds:.3f}"
                )
            results["speed"].append(speed)
        uniform = timed = None
        BENCH.write(args.out, results, plots=False)
    results["seconds"] = time.perf_counter() - started
    print(BENCH.write(args.out, results))


def render(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    corpora = s["eval"]
    cap = results["cap"]
    lines = [
        f"# Per-token budgets against the uniform top-k ({s['model']})",
        "",
        f"commit `{m['commit']}`, {m['date']}, {m['cpu']}; carve: {s['experts']} experts ({s['shared']} shared), "
        f"`{s['combine']}` combine, fitted router without intercept, cap {cap['fraction']:.1%} of the FFN read per "
        f"token; calibration `{s['calib']}` {s['calib_tokens']} tokens (token budgets fitted on {s['fit_tokens']} of "
        f"them); {s['eval_tokens']} held-out tokens per corpus.",
        "",
        "Per-token budgets are fitted to the uniform row's reads (its fixed top-k within the target). *reads*: mean "
        "FFN weights read per token on the held-out tokens (router and shared neurons included), *worst*: the "
        "most a token can read. Perplexity ratio to dense, " + " / ".join(corpora) + ".",
        "",
        f"The cap itself: reads {cap['reads']:.1%}, "
        + " / ".join(f"x{cap['heldout'][d]['ratio']:.3f}" for d in corpora),
        "",
        "*vs uniform*: perplexity ratio over the uniform top-k row's."
        + (  # runs before --layer-rounds rendered without this note
            " Per-layer rows: `bw.allocate_budgets` around "
            f"the uniform row's mean reads, step {s['layer_step']:g}, {s['layer_rounds']} round(s); the "
            f"caps of *per-layer caps + per-token* {s.get('layer_lift', 0.1):g} above them."
            if "layer_rounds" in s
            else ""
        ),
        "",
        "| target | row | reads | worst | perplexity ratio | KL | top-1 agreement | vs uniform |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        uniform = next(
            u for u in results["rows"] if u["target"] == r["target"] and u["name"] == "uniform top-k"
        )
        h = r["heldout"]
        lines.append(
            f"| {r['target']:.0%} | {r['name']} | {r['reads']:.1%} | {r['worst']:.1%} | "
            + " / ".join(f"x{h[d]['ratio']:.3f}" for d in corpora)
            + " | "
            + " / ".join(f"{h[d]['kl']:.3f}" for d in corpora)
            + " | "
            + " / ".join(f"{h[d]['agreement']:.1%}" for d in corpora)
            + " | "
            + " / ".join(f"{h[d]['ratio'] / uniform['heldout'][d]['ratio']:.3f}" for d in corpora)
            + " |"
        )
    if results["speed"]:
        counted = all("uniform_reads" in t for t in results["speed"])  # runs before 2026-11-27 lack the reads
        lines += [
            "",
            f"Batch-1 decode ({s['decode_steps']} steps after a 16-token prompt, medians of {s['repeats']} "
            "interleaved repeats) against the uniform top-k at the same mean reads"
            + (
                " (on the calibration text); in brackets, what the timed tokens (prompt and decoded ones) read:"
                if counted
                else ":"
            ),
            "",
        ]

        def bracket(reads: float | None) -> str:
            return "" if reads is None else f" [{reads:.1%}]"

        for t in results["speed"]:
            lines.append(
                f"- {t['target']:.0%}: uniform {1 / t['uniform_s']:.1f} tokens/s{bracket(t.get('uniform_reads'))}; "
                + "; ".join(
                    f"{name} {1 / v['s']:.1f} tokens/s (x{v['speedup']:.3f}){bracket(v.get('reads'))}"
                    for name, v in _timed_variants(t).items()
                )
            )
    copies = [r for r in results["rows"] if (r.get("fit") or {}).get("copy")]
    if copies:
        lines += [
            "",
            "Copy expert, per layer on the calibration tokens: what dropping experts loses, and after:",
            "",
        ]
        for r in copies:
            fits = r["fit"]["copy"].values()
            lost = sum(c["lost"] for c in fits) / len(fits)
            after = sum(c["after"] for c in fits) / len(fits)
            lines.append(f"- {r['target']:.0%}: mean relative error {lost:.4f} -> {after:.4f}")
    return "\n".join(lines) + "\n"


def _timed_variants(speed: dict) -> dict:
    """``{row: {s, speedup}}`` of one target's speed entry; results written before several rows were timed held
    the global per-token row alone."""
    if "variants" in speed:
        return speed["variants"]
    return {"per-token, one threshold": {"s": speed["adaptive_s"], "speedup": speed["speedup"]}}


def plot(results: dict, path: Path) -> None:
    """One panel per target: each row's perplexity ratio over the uniform top-k's at the same mean reads, per
    held-out corpus (below 1: better than uniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora, targets = results["settings"]["eval"], list(dict.fromkeys(r["target"] for r in results["rows"]))
    if not targets:
        return
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 3.6), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        rows = [r for r in results["rows"] if r["target"] == target]
        uniform = next(r for r in rows if r["name"] == "uniform top-k")
        shown = [r for r in rows if r is not uniform]
        height = 0.8 / len(corpora)
        for j, corpus in enumerate(corpora):
            ratios = [r["heldout"][corpus]["ratio"] / uniform["heldout"][corpus]["ratio"] for r in shown]
            ax.barh(
                [i + j * height for i in range(len(shown))],
                ratios,
                height=height,
                label=corpus,
                color=f"C{j}",
            )
        ax.set_yticks([i + height * (len(corpora) - 1) / 2 for i in range(len(shown))])
        ax.set_yticklabels([r["name"] for r in shown], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1, color="grey", lw=0.8)
        low = min(
            0.5, *(r["heldout"][c]["ratio"] / uniform["heldout"][c]["ratio"] for r in shown for c in corpora)
        )
        ax.set_xlim(low * 0.95, None)
        ax.set_xlabel("perplexity ratio / the uniform top-k's")
        ax.set_title(f"{target:.0%} target, {uniform['reads']:.1%} mean reads", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7)
    fig.suptitle(f"Adaptive budgets at equal mean reads ({results['settings']['model']})", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)


BENCH = Bench("token_budget", render, plots={"token-budget.png": plot})

if __name__ == "__main__":
    main()
