"""What float64 sums cost: FFN-only time of each neuron-level carve of the speed benchmark with
``accumulate="float32"`` and ``"float64"`` (same carve, two copies), and of the dense FFNs, interleaved in one
run (the speed benchmark's ``_interleaved``: one warm-up each, medians of several repeats), at several token
counts per call (random inputs at the scale of real FFN inputs). The speed benchmark times the default (float64)
only.
"""

from __future__ import annotations

import copy
from functools import partial

import torch

import brickwork as bw
from brickwork.benchmarks.harness import Bench
from brickwork.benchmarks.speed import SpeedBenchConfig, _configs, _interleaved
from brickwork.bricks.state import carved_layers
from brickwork.carving import calibrate


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/accumulate-cost")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 128, 512])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    results = BENCH.start(args)

    torch.set_num_threads(2)
    dense, tokenizer = bw.load_model(args.model)
    speed = SpeedBenchConfig(model=args.model)
    first = bw.find_ffns(dense)[0]
    d_model = first.read().d_model
    calibration = calibrate(dense, tokenizer, speed.calib, bw.CarveConfig(calib_tokens=speed.calib_tokens))
    rows = []
    for name, kwargs in _configs(speed, first.d_ff, d_model, first.is_gated).items():
        if bw.CarveConfig(**kwargs).resolved_accumulate() != "float64":
            continue
        copies = {}
        for accumulate in ("float32", "float64"):
            carved = copy.deepcopy(dense)
            config = bw.CarveConfig(calib_tokens=speed.calib_tokens, accumulate=accumulate, **kwargs)
            bw.carve_(carved, config, calibration=calibration, progress=False)
            copies[accumulate] = list(carved_layers(carved).values())
        names = {module: name for name, module in carved.named_modules()}
        dense_ffns = [dense.get_submodule(names[b]) for b in copies["float64"]]
        for tokens in args.tokens:
            generator = torch.Generator().manual_seed(tokens)
            xs = [torch.randn(tokens, d_model, generator=generator) * 0.5 for _ in dense_ffns]
            calls = {"float32": copies["float32"], "float64": copies["float64"], "dense": dense_ffns}

            def run(modules, xs=xs):
                with torch.no_grad():
                    for module, x in zip(modules, xs, strict=True):
                        module(x)

            seconds = _interleaved(
                {key: partial(run, modules) for key, modules in calls.items()}, args.repeats
            )
            ms = {key: 1e3 * value for key, value in seconds.items()}
            rows.append(
                {
                    "name": name,
                    "tokens": tokens,
                    "ms": ms,
                    "float64_over_float32": ms["float64"] / ms["float32"],
                    "speedup_float32": ms["dense"] / ms["float32"],
                    "speedup_float64": ms["dense"] / ms["float64"],
                }
            )
            print(rows[-1], flush=True)
    results["rows"] = rows
    print(BENCH.write(args.out, results))


def render(results: dict) -> str:
    s, rows = results["settings"], results["rows"]
    lines = [
        f"# FFN time with float32 and float64 sums ({s['model']})",
        "",
        f"commit `{results['machine']['commit']}`, {results['machine']['date']}, 2 threads; FFN-only, all layers, "
        f"random inputs, medians of {s['repeats']} interleaved repeats. Speed-up = dense time / carved time.",
        "",
        "| carve | tokens per call | float32 ms | float64 ms | float64 / float32 | speed-up float32 | speed-up float64 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['tokens']} | {r['ms']['float32']:.1f} | {r['ms']['float64']:.1f} | "
            f"{r['float64_over_float32']:.2f} | x{r['speedup_float32']:.2f} | x{r['speedup_float64']:.2f} |"
        )
    return "\n".join(lines)


BENCH = Bench("accumulate_cost", render)


if __name__ == "__main__":
    main()
