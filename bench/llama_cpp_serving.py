"""Carved models in llama.cpp itself: quality of the exported GGUF files against brickwork's own forward, greedy
generation, and decode / prompt speed against the dense model at the same dtype.

For the dense parent (converted by llama.cpp's own ``convert_hf_to_gguf.py``) and each carved model (exported by
``brickwork export --format gguf``), at f32, f16 and Q8_0 (``llama-quantize``, llama.cpp's own quantiser):

- perplexity on the same held-out token windows (transformers' tokenization, every position of each window
  scored), computed by llama.cpp through its Python binding with an f32 KV cache and with llama.cpp's default
  f16 KV cache, against brickwork's forward of the carve in fp32; and the KL of llama.cpp's next-token
  distribution from brickwork's, with the share of tokens whose top-1 agrees;
- greedy continuations of a few prompts in both (llama.cpp f32 weights, f32 KV cache);
- ``llama-bench`` decode (tg) and prompt (pp) speed at the same thread count, files interleaved round by round,
  medians over rounds.

Needs llama.cpp built by ``scripts/build_llama_cpp.sh`` (or ``--llama-cpp DIR`` holding ``bin/``, ``llama_cpp/``,
``convert_hf_to_gguf.py`` and ``gguf-py/``) and the ``llama-cpp`` extra (``pip install -e .[llama-cpp]``).

    python bench/llama_cpp_serving.py --carved runs/a runs/b --out bench/results/llama-cpp-smollm2
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import brickwork as bw
from brickwork.benchmarks.harness import Bench, import_package
from brickwork.bricks.state import carved_layers
from brickwork.data.sources import token_windows
from brickwork.errors import BrickworkError

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = (
    "The capital of France is",
    "Once upon a time, a little fox",
    "The main reason people drink water is",
)
DTYPES = ("f32", "f16", "q8_0")


def llama_cpp_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_llama_cpp.sh")], capture_output=True, text=True, check=False
    )
    if built.returncode:
        raise BrickworkError(f"building llama.cpp failed:\n{built.stderr[-2000:]}")
    return Path(built.stdout.strip().splitlines()[-1])


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise BrickworkError(f"{' '.join(map(str, cmd[:3]))} ... failed:\n{done.stderr[-3000:]}")
    return done


# --- the files ---------------------------------------------------------------------------------------------------
def dense_ggufs(lcpp: Path, model_name: str, work: Path) -> dict[str, Path]:
    """The dense parent as llama.cpp's own converter writes it (f32, f16), and Q8_0 by llama-quantize."""
    model, tokenizer = bw.load_model(model_name, progress=False)
    folder = work / "dense-hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = {}
    env = dict(os.environ, PYTHONPATH=str(lcpp / "gguf-py"))
    for dtype in ("f32", "f16"):
        out[dtype] = work / f"dense-{dtype}.gguf"
        run(
            [
                sys.executable,
                lcpp / "convert_hf_to_gguf.py",
                folder,
                "--outtype",
                dtype,
                "--outfile",
                out[dtype],
            ],
            env=env,
        )
    out["q8_0"] = quantize(lcpp, out["f32"], work / "dense-q8_0.gguf")
    return out


def quantize(lcpp: Path, source: Path, target: Path) -> Path:
    run([lcpp / "bin" / "llama-quantize", source, target, "Q8_0"])
    return target


def carved_ggufs(lcpp: Path, carved: Path, tokenizer, data: str, work: Path) -> tuple[dict[str, Path], dict]:
    from brickwork.io.export import export

    model = bw.load(carved)
    out, reports = {}, {}
    for dtype, torch_dtype in (("f32", "float32"), ("f16", "float16")):
        out[dtype] = work / f"{carved.name}-{dtype}.gguf"
        report = export(
            model, out[dtype], "gguf", tokenizer, validate_data=data, validate_tokens=2048, dtype=torch_dtype
        )
        reports[dtype] = report.validation
    out["q8_0"] = quantize(lcpp, out["f32"], work / f"{carved.name}-q8_0.gguf")
    return out, reports


def carve_here(
    model, tokenizer, specs: list[str], calib: str, work: Path, calib_tokens: int = 16384
) -> list[Path]:
    """Carve ``model`` as each spec says (one calibration pass), save each under ``work``; return the folders."""
    from dataclasses import replace

    from brickwork.carving import calibrate
    from brickwork.models.specs import find_ffns

    ffn = find_ffns(model)[0]
    shapes = {"d_ff": ffn.d_ff, "d_model": ffn.read().d_model, "gated": ffn.is_gated}
    configs = [
        replace(
            bw.CarveConfig.from_string(spec, **shapes),
            calib_tokens=calib_tokens,
            router_samples=min(8192, calib_tokens),
        )
        for spec in specs
    ]
    calibration = calibrate(model, tokenizer, calib, configs[0])
    out = []
    for config in configs:
        bw.carve_(model, config, calibration=calibration)
        folder = work / f"e{config.experts}-s{config.shared}-k{config.active}-{config.combine}"
        bw.save(model, folder, tokenizer, overwrite=True)
        bw.uncarve_(model)
        out.append(folder)
    return out


# --- quality -----------------------------------------------------------------------------------------------------
def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@torch.no_grad()
def brickwork_logprobs(model, windows: torch.Tensor) -> list[np.ndarray]:
    """Per window, ``[window - 1, vocab]`` float64 log-probabilities of brickwork's forward (fp32)."""
    out = []
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].double().numpy()
        out.append(_log_softmax(logits))
    return out


def llama_logprobs(llm, windows: torch.Tensor) -> list[np.ndarray]:
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        out.append(_log_softmax(logits))
    return out


def compare(reference: list[np.ndarray], other: list[np.ndarray], windows: torch.Tensor) -> dict:
    nll_ref = nll_other = kl = agree = n = 0.0
    for ref, oth, w in zip(reference, other, windows, strict=True):
        target = w[1:].numpy()
        rows = np.arange(len(target))
        nll_ref -= ref[rows, target].sum()
        nll_other -= oth[rows, target].sum()
        kl += (np.exp(ref) * (ref - oth)).sum()
        agree += (ref.argmax(-1) == oth.argmax(-1)).sum()
        n += len(target)
    ppl_ref, ppl_other = float(np.exp(nll_ref / n)), float(np.exp(nll_other / n))
    return {
        "brickwork_perplexity": ppl_ref,
        "llama_cpp_perplexity": ppl_other,
        "perplexity_gap": ppl_other / ppl_ref - 1,
        "kl": float(kl / n),
        "top1_agreement": float(agree / n),
        "tokens": int(n),
    }


def open_llama(path: Path, window: int, threads: int, kv: str):
    import llama_cpp

    kv_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv]
    return llama_cpp.Llama(
        str(path),
        n_ctx=window,
        n_batch=window,
        logits_all=True,
        n_threads=threads,
        verbose=False,
        type_k=kv_type,
        type_v=kv_type,
    )


def greedy_llama(llm, tokenizer, new_tokens: int) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        llm.reset()
        generated = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            generated.append(int(token))
            if len(generated) == new_tokens or token == llm.token_eos():
                break
        out.append(generated)
    return out


@torch.no_grad()
def greedy_brickwork(model, tokenizer, new_tokens: int) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        # both stop at the end-of-sequence token (forcing a length would forbid it here and not in llama.cpp)
        full = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        out.append(full[0, ids.shape[1] :].tolist())
    return out


# --- speed -------------------------------------------------------------------------------------------------------
def bench_speed(
    lcpp: Path, files: dict[str, Path], threads: int, rounds: int, prompt: int, decode: int
) -> dict:
    """llama-bench tg/pp tokens per second per file: one repetition per file per round, files interleaved."""
    samples: dict[str, dict[str, list[float]]] = {name: {"tg": [], "pp": []} for name in files}
    for _ in range(rounds):
        for name, path in files.items():
            done = run(
                [
                    lcpp / "bin" / "llama-bench",
                    "-m",
                    path,
                    "-t",
                    threads,
                    "-p",
                    prompt,
                    "-n",
                    decode,
                    "-r",
                    1,
                    "-o",
                    "json",
                ]
            )
            for test in json.loads(done.stdout):
                kind = "pp" if test["n_prompt"] else "tg"
                samples[name][kind].append(float(test["avg_ts"]))
    return {
        name: {kind: statistics.median(v) for kind, v in s.items()} | {"samples": s}
        for name, s in samples.items()
    }


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/llama-cpp-smollm2", raw=True)
    parser.add_argument("--carved", nargs="*", type=Path, default=[], help="carved model folders (bw.save)")
    parser.add_argument(
        "--carve",
        action="append",
        default=[],
        help="carve the dense model here (repeatable; one calibration for all), a carve string "
        "(CarveConfig.from_string): e.g. experts=64,shared=8,active=24,router.intercept=false,combine=softmax",
    )
    parser.add_argument("--calib", default="wiki", help="calibration text of --carve")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens of --carve")
    parser.add_argument(
        "--quality-only",
        action="store_true",
        help="only the f32 and f16 files' agreement with brickwork (no Q8_0, greedy text or llama-bench)",
    )
    parser.add_argument("--model", default="smollm2-135m", help="the dense parent")
    parser.add_argument("--data", default="botchan")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens for perplexity")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="llama-bench rounds (files interleaved)")
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per prompt")
    parser.add_argument(
        "--llama-cpp", type=Path, help="a llama.cpp build (default: scripts/build_llama_cpp.sh)"
    )
    parser.add_argument("--keep", type=Path, help="keep the GGUF files here")
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)

    started_results = BENCH.start(args)
    lcpp = llama_cpp_dir(args.llama_cpp)
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lcpp / "bin")
    import_package(lcpp, "llama_cpp")  # the binding of the same llama.cpp
    torch.set_num_threads(args.threads)
    dense_model, tokenizer = bw.load_model(args.model, progress=False)
    windows = token_windows(tokenizer, args.data, args.window, args.tokens)
    work = args.keep or Path(tempfile.mkdtemp(prefix="brickwork-llama-cpp-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if args.carve:
        args.carved = [
            *args.carved,
            *carve_here(dense_model, tokenizer, args.carve, args.calib, work, args.calib_tokens),
        ]
    if not args.carved:
        parser.error("give carved models (--carved) or configurations to carve (--carve)")
    models = {} if args.quality_only else {"dense": (dense_model, dense_ggufs(lcpp, args.model, work), None)}
    for carved in args.carved:
        files, export_checks = carved_ggufs(lcpp, carved, tokenizer, args.data, work)
        models[carved.name] = (bw.load(carved), files, export_checks)

    results: dict = {
        "bench": started_results["bench"],
        "machine": started_results["machine"],
        "settings": vars(args)
        | {"llama_cpp": (lcpp / "SOURCE").read_text().strip() if (lcpp / "SOURCE").exists() else str(lcpp)},
        "models": {},
    }
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in results["settings"].items()}
    results["settings"]["carved"] = [str(c) for c in args.carved]
    for name, (model, files, export_checks) in models.items():
        model.eval()
        reference = brickwork_logprobs(model, windows)
        entry: dict = {"files": {d: p.name for d, p in files.items()}, "export_validation": export_checks}
        bricks = carved_layers(model)
        if bricks:
            brick = next(iter(bricks.values()))
            entry["carve"] = {
                "experts": brick.num_experts,
                "shared_neurons": brick.num_shared,
                "expert_size": brick.expert_size,
                "active": brick.active,
                "combine": brick.combine.rule,
                "active_fraction": sum(b.read_fraction() for b in bricks.values()) / len(bricks),
            }
        quality = {}
        for dtype, path in files.items():
            for kv in ("f32", "f16"):
                llm = open_llama(path, args.window, args.threads, kv)
                quality[f"{dtype}/kv-{kv}"] = compare(reference, llama_logprobs(llm, windows), windows)
                print(name, dtype, kv, quality[f"{dtype}/kv-{kv}"], flush=True)
                del llm
        entry["quality"] = quality
        if args.quality_only:
            results["models"][name] = entry
            BENCH.write(args.out, results, plots=False)
            continue
        llm = open_llama(files["f32"], args.window, args.threads, "f32")
        ours, theirs = (
            greedy_brickwork(model, tokenizer, args.new_tokens),
            greedy_llama(llm, tokenizer, args.new_tokens),
        )
        del llm
        entry["greedy"] = {
            "same": [a == b for a, b in zip(ours, theirs, strict=True)],
            "brickwork": [tokenizer.decode(t) for t in ours],
            "llama_cpp": [tokenizer.decode(t) for t in theirs],
        }
        results["models"][name] = entry
        BENCH.write(args.out, results, plots=False)

    if args.quality_only:
        print(render(results))
        return
    files = {f"{name}/{dtype}": path for name, (_, fs, _) in models.items() for dtype, path in fs.items()}
    speed = bench_speed(lcpp, files, args.threads, args.rounds, prompt=128, decode=64)
    for name in models:
        for dtype in DTYPES:
            s, dense = speed[f"{name}/{dtype}"], speed[f"dense/{dtype}"]
            results["models"][name].setdefault("speed", {})[dtype] = {
                "tg": s["tg"],
                "pp": s["pp"],
                "tg_vs_dense": s["tg"] / dense["tg"],
                "pp_vs_dense": s["pp"] / dense["pp"],
                "samples": s["samples"],
            }
    results["seconds"] = time.perf_counter() - started
    print(BENCH.write(args.out, results))


def render(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    lines = [
        f"# Carved {s['model']} in llama.cpp",
        "",
        f"commit `{m['commit']}`, {m['date']}, {m['cpu']} ({', '.join(m.get('cpu_flags', []))}); {s['llama_cpp']}; "
        f"{s['threads']} threads; `{s['data']}` {s['tokens']} tokens in windows of {s['window']} (transformers' "
        "tokenization, every position scored)",
        "",
        "## Quality: llama.cpp against brickwork's own forward of the same model (fp32), same windows",
        "",
        "| model | FFN reads | GGUF | KV cache | brickwork ppl | llama.cpp ppl | gap | KL | top-1 agree |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, e in results["models"].items():
        reads = f"{e['carve']['active_fraction']:.1%}" if "carve" in e else "100%"
        for key, q in e["quality"].items():
            dtype, kv = key.split("/")
            lines.append(
                f"| {name} | {reads} | {dtype} | {kv[3:]} | {q['brickwork_perplexity']:.3f} | "
                f"{q['llama_cpp_perplexity']:.3f} | {q['perplexity_gap']:+.2%} | {q['kl']:.2e} | "
                f"{q['top1_agreement']:.2%} |"
            )
    if any("speed" in e for e in results["models"].values()):
        lines += [
            "",
            f"## Speed: llama-bench, {s['threads']} threads, medians of {s['rounds']} interleaved rounds "
            "(tg64 decode, pp128 prompt; tokens/s)",
            "",
            "| model | GGUF | decode tok/s | x dense | prompt tok/s | x dense |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, e in results["models"].items():
            for dtype, sp in e.get("speed", {}).items():
                lines.append(
                    f"| {name} | {dtype} | {sp['tg']:.1f} | x{sp['tg_vs_dense']:.2f} | {sp['pp']:.0f} | "
                    f"x{sp['pp_vs_dense']:.2f} |"
                )
    if any("greedy" in e for e in results["models"].values()):
        lines += ["", "## Greedy continuations (llama.cpp f32, KV f32) equal to brickwork's", ""]
    for name, e in results["models"].items():
        if "greedy" not in e:
            continue
        same = e["greedy"]["same"]
        lines.append(f"- {name}: {sum(same)}/{len(same)} prompts identical")
        for ours, theirs, ok in zip(e["greedy"]["brickwork"], e["greedy"]["llama_cpp"], same, strict=True):
            if not ok:
                lines.append(f"  - brickwork: {ours!r}; llama.cpp: {theirs!r}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    if not any("speed" in e for e in results["models"].values()):  # --quality-only: nothing to plot
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dense_ppl = {
        d: results["models"]["dense"]["quality"][f"{d}/kv-f16"]["llama_cpp_perplexity"] for d in DTYPES
    }
    for dtype, marker in zip(DTYPES, "osD", strict=True):
        xs, ys, names = [], [], []
        for name, e in results["models"].items():
            if "speed" not in e:
                continue
            xs.append(e["speed"][dtype]["tg_vs_dense"])
            ys.append(e["quality"][f"{dtype}/kv-f16"]["llama_cpp_perplexity"] / dense_ppl[dtype])
            names.append(name)
        ax.scatter(xs, ys, marker=marker, label=dtype)
        for x, y, n in zip(xs, ys, names, strict=True):
            ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("llama.cpp batch-1 decode speed, x dense at the same dtype")
    ax.set_ylabel("perplexity in llama.cpp / dense (default f16 KV cache)")
    ax.set_yscale("log")
    ax.set_title(f"Carved {results['settings']['model']} in llama.cpp")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BENCH = Bench("llama_cpp_serving", render, plots={"quality-vs-speed.png": plot})

if __name__ == "__main__":
    main()
