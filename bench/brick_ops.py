"""Brick operations against the ordinary alternatives, on real text from different domains (issue 19).

One carved parent (by default SmolLM2-135M, the stock-exportable carve at 50% reads: 64 experts, 8 shared,
sigmoid-weighted, calibrated on wiki; ``--parent neuron``: the neuron-level default at that budget, much closer to
dense). A new domain (``--new``, default ``python-docs``, the Python 3.11 manuals) and
the original domains (``--old``: the held-out corpora botchan and lee-news, never trained on, and wiki, the
calibration text). Each domain corpus is split by documents, one in ``--test-every`` to the test side, so training
and test text never overlap. Every row trains on the same batches of the new domain's training side
(``brickwork.ops.train``, the same seed), for ``--tokens`` tokens:

- ``full fine-tuning``: every weight of the carved model;
- ``LoRA`` (``peft``) on the attention projections, at the rank whose trainable weights match grow's, and at the
  rank matching update's;
- ``grow``: new experts per layer beside the frozen ones, with replay of the calibration text closing their gates
  on the original domains (``brickwork grow``);
- ``update``: only the experts the new domain routes to (``brickwork update --bricks auto``).

Then pruning for the new domain (``brickwork prune``: experts the domain never selects, and at 99% coverage), and
merging: two children updated on two domains (``--new`` and ``--second``), merged with a router over their bricks
(``brickwork merge``) and averaged, each scored on both domains.

Reported: perplexity on the new domain's test side and on each original domain, the gain on the new domain
(fraction of full fine-tuning's, in log-perplexity), the change on the original ones (forgetting), trainable
weights and seconds. Writes results.json, results.md and brick-ops.png.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import brickwork as bw
from brickwork.benchmarks.harness import Bench, load_bench_model
from brickwork.carving.presets import recommended, stock_recommended
from brickwork.data.sources import iter_documents, token_windows
from brickwork.evaluation.perplexity import score_windows
from brickwork.ops.train import TrainConfig, train_lm_

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def label(source: str) -> str:
    """A short name for a text: a built-in corpus's name, a file's stem."""
    return Path(source).stem if Path(source).is_file() else source


def split_corpus(source: str, into: Path, every: int) -> tuple[Path, Path]:
    """``source``'s documents split into a training and a test file: one document in ``every`` goes to test."""
    train, test = [], []
    for i, document in enumerate(iter_documents(source)):
        (test if i % every == every - 1 else train).append(document)
    name = Path(source).stem if Path(source).exists() else source
    paths = into / f"{name}-train.txt", into / f"{name}-test.txt"
    for path, documents in zip(paths, (train, test), strict=True):
        path.write_text("\n\n".join(documents) + "\n")
    return paths


def perplexity(model, windows: torch.Tensor) -> float:
    model.eval()
    return score_windows(model, windows).perplexity


def lora_per_rank(model) -> int:
    """Trainable weights of one LoRA rank on the attention projections of every layer."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            total += module.in_features + module.out_features
    return total


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/brick-ops-smollm2", quick=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fraction", type=float, default=0.5, help="the carve's FFN reads")
    parser.add_argument(
        "--parent",
        choices=("stock", "neuron"),
        default="stock",
        help="the carved parent: the stock-exportable preset (carve --stock) or the neuron-level default",
    )
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument(
        "--new", default="python-docs", help="the new domain (grow, update, prune, merge child 1)"
    )
    parser.add_argument("--second", default="debian-reference", help="merge: the second child's domain")
    parser.add_argument("--old", nargs="+", default=["botchan", "lee-news", "wiki"])
    parser.add_argument("--test-every", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--eval-window", type=int, default=512)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=65536, help="training tokens of every trained row")
    parser.add_argument("--lr-full", type=float, default=3e-5)
    parser.add_argument("--lr-lora", type=float, default=5e-4)
    parser.add_argument("--lr-grow", type=float, default=1e-3)
    parser.add_argument("--lr-update", type=float, default=1e-4)
    parser.add_argument("--grow-experts", type=int, default=4)
    parser.add_argument("--update-coverage", type=float, default=0.5)
    parser.add_argument("--usage-tokens", type=int, default=16384)
    parser.add_argument("--rows", nargs="+", default=["full", "lora", "grow", "update", "prune", "merge"])
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    started = time.perf_counter()
    if args.quick:
        args.calib_tokens, args.eval_tokens, args.tokens, args.window, args.batch_size = 1024, 256, 256, 64, 2
        args.usage_tokens, args.eval_window = 512, 64
    results = BENCH.start(args) | {"rows": []}
    model, tokenizer = load_bench_model("tiny-llama" if args.quick else args.model)
    with tempfile.TemporaryDirectory(prefix="brickwork-bench-ops-") as tmp:
        splits = {d: split_corpus(d, Path(tmp), args.test_every) for d in {args.new, args.second}}
        test = {args.new: splits[args.new][1], args.second: splits[args.second][1]}
        windows = {
            d: token_windows(tokenizer, str(path), args.eval_window, args.eval_tokens)
            for d, path in test.items()
        }
        windows |= {d: token_windows(tokenizer, d, args.eval_window, args.eval_tokens) for d in args.old}
        run(args, model, tokenizer, splits, windows, results)
    results["seconds"] = time.perf_counter() - started
    print(BENCH.write(args.out, results))


def run(args, model, tokenizer, splits, windows, results) -> None:
    """Every row, appended to ``results["rows"]`` (and written) as it is measured."""
    from brickwork.ops.grow import grow_
    from brickwork.ops.merge import average_children, merge_children
    from brickwork.ops.prune import prune_for_domain_
    from brickwork.ops.update import choose_bricks, update_
    from brickwork.ops.usage import expert_usage

    ffn = bw.find_ffns(model)[0]
    if args.parent == "stock":
        config = stock_recommended(args.fraction, d_ff=ffn.d_ff)
    else:
        weights = ffn.read()
        config = recommended(
            args.fraction, d_ff=ffn.d_ff, d_model=weights.d_model, gated=weights.gate is not None
        )
    config = replace(config, calib_tokens=args.calib_tokens, window=args.eval_window)
    if args.quick:
        config = replace(config, router_samples=512)
    t = time.perf_counter()
    report = bw.carve_(model, config, calib=args.calib, tokenizer=tokenizer, progress=False)
    seconds = time.perf_counter() - t
    results["carve"] = {"config": config.to_dict(), "reads": report.reads, "seconds": seconds}
    new_train, second_train = str(splits[args.new][0]), str(splits[args.second][0])
    domains = [args.new, *args.old]
    train = TrainConfig(tokens=args.tokens, window=args.window, batch_size=args.batch_size)

    def score(name: str, m, extra: dict | None = None, on=None) -> dict:
        row = {
            "name": name,
            "perplexity": {d: perplexity(m, windows[d]) for d in (on or domains)},
            **(extra or {}),
        }
        results["rows"].append(row)
        print(f"{name}: " + ", ".join(f"{d} {p:.3f}" for d, p in row["perplexity"].items()), flush=True)
        BENCH.write(args.out, results, plots=False)
        return row

    score("carved parent", model, {"trainable": 0}, on=[*domains, args.second])

    def trained(name: str, params_of, lr: float, prepare=None) -> dict:
        child = copy.deepcopy(model)
        wrapped = prepare(child) if prepare else child
        params = params_of(wrapped)
        report = train_lm_(
            wrapped, params, tokenizer, new_train, TrainConfig(**(vars(train) | {"lr": lr})), desc=name
        )
        return score(name, wrapped, {"trainable": report["trainable"], "seconds": report["seconds"], "lr": lr,
                                     "losses": report["losses"]})  # fmt: skip

    if "full" in args.rows:
        trained("full fine-tuning", lambda m: list(m.parameters()), args.lr_full)
    grown = updated = None
    if "grow" in args.rows:
        child = copy.deepcopy(model)
        report = grow_(
            child, tokenizer, new_train, experts=args.grow_experts, replay=args.calib,
            config=TrainConfig(**(vars(train) | {"lr": args.lr_grow})),
        )  # fmt: skip
        grown = score(
            f"grow ({args.grow_experts} experts per layer, replay {args.calib})", child,
            {"trainable": report.trainable, "seconds": report.seconds, "lr": args.lr_grow,
             "losses": report.losses, "grow": report.to_dict()},
        )  # fmt: skip
        del child
    usage = expert_usage(model, tokenizer, new_train, tokens=args.usage_tokens, progress=False)
    child_new = None
    if "update" in args.rows or "merge" in args.rows:
        child_new = copy.deepcopy(model)
        bricks = choose_bricks(usage, coverage=args.update_coverage)
        report = update_(
            child_new, tokenizer, new_train, bricks, TrainConfig(**(vars(train) | {"lr": args.lr_update}))
        )
        updated = score(
            f"update (experts covering {args.update_coverage:.0%} of the domain's selections)", child_new,
            {"trainable": report.trainable, "seconds": report.seconds, "lr": args.lr_update,
             "losses": report.losses, "update": report.to_dict()},
        )  # fmt: skip
    if "lora" in args.rows:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            sys.exit("the LoRA rows need peft: pip install -e '.[lora]' (or leave lora out of --rows)")

        per_rank = lora_per_rank(model)
        for matched in (grown, updated):
            if matched is None:
                continue
            rank = max(1, round(matched["trainable"] / per_rank))

            def prepare(m, rank=rank):
                return get_peft_model(
                    m, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS))
                )

            trained(
                f"LoRA rank {rank} (attention; matches {matched['name'].split(' (')[0]})",
                lambda m: [p for n, p in m.named_parameters() if "lora_" in n],
                args.lr_lora,
                prepare,
            )
    if "prune" in args.rows:
        for coverage in (1.0, 0.99):
            child = copy.deepcopy(model)
            report = prune_for_domain_(child, usage, coverage=coverage)
            score(
                f"prune for {label(args.new)} (coverage {coverage:.0%})", child, {"prune": report.to_dict()}
            )
            del child
    if "merge" in args.rows and child_new is not None:
        usage2 = expert_usage(model, tokenizer, second_train, tokens=args.usage_tokens, progress=False)
        child_second = copy.deepcopy(model)
        update_(
            child_second, tokenizer, second_train, choose_bricks(usage2, coverage=args.update_coverage),
            TrainConfig(**(vars(train) | {"lr": args.lr_update})),
        )  # fmt: skip
        pair = [args.new, args.second]
        score(f"child updated on {label(args.new)}", child_new, on=[*pair, *args.old])
        score(f"child updated on {label(args.second)}", child_second, on=[*pair, *args.old])
        merged, report = merge_children(
            [child_new, child_second], [new_train, second_train], tokenizer, tokens=args.usage_tokens
        )
        merge = report.to_dict() | {"accuracy": dict(zip(pair, report.domain_accuracy, strict=True))}
        score("merged (router over both children's bricks)", merged, {"merge": merge}, on=[*pair, *args.old])
        averaged = average_children([child_new, child_second])
        score("averaged children", averaged, on=[*pair, *args.old])


def _change(row: dict, parent: dict, domain: str) -> float:
    return row["perplexity"][domain] / parent["perplexity"][domain] - 1


def render(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    rows = results["rows"]
    if not rows:
        return "(no rows yet)\n"
    parent = rows[0]
    new, old = s["new"], s["old"]
    full = next((r for r in rows if r["name"] == "full fine-tuning"), None)
    carve = results.get("carve", {})
    lines = [
        f"# Brick operations against fine-tuning and LoRA ({s['model']})",
        "",
        f"commit `{m['commit']}`, {m['date']}, {m['cpu']}; carved parent: {s.get('parent', 'stock')} preset at {s['fraction']:.0%} "
        f"(reads {carve.get('reads', float('nan')):.1%}), calibrated on `{s['calib']}` ({s['calib_tokens']} tokens); "
        f"new domain `{new}` (one document in {s['test_every']} held out); every trained row: {s['tokens']} tokens "
        f"of `{new}`'s training side, windows of {s['window']}, batches of {s['batch_size']}, AdamW; perplexity on "
        f"{s['eval_tokens']} held-out tokens per domain.",
        "",
        "*gain*: the fall in log-perplexity on the new domain, as a share of full fine-tuning's; *forgetting*: "
        "the perplexity change on each original domain (" + ", ".join(old) + ").",
        "",
        f"| row | {label(new)} | gain vs full FT | "
        + " | ".join(map(label, old))
        + " | trainable weights | seconds |",
        "|---|---:|---:|" + "---:|" * len(old) + "---:|---:|",
    ]
    trained = [r for r in rows if "trainable" in r]
    for r in trained:
        p = r["perplexity"]
        gain = "-"
        if full is not None and r is not parent:
            full_gain = math.log(parent["perplexity"][new] / full["perplexity"][new])
            gain = f"{math.log(parent['perplexity'][new] / p[new]) / full_gain:.0%}" if full_gain > 0 else "-"
        lines.append(
            f"| {r['name']} | {p[new]:.2f} ({_change(r, parent, new):+.1%}) | {gain} | "
            + " | ".join(f"{p[d]:.2f} ({_change(r, parent, d):+.2%})" for d in old)
            + f" | {r['trainable']:,} | {r.get('seconds', 0):.0f} |"
        )
    pruned = [r for r in rows if "prune" in r]
    if pruned:
        lines += [
            "",
            f"## Pruning for `{new}`: experts the domain's training text never selects (coverage 100%), or "
            "outside the most selected 99%",
            "",
            f"| row | FFN weights kept | {label(new)} | " + " | ".join(map(label, old)) + " |",
            "|---|---:|---:|" + "---:|" * len(old),
        ]
        for r in pruned:
            rep = r["prune"]
            kept = rep["ffn_params_after"] / rep["ffn_params_before"]
            lines.append(
                f"| {r['name']} | {kept:.1%} | {_change(r, parent, new):+.2%} | "
                + " | ".join(f"{_change(r, parent, d):+.2%}" for d in old)
                + " |"
            )
    merged = [r for r in rows if r["name"].startswith(("child", "merged", "averaged"))]
    if merged:
        pair = [new, s["second"]]
        lines += [
            "",
            "## Merging two children (each updated on one domain)",
            "",
            "| row | " + " | ".join(map(label, pair + old)) + " |",
            "|---|" + "---:|" * (len(pair) + len(old)),
        ]
        for r in merged:
            lines.append(
                f"| {r['name']} | " + " | ".join(f"{r['perplexity'][d]:.2f}" for d in pair + old) + " |"
            )
        report = next((r["merge"] for r in merged if "merge" in r), None)
        if report is not None and "accuracy" in report:
            lines += [
                "",
                "Router: share of each domain's held-out tokens sent to that domain's child, mean over layers:",
            ]
            lines += [f"- {label(d)}: {a:.1%}" for d, a in report["accuracy"].items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Left: training loss per step of every trained row. Right: what each row gains on the new domain against what
    it changes on the original ones (mean over them), both as perplexity changes from the carved parent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rows = results["settings"], results["rows"]
    if not rows:
        return
    parent, new, old = rows[0], s["new"], s["old"]
    fig, (curves, scatter) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(r for r in rows if r.get("losses")):
        losses = torch.tensor(r["losses"])
        smooth = min(8, len(losses))  # a running mean over a few steps: single batches are noisy
        mean = losses.unfold(0, smooth, 1).mean(-1) if len(losses) >= smooth else losses
        curves.plot(range(smooth, smooth + len(mean)), mean.tolist(), color=f"C{i}", label=r["name"])
    curves.set_xlabel("training step")
    curves.set_ylabel("training loss (running mean of up to 8 steps)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=6)
    shown = [
        r
        for r in rows[1:]
        if all(d in r["perplexity"] for d in (new, *old))
        and r["name"] != f"child updated on {new}"  # = update
    ]
    for i, r in enumerate(shown):
        x = sum(_change(r, parent, d) for d in old) / len(old)
        y = _change(r, parent, new)
        scatter.plot([100 * x], [100 * y], "o", color=f"C{i % 10}")
        name = r["name"] if r["name"].startswith("prune") else r["name"].split(" (")[0]
        scatter.annotate(name, (100 * x, 100 * y), fontsize=6, xytext=(3, 3),
                         textcoords="offset points")  # fmt: skip
    scatter.margins(x=0.3)  # room for the labels
    scatter.axhline(0, color="grey", lw=0.5)
    scatter.axvline(0, color="grey", lw=0.5)
    scatter.set_xlabel("perplexity change on the original domains, mean (%)")
    scatter.set_ylabel(f"perplexity change on {label(new)} (%)")
    scatter.grid(alpha=0.3)
    fig.suptitle(
        f"Brick operations on {s['model']} ({s.get('parent', 'stock')} parent at {s['fraction']:.0%})",
        fontsize=9,
    )
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)


BENCH = Bench("brick_ops", render, plots={"brick-ops.png": plot})

if __name__ == "__main__":
    main()
