"""Activation concentration across models: the profile summaries of several decoders side by side.

Each model is profiled on the same calibration text (``brickwork.profile``) and summarised by the share of each
token's activation mass (sum of abs(h)) that its top 10/25/50% of FFN neurons hold, averaged over layers, and by
the threshold activation rate (neurons above the token's mean abs(h)). A higher top-10% share means a sparser,
more carvable FFN. Question from the real-models issue: does concentration grow with model size here?
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import brickwork as bw
from brickwork.benchmarks.harness import machine_info, write_results
from brickwork.profiling.stats import MASS_SHARE_FRACTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b"]
    )
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile-across-models"))
    args = parser.parse_args()

    machine = machine_info()
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
    results = {"machine": machine, "settings": vars(args) | {"out": str(args.out)}, "rows": rows}
    m = machine
    lines = [
        f"# Activation concentration across models ({args.calib}, {args.tokens} tokens each)",
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
    table = "\n".join(lines)
    write_results(args.out, results, table)
    print(table)


if __name__ == "__main__":
    main()
