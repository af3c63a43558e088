"""Export carved SmolLM2 to the stock MoE formats and validate each against brickwork's own forward.

One calibration pass serves every carve. Each carve is exported to every format that can hold it, loaded back
with stock transformers (no remote code; the GGUF file through transformers' GGUF reader), and compared on
held-out windows: KL(brickwork || exported), top-1 agreement, max |logit difference|. Export time covers
building, writing, and the router-temperature pass; validation (the reload and the comparison) is timed apart.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import brickwork as bw
from brickwork.benchmarks.harness import Bench
from brickwork.carving import calibrate
from brickwork.data.sources import token_windows
from brickwork.io.export import compare_logits, export, load_exported, stock_routing_copy

CARVES = {
    "top-1 (2 shared + 1 of 14, 19%)": dict(experts=16, shared=2, active=1),
    "25% (2 shared + 2 of 14)": dict(experts=16, shared=2, active=2),
    "50% (2 shared + 6 of 14)": dict(experts=16, shared=2, active=6),
    "25% no shared (4 of 16)": dict(experts=16, shared=0, active=4),
    "50% no shared (8 of 16)": dict(experts=16, shared=0, active=8),
}


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/export-validation")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="botchan")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    machine = BENCH.start()["machine"]
    model, tokenizer = bw.load_model(args.model)
    base = dict(method="activation", router="fitted", router_options={"intercept": False})
    calibration = calibrate(model, tokenizer, "wiki", bw.CarveConfig(**base))
    windows = token_windows(tokenizer, args.data, 512, args.tokens)
    rows = []
    with tempfile.TemporaryDirectory(prefix="brickwork-export-") as tmp:
        for name, shape in CARVES.items():
            report = bw.carve_(
                model, bw.CarveConfig(**base, **shape), calibration=calibration, progress=False
            )
            formats = ("mixtral",) if shape["shared"] == 0 else ("qwen2_moe", "gguf")
            for mode in ("temperature", "stock routing"):
                for fmt in formats:
                    if mode == "stock routing" and shape["active"] == 1 and fmt != "gguf":
                        continue  # top-1 with renormalisation is already exact
                    if mode == "temperature" and shape["active"] == 1 and fmt != "gguf":
                        mode_name = "exact (top-1)"
                    else:
                        mode_name = mode
                    out = Path(tmp) / (f"{len(rows)}.gguf" if fmt == "gguf" else f"{len(rows)}")
                    started = time.perf_counter()
                    # 512 held-out tokens choose the router temperature (and the GGUF shared gate); validation
                    # below is timed apart. Stock routing exports a converted copy of the carve (the carve
                    # itself is unchanged), and the export is validated against that copy.
                    exported = export(
                        model,
                        out,
                        fmt,
                        tokenizer,
                        validate_data=args.data,
                        validate_tokens=512,
                        validate=False,
                        stock_routing=mode == "stock routing",
                    )
                    seconds = time.perf_counter() - started
                    started = time.perf_counter()
                    reference = model
                    if exported.conversion is not None:
                        reference = stock_routing_copy(model, fmt, exported.temperatures)
                    validation = compare_logits(reference, load_exported(out, fmt), windows)
                    row = {
                        "carve": name,
                        "config": shape,
                        "active_fraction": report.reads,
                        "format": fmt,
                        "mode": mode_name,
                        "export_seconds": seconds,
                        "validation_seconds": time.perf_counter() - started,
                        "temperatures": sorted(set(exported.temperatures.values())),
                        "conversion": exported.conversion,
                        **validation,
                    }
                    rows.append(row)
                    print(
                        f"{name:<34} {fmt:<9} {mode_name:<14} KL {row['kl']:.2e}  agreement {row['agreement']:.4%}  "
                        f"max|dlogit| {row['max_logit_diff']:.3g}  export {row['export_seconds']:.1f} s"
                        + (f"  conversion KL {exported.conversion['kl']:.2e}" if exported.conversion else ""),
                        flush=True,
                    )
            bw.uncarve_(model)
    results = {
        "bench": BENCH.name,
        "machine": machine,
        "settings": {"model": args.model, "data": args.data, "tokens": args.tokens, **base},
        "rows": rows,
    }
    print(BENCH.write(args.out, results))


def render(results: dict) -> str:
    s, machine, rows = results["settings"], results["machine"], results["rows"]
    lines = [
        f"# Export validation ({s['model']})",
        "",
        f"commit `{machine['commit']}`, {machine['date']}, {machine['cpu']}, torch {machine['torch']}; carves: "
        f"activation grouping + fitted router without intercept, calibration wiki 16384 tokens; validation: "
        f"{s['tokens']} tokens of {s['data']}, brickwork forward vs stock transformers reload (fp32)",
        "",
        "| carve | FFN reads | format | routing | KL(brickwork‖exported) | top-1 agreement | max abs logit diff "
        "| export s | conversion KL (agreement) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['carve']} | {r['active_fraction']:.1%} | {r['format']} | {r['mode']} | {r['kl']:.2e} | "
            f"{r['agreement']:.3%} | {r['max_logit_diff']:.3g} | {r['export_seconds']:.1f} | "
            + (
                f"{r['conversion']['kl']:.2e} ({r['conversion']['agreement']:.1%})"
                if r["conversion"]
                else "-"
            )
            + " |"
        )
    return "\n".join(lines)


BENCH = Bench("export_validation", render)


if __name__ == "__main__":
    main()
