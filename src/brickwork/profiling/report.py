"""The "emergent bricks" report of a profile: a per-layer table and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path

from brickwork.profiling.profile import Profile


def summary_table(prof: Profile) -> str:
    """A fixed-width per-layer table: dead neurons and how much of sum |h| the top neurons carry."""
    rows = prof.summary_rows()
    header = (
        f"{'layer':>5} {'d_ff':>6} {'dead %':>7} {'thr rate':>8} {'top10% mass':>11} {'top25% mass':>11} "
        f"{'top50% mass':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['layer']:>5} {r['d_ff']:>6} {100 * r['dead_fraction']:>7.2f} {r['threshold_rate_mean']:>8.3f} "
            f"{r['mass_top10']:>11.3f} {r['mass_top25']:>11.3f} {r['mass_top50']:>11.3f}"
        )
    n = len(rows)
    lines.append("-" * len(header))
    lines.append(
        f"{'mean':>5} {'':>6} {100 * sum(r['dead_fraction'] for r in rows) / n:>7.2f} "
        f"{sum(r['threshold_rate_mean'] for r in rows) / n:>8.3f} "
        f"{sum(r['mass_top10'] for r in rows) / n:>11.3f} {sum(r['mass_top25'] for r in rows) / n:>11.3f} "
        f"{sum(r['mass_top50'] for r in rows) / n:>11.3f}"
    )
    config = prof.meta["config"]
    lines.append(
        f"tokens {prof.tokens}; top-k rate with k = {config['top_fraction']:.0%} of d_ff; threshold rate: "
        f"|h| > {config['threshold']} x token mean |h|; dead: top-k rate < {config['dead_rate']}"
    )
    return "\n".join(lines)


def write_plots(prof: Profile, directory: str | Path) -> list[Path]:
    """Write activation-rate histograms, a layers x neurons heatmap and mass shares; return the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    title = f"{prof.meta.get('model', '')} on {Path(prof.meta.get('calibration', '')).name} ({prof.tokens} tokens)"
    k_label = f"top-{prof.meta['config']['top_fraction']:.0%} rate"
    paths = []

    n = prof.num_layers
    cols = min(6, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows), sharex=True, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        rate = prof.layers[i]["topk_rate"].numpy()
        ax.hist(rate, bins=40, range=(0, max(rate.max(), 1e-6)), color="tab:blue")
        ax.set_yscale("log")
        ax.set_title(f"layer {i}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.supxlabel(f"neuron {k_label} (fraction of tokens)")
    fig.supylabel("neurons (log)")
    fig.suptitle(f"Activation-rate histograms by layer\n{title}", fontsize=9)
    fig.tight_layout()
    paths.append(directory / "activation_rate_hist.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    width = max(len(layer["topk_rate"]) for layer in prof.layers)
    grid = np.full((n, width), np.nan)
    for i, layer in enumerate(prof.layers):
        rate = np.sort(layer["topk_rate"].numpy())[::-1]
        grid[i, : len(rate)] = rate
    floor = 1e-4  # zero rates (dead neurons) are drawn at the floor of the log scale
    grid = np.clip(grid, floor, 1)
    fig, ax = plt.subplots(figsize=(9, 0.18 * n + 2))
    image = ax.imshow(
        grid,
        aspect="auto",
        cmap="magma",
        interpolation="nearest",
        norm=matplotlib.colors.LogNorm(vmin=floor, vmax=1),
    )
    ax.set_xlabel("neurons, sorted by rate within each layer")
    ax.set_ylabel("layer")
    ax.set_title(f"Neuron {k_label} (layers x neurons)\n{title}", fontsize=9)
    fig.colorbar(image, ax=ax, label=k_label)
    fig.tight_layout()
    paths.append(directory / "activation_rate_heatmap.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    summary = prof.summary_rows()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, label in [
        ("mass_top10", "top 10% neurons"),
        ("mass_top25", "top 25%"),
        ("mass_top50", "top 50%"),
    ]:
        ax.plot(
            [r["layer"] for r in summary], [r[key] for r in summary], marker="o", markersize=3, label=label
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("share of sum |h| per token")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"How concentrated each token's FFN activation is\n{title}", fontsize=9)
    fig.tight_layout()
    paths.append(directory / "mass_share_by_layer.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
