"""Which built-in BIG-bench tasks the dense model is clearly above chance on, measured on the `select` split.

The quality benchmark reports accuracy on the disjoint `eval` split, so choosing tasks here does not
inflate the figures it reports. A task is kept when the dense accuracy beats both chance (uniform random
choice) and the best constant answer by at least 3 standard errors.
"""

from __future__ import annotations

import time

import brickwork as bw
from brickwork.benchmarks.harness import Bench
from brickwork.evaluation.tasks import CANDIDATE_TASKS, load_task, score_task


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/task-selection")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=150, help="examples per task (select split)")
    parser.add_argument("--margin", type=float, default=3.0, help="standard errors above chance and majority")
    parser.add_argument("--tasks", nargs="+", default=list(CANDIDATE_TASKS))
    parser.add_argument(
        "--append", action="store_true", help="add these rows to --out's results.json (same settings)"
    )
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    machine = BENCH.start()["machine"]
    model, tokenizer = bw.load_model(args.model)
    rows = []
    for name in args.tasks:
        task = load_task(name).split("select", args.examples)
        result = score_task(model, tokenizer, task)
        floor = max(result.chance, result.majority)
        row = dict(result.to_dict(), keep=result.accuracy - floor >= args.margin * max(result.stderr, 1e-9))
        rows.append(row)
        print(
            f"{name:<28} acc {result.accuracy:.3f} ± {result.stderr:.3f}  chance {result.chance:.3f}  "
            f"majority {result.majority:.3f}  {'KEEP' if row['keep'] else ''} ({result.seconds:.0f} s)",
            flush=True,
        )
    previous = []
    if args.append:
        import json

        earlier = json.loads((args.out / "results.json").read_text())
        previous = [
            dict(r, machine=earlier["machine"]) for r in earlier["rows"] if r["task"] not in args.tasks
        ]
        rows = previous + rows
    results = {
        "bench": BENCH.name,
        "machine": machine,
        "settings": {
            "model": args.model,
            "examples": args.examples,
            "margin": args.margin,
            "split": "select",
        },
        "rows": rows,
        "selected": [r["task"] for r in rows if r["keep"]],
    }
    BENCH.write(args.out, results)
    print("selected:", results["selected"])


def render(results: dict) -> str:
    s, machine, rows = results["settings"], results["machine"], results["rows"]
    lines = [
        f"# Task selection ({s['model']}, `select` split, {s['examples']} examples per task)",
        "",
        f"commit `{machine['commit']}`, {machine['date']}; kept when accuracy - max(chance, majority) >= "
        f"{s['margin']} standard errors",
        "",
        "| task | examples | accuracy | stderr | chance | majority | kept |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['examples']} | {r['accuracy']:.3f} | {r['stderr']:.3f} | {r['chance']:.3f} | "
            f"{r['majority']:.3f} | {'yes' if r['keep'] else ''} |"
        )
    return "\n".join(lines)


BENCH = Bench("task_selection", render)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s")
