"""``brickwork prune``: keep, per carved layer, only the routed experts a domain's text selects (the options of
expert_usage and prune_for_domain_)."""

from __future__ import annotations

import argparse
import json

from brickwork.cli.options import (
    add_device,
    add_options,
    add_out,
    command,
    data_help,
    fraction,
    function_settings,
    load_carved,
    positive_int,
    window,
)
from brickwork.errors import BrickworkError


def add_parser(subparsers) -> None:
    from brickwork.evaluation.perplexity import EVALUATE_HELP, evaluate
    from brickwork.ops.prune import PRUNE_HELP, prune_for_domain_
    from brickwork.ops.usage import USAGE_HELP, expert_usage

    p = command(
        subparsers,
        "prune",
        run,
        help="keep, per carved layer, only the routed experts a domain's text selects (a smaller model for that "
        "domain); prints experts and FFN parameters before and after",
    )
    p.add_argument("model", help="a carved model directory")
    p.add_argument("--data", required=True, help=f"the domain's text; {data_help()}")
    usage = function_settings(expert_usage, USAGE_HELP)
    add_options(p, usage, "tokens", keep_default=True, tokens={"type": positive_int})
    add_options(
        p,
        function_settings(prune_for_domain_, PRUNE_HELP),
        "coverage",
        "min_experts",
        keep_default=True,
        coverage={"type": fraction},
        min_experts={"type": positive_int},
    )
    add_options(p, usage, "window", keep_default=True, window={"type": window})
    p.add_argument(
        "--eval",
        nargs="+",
        metavar="CORPUS",
        help=f"also compare perplexity before and after on: {data_help()}",
    )
    add_options(
        p,
        function_settings(evaluate, EVALUATE_HELP),
        "max_tokens",
        keep_default=True,
        max_tokens={
            "flag": "--eval-tokens",
            "dest": "eval_tokens",
            "type": positive_int,
            "prefix": "--eval: ",
        },
    )
    add_device(p, "where to count and evaluate")
    add_out(p, "output directory for the pruned model")


def run(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.ops.prune import check_min_experts, prune_for_domain_
    from brickwork.ops.usage import expert_usage

    if args.tokens < args.window:
        raise BrickworkError(f"--tokens {args.tokens} is less than one --window of {args.window} tokens")
    model, tokenizer, inputs = load_carved(args, "prune")
    check_min_experts(model, args.min_experts)
    usage = expert_usage(
        model, tokenizer, args.data, tokens=args.tokens, window=args.window, progress=not args.quiet
    )

    def perplexities() -> dict[str, float]:
        return {
            data: bw.evaluate(
                model,
                tokenizer,
                data,
                window=args.window,
                max_tokens=args.eval_tokens,
                progress=not args.quiet,
            ).perplexity
            for data in args.eval or []
        }

    before = perplexities()
    report = prune_for_domain_(model, usage, args.coverage, args.min_experts)
    print(report.summary())
    after = perplexities()
    for data in before:
        print(f"{data:<12} perplexity {before[data]:9.3f} unpruned -> {after[data]:9.3f} pruned")
    record = report.to_dict() | {
        "usage": usage.to_dict(),
        "eval": {d: {"unpruned": before[d], "pruned": after[d]} for d in before},
    }
    out = bw.save(
        model,
        args.out,
        tokenizer,
        overwrite=args.overwrite,
        extra_files={"prune.json": json.dumps(record, indent=2)},
        inputs=inputs,
    )
    print(f"saved to {out}/")
