"""Recovery on SmolLM2: held-out quality of carved configurations before and after local (and e2e) recovery.

Each configuration is carved from one shared calibration pass, scored on held-out windows against the dense
model's cached log-probabilities, recovered, and scored again. Local recovery refits each layer in closed form
on calibration text (wiki); e2e then distils the dense parent into the locally recovered model for a token
budget. Writes results.json / results.md; `bench/results/quality-smollm2` merges the rows with --merge.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path

import torch

import brickwork as bw
from brickwork.benchmarks.common import CONFIG_KEYS as KEYS
from brickwork.benchmarks.harness import Bench, settings_of
from brickwork.benchmarks.quality import HeldOut
from brickwork.carving import calibrate
from brickwork.carving.presets import recommended, stock_recommended
from brickwork.recovery import LocalRecoveryConfig, recover_local_
from brickwork.recovery.e2e import E2EConfig, recover_e2e_


@contextlib.contextmanager
def _exact_matmuls(tf32: bool = False):
    """fp32 matrix products in full precision (scoring), or TF32 on a GPU that has it (``--tf32`` training)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class _Curve:
    """An e2e callback scoring the held-out windows at chosen token counts, its own time kept apart."""

    def __init__(self, heldout: list, config: E2EConfig, tokens: list[int]):
        self.heldout, self.per_step = heldout, config.window * config.batch_size
        self.marks = {max(1, t // self.per_step) for t in tokens}
        self.points: list[dict] = []
        self.scoring = 0.0
        self.started = time.perf_counter()

    def __call__(self, done: int, model) -> None:
        if done not in self.marks:
            return
        t0 = time.perf_counter()
        elapsed = t0 - self.started - self.scoring  # training time so far
        model.eval()
        with torch.no_grad(), _exact_matmuls():
            point = {h.data: h.score(model) for h in self.heldout}
        model.train()
        self.scoring += time.perf_counter() - t0
        self.points.append({"tokens": done * self.per_step, "heldout": point, "seconds": elapsed})
        ratios = "; ".join(f"{d} x{point[d]['ratio']:.3f}" for d in point)
        print(f"  e2e {done * self.per_step} tokens ({elapsed:.0f} s): {ratios}", flush=True)


def render(results: dict) -> str:
    s, machine, rows = results["settings"], results["machine"], results["rows"]
    corpora = s["eval"]
    lines = [
        f"# Recovery ({Path(str(s['model'])).name})",
        "",
        f"commit `{machine['commit']}`, {machine['date']}, {machine.get('device') or machine['cpu']}; held-out "
        f"{s['eval_tokens']} tokens per corpus; local recovery on {s['local_tokens']} wiki tokens; e2e budget "
        f"{max(s['e2e_tokens'], default=0)} tokens (lr {s['e2e_lr']}, {s['e2e_batch']} x {s['e2e_window']})",
        "",
        "| configuration | reads | "
        + " | ".join(f"{c} before / local / e2e" for c in corpora)
        + " | local s | e2e s |",
        "|---|---:|" + "---:|" * (len(corpora) + 2),
    ]
    for r in rows:
        cells = []
        for c in corpora:
            e2e = f"x{r['e2e']['heldout'][c]['ratio']:.3f}" if "e2e" in r else "-"
            cells.append(f"x{r['before'][c]['ratio']:.3f} / x{r['local']['heldout'][c]['ratio']:.3f} / {e2e}")
        lines.append(
            f"| {r['name']} | {r['active_fraction']:.1%} | "
            + " | ".join(cells)
            + f" | {r['local']['seconds']:.0f} | {r['e2e']['seconds'] if 'e2e' in r else 0:.0f} |"
        )
    curves = [r for r in rows if "e2e" in r and len(r["e2e"]["curve"]) > 1]
    if curves:
        lines += ["", "e2e held-out ratio by distillation tokens (training seconds):", ""]
        lines += [
            "| configuration | tokens | " + " | ".join(corpora) + " | s |",
            "|---|---:|" + "---:|" * (len(corpora) + 1),
        ]
        for r in curves:
            for point in r["e2e"]["curve"]:
                lines.append(
                    f"| {r['name']} | {point['tokens']} | "
                    + " | ".join(f"x{point['heldout'][c]['ratio']:.3f}" for c in corpora)
                    + f" | {point['seconds']:.0f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/recovery")
    parser.add_argument("--model", default="smollm2-135m", help="alias, model directory or .gguf file")
    parser.add_argument(
        "--device", default="cpu", help="where recovery and scoring run (carving runs on the CPU)"
    )
    parser.add_argument("--eval", nargs="+", default=["botchan", "lee-news"])
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument(
        "--local-tokens", type=int, default=LocalRecoveryConfig.tokens, help="0: no local recovery before e2e"
    )
    parser.add_argument(
        "--e2e-tokens",
        type=int,
        nargs="*",
        default=[],
        help="e2e after local: held-out scores at each of these token counts, the largest is the budget",
    )
    parser.add_argument(
        "--e2e-configs", nargs="*", default=["neuron-level default 50%"], help="'all' for every one"
    )
    parser.add_argument("--e2e-lr", type=float, default=E2EConfig.lr)
    parser.add_argument("--e2e-window", type=int, default=E2EConfig.window)
    parser.add_argument("--e2e-batch", type=int, default=E2EConfig.batch_size)
    parser.add_argument("--tf32", action="store_true", help="TF32 matrix products while training on a GPU")
    parser.add_argument("--configs", nargs="*", help="only these configurations (names as printed)")
    parser.add_argument(
        "--merge-into",
        type=Path,
        help="a quality benchmark directory to add the recovered rows to (re-rendered)",
    )
    parser.add_argument(
        "--merge-only",
        type=Path,
        nargs="+",
        help="merge these recovery results.json files into --merge-into, running nothing",
    )
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    if args.merge_only:
        if not args.merge_into:
            parser.error("--merge-only needs --merge-into")
        _merge(args.merge_into, [json.loads(f.read_text()) for f in args.merge_only])
        return
    machine = BENCH.start()["machine"]
    device = torch.device(args.device)
    if device.type == "cuda":
        machine["device"] = torch.cuda.get_device_name(device)
    model, tokenizer = bw.load_model(args.model)  # carving (calibration, grouping, router fits) on the CPU
    parent = copy.deepcopy(model).to(device)
    heldout = [HeldOut(tokenizer, d, args.eval_tokens, 512) for d in args.eval]
    for h in heldout:
        h.cache_dense(parent)
    calibration = calibrate(model, tokenizer, "wiki", bw.CarveConfig())
    configs = {}
    for fraction in (0.25, 0.5):
        c = recommended(fraction, d_ff=1536, d_model=576)
        configs[f"neuron-level default {fraction:.0%}"] = {k: v for k, v in c.to_dict().items() if k in KEYS}
        configs[f"activation+fitted (2+{round(fraction * 16) - 2} of 16)"] = dict(
            experts=16, shared=2, active=round(fraction * 16) - 2, method="activation", router="fitted"
        )
        for combine in ("softmax", "sigmoid"):  # carve --stock [--combine sigmoid]: exact stock exports
            stock = stock_recommended(fraction, d_ff=1536, combine=combine)
            configs[f"stock {stock.shared}+{stock.active} of {stock.experts}, {combine}"] = {
                k: v for k, v in stock.to_dict().items() if k in KEYS
            }
    if args.configs:
        configs = {k: v for k, v in configs.items() if k in args.configs}
    rows = []
    for name, kwargs in configs.items():
        report = bw.carve_(model, bw.CarveConfig(**kwargs), calibration=calibration, progress=False)
        work = copy.deepcopy(model).to(device)
        bw.uncarve_(model)
        with torch.no_grad():
            before = {h.data: h.score(work) for h in heldout}
        started = time.perf_counter()
        layers = []
        if args.local_tokens:  # 0: e2e starts from the training-free carve
            local = recover_local_(work, tokenizer, "wiki", LocalRecoveryConfig(tokens=args.local_tokens))
            layers = [vars(x) for x in local.layers]
        local_seconds = time.perf_counter() - started
        with torch.no_grad():
            after = {h.data: h.score(work) for h in heldout} if layers else before
        row = {
            "name": name,
            "config": kwargs,
            "active_fraction": report.reads,
            "before": before,
            "local": {"heldout": after, "seconds": local_seconds, "layers": layers},
        }
        print(
            f"{name}: reads {report.reads:.1%}; "
            + "; ".join(f"{d} x{before[d]['ratio']:.3f} -> x{after[d]['ratio']:.3f}" for d in before)
            + f" (local {local_seconds:.0f} s)",
            flush=True,
        )
        if args.e2e_tokens and ("all" in args.e2e_configs or name in args.e2e_configs):
            e2e_config = E2EConfig(
                tokens=max(args.e2e_tokens), lr=args.e2e_lr, window=args.e2e_window, batch_size=args.e2e_batch
            )
            curve = _Curve(heldout, e2e_config, args.e2e_tokens)
            with _exact_matmuls(args.tf32):
                e2e = recover_e2e_(
                    work, parent, tokenizer, "wiki", e2e_config, callback=curve, progress=False
                )
            row["e2e"] = {
                "heldout": curve.points[-1]["heldout"],
                "curve": curve.points,
                "seconds": e2e["seconds"] - curve.scoring,
                "steps": e2e["steps"],
                "tokens": e2e["steps"] * e2e["tokens_per_step"],
                "lr": args.e2e_lr,
                "tf32": args.tf32,
                "losses": e2e["losses"],
            }
            print(f"  + e2e {row['e2e']['seconds']:.0f} s training", flush=True)
        rows.append(row)
        del work
        results = {"bench": BENCH.name, "machine": machine, "settings": settings_of(args), "rows": rows}
        table = BENCH.write(args.out, results)  # after every row: a cut-off run keeps them
    print(table)
    if args.merge_into:
        _merge(args.merge_into, [results])


def _merge(directory: Path, recoveries: list[dict]) -> None:
    from brickwork.benchmarks.quality import merge_recovery, write

    quality = json.loads((directory / "results.json").read_text())
    write(merge_recovery(quality, *recoveries), directory)


BENCH = Bench("recovery", render)

if __name__ == "__main__":
    main()
