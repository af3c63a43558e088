"""Activation concentration across models: the profile summaries of several decoders side by side.

Each model is profiled on the same calibration text (``brickwork.profile``) and summarised by the share of each
token's activation mass (sum of abs(h)) that its top 10/25/50% of FFN neurons hold, averaged over layers, and by
the threshold activation rate (neurons above the token's mean abs(h)). A higher top-10% share means a sparser,
more carvable FFN. Question from the real-models issue: does concentration grow with model size here?
"""

from __future__ import annotations

import torch

import brickwork as bw
from brickwork.benchmarks.harness import Bench
from brickwork.profiling.stats import MASS_SHARE_FRACTIONS


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/profile-across-models")
    parser.add_argument(
        "--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b"]
    )
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    results = BENCH.start(args)
    rows = []
    for name in args.models:
        model, tokenizer = bw.load_model(name)
        prof = bw.profile(
            model, tokenizer, args.calib, bw.ProfileConfig(tokens=args.tokens, coactivation=False)
        )
        shares = torch.stack([layer["mass_share"] for layer in prof.layers])
        rows.append(
            {
                "model": name,
                "parameters": sum(p.numel() for p in model.parameters()),
                "layers": len(prof.layers),
                "d_ff": prof.layers[0]["mean_abs"].numel(),
                "mass_share_mean": dict(
                    zip(map(str, MASS_SHARE_FRACTIONS), shares.mean(0).tolist(), strict=True)
                ),
                "top10_share_range": [shares[:, 0].min().item(), shares[:, 0].max().item()],
                "threshold_rate_mean": torch.stack([layer["threshold_rate"] for layer in prof.layers])
                .mean()
                .item(),
                "tokens": prof.tokens,
            }
        )
        print(rows[-1], flush=True)
        del model
    results["rows"] = rows
    print(BENCH.write(args.out, results))


def render(results: dict) -> str:
    s, m, rows = results["settings"], results["machine"], results["rows"]
    lines = [
        f"# Activation concentration across models ({s['calib']}, {s['tokens']} tokens each)",
        "",
        f"commit `{m['commit']}`, {m['date']}, {m['cpu']}, torch {m['torch']}",
        "",
        "| model | parameters | layers | d_ff | top 10% mass | top 25% | top 50% | top 10%, layer range | "
        "threshold rate |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        s = r["mass_share_mean"]
        lo, hi = r["top10_share_range"]
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['layers']} | {r['d_ff']} | {s['0.1']:.3f} | "
            f"{s['0.25']:.3f} | {s['0.5']:.3f} | {lo:.3f}-{hi:.3f} | {r['threshold_rate_mean']:.3f} |"
        )
    for r in rows:  # a row measured in a run of its own names it
        if "machine" in r:
            m = r["machine"]
            note = f", {r['note']}" if "note" in r else ""
            lines += ["", f"The {r['model']} row: commit `{m['commit']}`, {m['date']}{note}."]
    return "\n".join(lines)


BENCH = Bench("profile_across_models", render)


if __name__ == "__main__":
    main()
