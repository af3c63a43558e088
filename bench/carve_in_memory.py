"""Carving within memory: time and peak RSS of a layer-by-layer carve (``carve_sequential``), per step.

(a) **Real model**: carve a cached model (default ``qwen2.5-1.5b``, 28 layers, d_ff 8960, ~7 GB as fp32) at an
active fraction (default 0.5, the measured default configuration ``brickwork carve --active-fraction`` picks),
weights stored in bfloat16. Targets (issue 17): full profile + carve in under 20 minutes on 2 cores, peak RSS
under 12 GB.

(b) **Simulated 8B shape**: a Llama-shaped model with hidden 4096, d_ff 14336, vocabulary 128256 and random bfloat16
weights, written to a temporary safetensors checkpoint tensor by tensor (never held whole), with ``--layers`` decoder
layers (default 2); it is carved the same way and a full carve of ``--project-layers`` (default 32) layers is
projected: the fixed steps once plus the mean per-layer time times the layer count. Peak memory does not grow with
the layer count (each layer is freed before the next is read; the per-layer peaks in the results show it), so the
projected peak is the measured one. Targets: under 60 s per layer, peak under 20 GB.

Every step's peak RSS is its own (Linux resets the peak at each step: ``brickwork.memory``). The real model must be
cached first (``brickwork setup --models qwen2.5-1.5b``): the first use converts its GGUF to fp32 safetensors, which
loads the whole model once and would dominate the peak.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import torch

import brickwork as bw
from brickwork.benchmarks.harness import Bench
from brickwork.carving.presets import recommended
from brickwork.carving.sequential import SequentialReport, carve_sequential
from brickwork.memory import GIB, StepMeter

PER_LAYER_STEPS = ("load", "profile", "forward", "carve", "write")
TARGETS = {
    "real": {"seconds": 20 * 60, "peak_rss_gib": 12},
    "simulated": {"seconds_per_layer": 60, "peak_rss_gib": 20},
}


def _config(args, d_ff: int, d_model: int, gated: bool) -> bw.CarveConfig:
    options = {"calib_tokens": args.calib_tokens} if args.calib_tokens else {}
    if args.experts is not None:
        return bw.CarveConfig(
            experts=args.experts, shared=args.shared or 0, neuron_share=args.active_fraction, **options
        )
    return recommended(args.active_fraction, d_ff=d_ff, d_model=d_model, gated=gated, **options)


def _shapes(location: Path) -> tuple[int, int, bool]:
    from brickwork.models.lazy import open_lazy_model

    first = bw.find_ffns(open_lazy_model(location).model)[0]
    return first.d_ff, first.read().d_model, first.is_gated


def _summary(report: SequentialReport) -> dict:
    meter = StepMeter()
    meter.steps = report.steps
    per_layer: dict[int, dict] = {}
    for step in report.steps:
        if step.layer is not None:
            row = per_layer.setdefault(step.layer, {"layer": step.layer, "seconds": 0.0, "peak_rss": 0})
            row[f"{step.step}_seconds"] = step.seconds
            row["seconds"] += step.seconds
            row["peak_rss"] = max(row["peak_rss"], step.peak_rss)
    fixed = sum(s.seconds for s in report.steps if s.layer is None)
    return {
        "seconds": report.seconds,
        "fixed_seconds": fixed,
        "peak_rss": report.peak_rss,
        "peak_rss_gib": report.peak_rss / GIB,
        "peak_is_lifetime": any(s.peak_is_lifetime for s in report.steps),
        "by_step": meter.by_step(),
        "layers": list(per_layer.values()),
        "active_fraction": report.reads,
        "calibration_tokens": report.calibration_tokens,
        "config": report.config.to_dict(),
        "dtype": report.dtype,
    }


def run_real(args, work: Path) -> dict:
    from brickwork.models.loading import BUNDLED_MODELS, cache_dir

    location = Path(args.model)
    if args.model in BUNDLED_MODELS:
        location = cache_dir() / "models" / args.model
        if not (location / "config.json").is_file():
            raise SystemExit(
                f"{args.model} is not cached: run `brickwork setup --models {args.model}` first (the conversion "
                "loads the whole model once)"
            )
    config = _config(args, *_shapes(location))
    print(
        f"real: {args.model}, {config.experts} experts, {config.shared} shared, {config.active} active",
        flush=True,
    )
    report = carve_sequential(
        args.model, config, args.calib, work / "real-carved", dtype=args.dtype, progress=not args.quiet
    )
    summary = {"model": args.model, **_summary(report)}
    summary["meets_targets"] = {
        "seconds": report.seconds < TARGETS["real"]["seconds"],
        "peak_rss": summary["peak_rss_gib"] < TARGETS["real"]["peak_rss_gib"],
    }
    return summary


@torch.no_grad()
def write_random_checkpoint(
    path: Path, hidden: int, d_ff: int, layers: int, vocab: int, seed: int = 0
) -> None:
    """A Llama-shaped model with random bfloat16 weights, written tensor by tensor (never held whole)."""
    import transformers
    from accelerate import init_empty_weights

    from brickwork.carving.stream_writer import SafetensorsStreamWriter

    heads = max(1, hidden // 128)
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=d_ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        vocab_size=vocab,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with init_empty_weights():
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    config.dtype = torch.bfloat16
    config.save_pretrained(path)
    generator = torch.Generator().manual_seed(seed)
    with SafetensorsStreamWriter(path / "model.safetensors", {"format": "pt"}) as writer:
        for name, param in skeleton.named_parameters():
            if name.endswith("norm.weight"):
                value = torch.ones(param.shape, dtype=torch.bfloat16)
            else:  # row by row: float32 scratch of one block of rows, not the whole matrix
                value = torch.empty(param.shape, dtype=torch.bfloat16)
                for start in range(0, param.shape[0], 8192):
                    block = torch.randn(
                        (min(8192, param.shape[0] - start), *param.shape[1:]), generator=generator
                    )
                    value[start : start + len(block)] = (block * 0.02).to(torch.bfloat16)
            writer.add(name, value)
            del value
    from brickwork.models.tiny import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(path)  # character ids < 128: any vocabulary takes them


def _calibration_text(path: Path, tokens: int) -> Path:
    words = [
        "the",
        "river",
        "stone",
        "brick",
        "neuron",
        "layer",
        "bread",
        "salt",
        "window",
        "expert",
        "token",
    ]
    rng = random.Random(0)
    text, size = [], 0
    while size < tokens * 1.2:  # the simulation's tokenizer is one token per character
        word = rng.choice(words)
        text.append(word)
        size += len(word) + 1
    path.write_text(" ".join(text) + "\n")
    return path


def run_simulated(args, work: Path) -> dict:
    checkpoint = work / "simulated"
    meter = StepMeter()
    with meter.step("write random checkpoint"):
        write_random_checkpoint(
            checkpoint, args.simulate_hidden, args.simulate_dff, args.layers, args.simulate_vocab
        )
    written = meter.steps[0]
    config = _config(args, args.simulate_dff, args.simulate_hidden, True)
    calib = _calibration_text(work / "calibration.txt", config.calib_tokens)
    print(
        f"simulated: hidden {args.simulate_hidden}, d_ff {args.simulate_dff}, {args.layers} layers; "
        f"{config.experts} experts, {config.shared} shared, {config.active} active",
        flush=True,
    )
    report = carve_sequential(
        checkpoint, config, calib, work / "simulated-carved", dtype=args.dtype, progress=not args.quiet
    )
    summary = _summary(report)
    per_layer = [row["seconds"] for row in summary["layers"]]
    mean_layer = sum(per_layer) / len(per_layer)
    projected = summary["fixed_seconds"] + mean_layer * args.project_layers
    summary.update(
        {
            "shape": {
                "hidden": args.simulate_hidden,
                "d_ff": args.simulate_dff,
                "vocab": args.simulate_vocab,
                "layers": args.layers,
            },
            "checkpoint_write_seconds": written.seconds,
            "checkpoint_write_peak_rss_gib": written.peak_rss / GIB,
            "seconds_per_layer": mean_layer,
            "projected_layers": args.project_layers,
            "projected_seconds": projected,
            "projected_peak_rss_gib": summary["peak_rss_gib"],
            "meets_targets": {
                "seconds_per_layer": mean_layer < TARGETS["simulated"]["seconds_per_layer"],
                "peak_rss": summary["peak_rss_gib"] < TARGETS["simulated"]["peak_rss_gib"],
            },
        }
    )
    return summary


def _table(title: str, summary: dict) -> list[str]:
    lines = [
        f"### {title}",
        "",
        f"{summary['seconds']:.1f} s in all ({summary['fixed_seconds']:.1f} s outside the layers), peak RSS "
        f"{summary['peak_rss_gib']:.2f} GiB{' (process lifetime)' if summary['peak_is_lifetime'] else ''}; "
        f"weights stored in {summary['dtype']}; {summary['calibration_tokens']} calibration tokens; FFN weights read "
        f"per token {summary['active_fraction']:.1%}",
        "",
        "| step | count | total s | max s | peak RSS GiB |",
        "|---|---|---|---|---|",
    ]
    for step, row in summary["by_step"].items():
        lines.append(
            f"| {step} | {row['count']} | {row['seconds']:.1f} | {row['max_seconds']:.1f} | "
            f"{row['peak_rss'] / GIB:.2f} |"
        )
    lines += [
        "",
        "| layer | " + " | ".join(f"{s} s" for s in PER_LAYER_STEPS) + " | total s | peak RSS GiB |",
    ]
    lines.append("|---" * (len(PER_LAYER_STEPS) + 3) + "|")
    for row in summary["layers"]:
        cells = " | ".join(
            f"{row[f'{s}_seconds']:.1f}" if f"{s}_seconds" in row else "" for s in PER_LAYER_STEPS
        )
        lines.append(f"| {row['layer']} | {cells} | {row['seconds']:.1f} | {row['peak_rss'] / GIB:.2f} |")
    return lines + [""]


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/carve-in-memory", raw=True)
    parser.add_argument("--model", default="qwen2.5-1.5b", help="cached alias or safetensors directory")
    parser.add_argument("--skip-real", action="store_true", help="only the simulated shape")
    parser.add_argument("--skip-simulation", action="store_true", help="only the real model")
    parser.add_argument("--active-fraction", type=float, default=0.5)
    parser.add_argument("--experts", type=int, help="an expert-level carve instead of the measured default")
    parser.add_argument("--shared", type=int, help="with --experts: shared experts (default 0)")
    parser.add_argument("--calib", default="wiki", help="calibration text of the real model")
    parser.add_argument("--calib-tokens", type=int, help="calibration tokens (default CarveConfig's)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--simulate-hidden", type=int, default=4096)
    parser.add_argument("--simulate-dff", type=int, default=14336)
    parser.add_argument("--simulate-vocab", type=int, default=128256)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the simulated model")
    parser.add_argument("--project-layers", type=int, default=32, help="layers of the full carve projected")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--keep-carve", type=Path, help="move the real model's carve here (to evaluate it)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)

    results: dict = {
        "bench": BENCH.name,
        "machine": BENCH.start()["machine"],
        "settings": {k: str(v) for k, v in vars(args).items()},
        "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="carve-in-memory-", dir=args.work) as scratch:
        work = Path(scratch)
        if not args.skip_real:
            results["real"] = run_real(args, work)
            if args.keep_carve:
                shutil.move(work / "real-carved", args.keep_carve)
        if not args.skip_simulation:
            results["simulated"] = run_simulated(args, work)
    print(BENCH.write(args.out, results))


def render(results: dict) -> str:
    machine, s = results["machine"], results["settings"]
    targets = results["targets"]
    lines = [
        "# Carving within memory (carve_sequential)",
        "",
        f"commit {machine['commit']}, {machine['date']}; {machine['cpu']} ({machine['torch_cpu_capability']}), "
        f"{machine['torch_threads']} threads; torch {machine['torch']}",
        "",
    ]
    if "real" in results:
        real = results["real"]
        lines += _table(f"(a) {s['model']} at {float(s['active_fraction']):.0%}", real)
        lines += [
            f"Targets: under {targets['real']['seconds'] // 60} min ({real['meets_targets']['seconds']}), peak RSS "
            f"under {targets['real']['peak_rss_gib']} GB ({real['meets_targets']['peak_rss']}).",
            "",
        ]
    if "simulated" in results:
        sim = results["simulated"]
        shape = sim["shape"]
        lines += _table(
            f"(b) simulated shape: hidden {shape['hidden']}, d_ff {shape['d_ff']}, vocab {shape['vocab']}, "
            f"{shape['layers']} layers",
            sim,
        )
        lines += [
            f"Projected {sim['projected_layers']}-layer carve: {sim['projected_seconds'] / 60:.1f} min "
            f"({sim['seconds_per_layer']:.1f} s per layer; target under "
            f"{targets['simulated']['seconds_per_layer']} s: {sim['meets_targets']['seconds_per_layer']}), "
            f"peak RSS {sim['projected_peak_rss_gib']:.2f} GiB (target under "
            f"{targets['simulated']['peak_rss_gib']} GB: {sim['meets_targets']['peak_rss']}).",
            "",
        ]
        lines.append(
            f"Writing the simulated checkpoint (not part of the carve): {sim['checkpoint_write_seconds']:.1f} s, "
            f"peak RSS {sim['checkpoint_write_peak_rss_gib']:.2f} GiB."
        )
    return "\n".join(lines)


BENCH = Bench("carve_in_memory", render)


if __name__ == "__main__":
    main()
