"""Profiling overhead: tokens/s of `brickwork.profile` vs a plain forward pass over the same tokens.

Interleaved repeats on pre-tokenised windows (median of each), with the co-activation product in each exact
form (int8 GEMM and float32 products; brickwork picks one by hardware, see
`brickwork.profiling.stats.int8_gemm_is_fast`), then one full profile of the requested token count from the
corpus, as `brickwork profile` runs it (tokenisation included).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

import brickwork as bw
import brickwork.profiling.stats as stats_module
from brickwork.benchmarks.harness import Bench
from brickwork.data import token_windows
from brickwork.models.specs import find_ffns
from brickwork.profiling import FFNCapture, NeuronStats
from brickwork.profiling.stats import int8_gemm_is_fast

original_counts = stats_module.coactivation_counts


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/profile-overhead")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens for the full profile run")
    parser.add_argument("--repeat-tokens", type=int, default=4096, help="tokens per interleaved repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)

    machine = BENCH.start()[
        "machine"
    ]  # at the start: the commit that runs, not the one checked out at the end
    model, tokenizer = bw.load_model(args.model)
    config = bw.ProfileConfig()
    windows = token_windows(tokenizer, args.calib, config.window, args.repeat_tokens).split(config.batch_size)
    ffns = find_ffns(model)

    def plain_forward():
        for batch in windows:
            model(input_ids=batch)

    def base_forward():
        for batch in windows:
            model.model(input_ids=batch, use_cache=False)

    def profiling(use_int8: bool | None = None):
        stats_module.coactivation_counts = functools.partial(original_counts, use_int8=use_int8)
        stats = [
            NeuronStats(f.d_ff, config.top_fraction, config.threshold, share_stride=config.share_stride)
            for f in ffns
        ]
        with FFNCapture(ffns, on_hidden=lambda i, h: stats[i].update(h)):
            base_forward()

    runs = {
        "plain forward (logits)": plain_forward,
        "base forward (no LM head)": base_forward,
        "profile": profiling,
        "profile, int8 co-activation": functools.partial(profiling, use_int8=True),
        "profile, float32 co-activation": functools.partial(profiling, use_int8=False),
    }
    times = {name: [] for name in runs}
    with torch.no_grad():
        profiling()  # warm-up
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    tokens = sum(b.numel() for b in windows)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio_plain = median["plain forward (logits)"] / median["profile"]
    ratio_base = median["base forward (no LM head)"] / median["profile"]
    stats_module.coactivation_counts = original_counts

    start = time.perf_counter()
    prof = bw.profile(model, tokenizer, args.calib, bw.ProfileConfig(tokens=args.tokens), progress=True)
    full_seconds = time.perf_counter() - start

    results = {
        "bench": BENCH.name,
        "machine": machine,
        "settings": {
            "model": args.model,
            "calib": args.calib,
            "window": config.window,
            "batch_size": config.batch_size,
            "repeat_tokens": tokens,
            "repeats": args.repeats,
            "full_profile_tokens": prof.tokens,
        },
        "seconds": times,
        "median_seconds": median,
        "profile_speed_vs_plain_forward": ratio_plain,
        "profile_speed_vs_base_forward": ratio_base,
        "full_profile_seconds": full_seconds,
        "full_profile_tokens_per_second": prof.tokens / full_seconds,
        "int8_gemm_chosen": int8_gemm_is_fast("cpu"),
    }
    print(BENCH.write(args.out, results))


def render(results: dict) -> str:
    s, m, median = results["settings"], results["machine"], results["median_seconds"]
    tokens, full_seconds = s["repeat_tokens"], results["full_profile_seconds"]
    return "\n".join(
        [
            f"# Profiling overhead ({s['model']}, {s['calib']})",
            "",
            f"commit `{m['commit']}`, {m['date']}, {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}",
            f"CPU flags: {' '.join(m['cpu_flags'])}; torch CPU capability {m['torch_cpu_capability']}; "
            f"co-activation form chosen here: {'int8 GEMM' if results['int8_gemm_chosen'] else 'float32'}",
            "",
            f"Interleaved, median of {s['repeats']} repeats over the same {tokens} tokens "
            f"(windows of {s['window']}, batch {s['batch_size']}):",
            "",
            "| run | median s | tokens/s | profiling speed as a fraction of this run's |",
            "|---|---:|---:|---:|",
            *[
                f"| {name} | {median[name]:.2f} | {tokens / median[name]:.0f} | "
                f"{median[name] / median['profile']:.2f}x |"
                for name in median
            ],
            "",
            f"Full profile of {s['full_profile_tokens']} tokens from `{s['calib']}` (tokenisation included): "
            f"{full_seconds:.1f} s ({results['full_profile_tokens_per_second']:.0f} tokens/s).",
        ]
    )


BENCH = Bench("profile_overhead", render)


if __name__ == "__main__":
    main()
