"""Recovery on SmolLM2: held-out quality of carved configurations before and after local (and e2e) recovery.

Each configuration is carved from one shared calibration pass, scored on held-out windows against the dense
model's cached log-probabilities, recovered, and scored again. Local recovery refits each layer in closed form
on calibration text (wiki); e2e then distils the dense parent into the locally recovered model for a token
budget. Writes results.json / results.md; `bench/results/quality-smollm2` merges the rows with --merge.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info, write_results  # noqa: E402

import brickwork as bw  # noqa: E402
from brickwork.benchmarks.quality import HeldOut  # noqa: E402
from brickwork.bricks import calibrate  # noqa: E402
from brickwork.bricks.presets import recommended  # noqa: E402
from brickwork.recovery import LocalRecoveryConfig, recover_local_  # noqa: E402
from brickwork.recovery.e2e import E2EConfig, recover_e2e_  # noqa: E402

KEYS = ("experts", "shared", "active", "method", "router", "router_options", "down_fraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval", nargs="+", default=["botchan", "lee-news"])
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--local-tokens", type=int, default=4096)
    parser.add_argument("--e2e-tokens", type=int, default=0, help="e2e budget after local (0: no e2e)")
    parser.add_argument("--e2e-configs", nargs="*", default=["neuron-level default 50%"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/recovery"))
    parser.add_argument(
        "--merge-into",
        type=Path,
        help="a quality benchmark directory to add the recovered rows to (re-rendered)",
    )
    args = parser.parse_args()
    machine = machine_info()
    model, tokenizer = bw.load_model(args.model)
    parent = copy.deepcopy(model)
    heldout = [HeldOut(tokenizer, d, args.eval_tokens, 512) for d in args.eval]
    for h in heldout:
        h.cache_dense(model)
    calibration = calibrate(model, tokenizer, "wiki", bw.CarveConfig())
    configs = {}
    for fraction in (0.25, 0.5):
        c = recommended(fraction, d_ff=1536, d_model=576)
        configs[f"neuron-level default {fraction:.0%}"] = {k: v for k, v in c.to_dict().items() if k in KEYS}
        configs[f"activation+fitted (2+{round(fraction * 16) - 2} of 16)"] = dict(
            experts=16, shared=2, active=round(fraction * 16) - 2, method="activation", router="fitted"
        )
    rows = []
    for name, kwargs in configs.items():
        report = bw.carve_(model, bw.CarveConfig(**kwargs), calibration=calibration, progress=False)
        with torch.no_grad():
            before = {h.data: h.score(model) for h in heldout}
        started = time.perf_counter()
        local = recover_local_(model, tokenizer, "wiki", LocalRecoveryConfig(tokens=args.local_tokens))
        local_seconds = time.perf_counter() - started
        with torch.no_grad():
            after = {h.data: h.score(model) for h in heldout}
        row = {
            "name": name,
            "config": kwargs,
            "active_fraction": report.active_fraction,
            "before": before,
            "local": {"heldout": after, "seconds": local_seconds, "layers": [vars(x) for x in local.layers]},
        }
        print(
            f"{name}: reads {report.active_fraction:.1%}; "
            + "; ".join(f"{d} x{before[d]['ratio']:.3f} -> x{after[d]['ratio']:.3f}" for d in before)
            + f" (local {local_seconds:.0f} s)",
            flush=True,
        )
        if args.e2e_tokens and name in args.e2e_configs:
            e2e = recover_e2e_(model, parent, tokenizer, "wiki", E2EConfig(tokens=args.e2e_tokens))
            with torch.no_grad():
                final = {h.data: h.score(model) for h in heldout}
            row["e2e"] = {
                "heldout": final,
                "seconds": e2e["seconds"],
                "steps": e2e["steps"],
                "tokens": e2e["steps"] * e2e["tokens_per_step"],
                "losses": e2e["losses"],
            }
            print(
                f"  + e2e {e2e['seconds']:.0f} s: "
                + "; ".join(f"{d} x{final[d]['ratio']:.3f}" for d in final),
                flush=True,
            )
        rows.append(row)
        bw.uncarve_(model)
        model.load_state_dict(parent.state_dict())  # recovery changed the weights uncarve_ restores
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = {"machine": machine, "settings": settings, "rows": rows}
    corpora = args.eval
    lines = [
        f"# Recovery ({args.model})",
        "",
        f"commit `{machine['commit']}`, {machine['date']}, {machine['cpu']}; held-out {args.eval_tokens} tokens per "
        f"corpus; local recovery on {args.local_tokens} wiki tokens; e2e budget {args.e2e_tokens} tokens",
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
    write_results(args.out, results, "\n".join(lines))
    print("\n".join(lines))
    if args.merge_into:
        import json

        from brickwork.benchmarks.quality import merge_recovery, write

        quality = json.loads((args.merge_into / "results.json").read_text())
        write(merge_recovery(quality, results), args.merge_into)


if __name__ == "__main__":
    main()
