"""Balanced grouping at Llama-3-8B size: d_ff 14,336 neurons into 64 equal experts, one layer, synthetic data.

Times each construction method's grouping step on inputs shaped like that layer's: gate/up rows of width
4,096 (weight_kmeans), a co-activation matrix from 4,096 tokens' top-10% patterns (activation, coactivation),
and the random split. Writes results.json and results.md.
"""

from __future__ import annotations

import time

import torch

from brickwork.benchmarks.harness import Bench
from brickwork.grouping import GROUPING_METHODS, GroupingInputs
from brickwork.models.specs import FFNWeights


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/balanced-assignment")
    parser.add_argument("--d-ff", type=int, default=14336)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens behind the synthetic co-activation")
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    results = BENCH.start(args)  # at the start: the commit that runs, not the one checked out at the end
    generator = torch.Generator().manual_seed(0)
    f, d = args.d_ff, args.d_model
    # Neurons in 64 latent groups, so that clustering has structure to find, as trained FFNs do.
    centres = torch.randn(args.experts, d, generator=generator)
    membership = torch.randint(0, args.experts, (f,), generator=generator)
    gate = centres[membership] + 2 * torch.randn(f, d, generator=generator)
    up = torch.randn(f, d, generator=generator)
    weights = FFNWeights(up=up, down=torch.randn(d, f, generator=generator), gate=gate)
    token_topic = torch.randint(0, args.experts, (args.tokens,), generator=generator)
    logits = torch.randn(args.tokens, f, generator=generator) + 3.0 * (
        token_topic[:, None] == membership[None, :]
    )
    k = f // 10
    patterns = torch.zeros(args.tokens, f).scatter_(1, logits.topk(k, dim=1).indices, 1.0)
    coactivation = patterns.t() @ patterns
    stats = {"topk_rate": patterns.mean(0), "mean_abs": patterns.mean(0)}
    del patterns, logits

    rows = []
    for name, method in GROUPING_METHODS.items():
        inputs = GroupingInputs(
            weights=weights,
            stats=stats,
            coactivation=coactivation,
            num_shared=0,
            num_experts=args.experts,
            expert_size=f // args.experts,
            generator=torch.Generator().manual_seed(0),
        )
        start = time.perf_counter()
        grouping = method(inputs)
        seconds = time.perf_counter() - start
        grouping.validate(f)
        # How much of the planted structure the grouping recovered: share of pairs in an expert that share a group.
        same = (
            (membership[grouping.experts][:, :, None] == membership[grouping.experts][:, None, :])
            .float()
            .mean()
        )
        rows.append({"method": name, "seconds": seconds, "planted_pair_purity": same.item()})
        print(f"{name:<14} {seconds:7.1f} s  purity {same.item():.3f}", flush=True)

    results["rows"] = rows
    print(BENCH.write(args.out, results))


def render(results: dict) -> str:
    s, m, rows = results["settings"], results["machine"], results["rows"]
    f = s["d_ff"]
    lines = [
        f"# Balanced grouping at d_ff {f}, {s['experts']} experts (one layer, synthetic)",
        "",
        f"commit `{m['commit']}`, {m['date']}, {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}",
        "",
        "| method | seconds | planted-pair purity |",
        "|---|---:|---:|",
        *[f"| {r['method']} | {r['seconds']:.1f} | {r['planted_pair_purity']:.3f} |" for r in rows],
        "",
        f"Purity: the share of neuron pairs inside an expert that come from the same planted group (random: "
        f"{1 / s['experts']:.3f}).",
    ]
    return "\n".join(lines)


BENCH = Bench("balanced_assignment", render)


if __name__ == "__main__":
    main()
