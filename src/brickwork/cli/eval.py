"""``brickwork eval``: perplexity, KL and agreement against a parent, downstream tasks, and per-token budgets
(the options of evaluate, evaluate_tasks and fit_token_budget)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from brickwork.cli.options import (
    add_model,
    add_options,
    check_json_path,
    check_model,
    command,
    data_help,
    fraction,
    function_settings,
    non_negative_float,
    non_negative_int,
    option_names,
    positive_int,
    window,
)
from brickwork.errors import BrickworkError

_TOKEN_FIT_OPTIONS = ("token_zero_share", "token_copy", "token_per_layer", "token_calib")


def add_parser(subparsers) -> None:
    from brickwork.bricks.token_budget import FIT_TOKEN_BUDGET_HELP, fit_token_budget
    from brickwork.data.corpora import DEFAULT_CALIBRATION, DEFAULT_EVALUATION
    from brickwork.evaluation.harness import EVALUATE_TASKS_HELP, evaluate_tasks
    from brickwork.evaluation.perplexity import EVALUATE_HELP, evaluate

    p = command(
        subparsers,
        "eval",
        run,
        help="perplexity on held-out text; KL and agreement against a parent model; downstream task accuracy "
        "(--tasks) through lm-evaluation-harness",
    )
    add_model(p)
    p.add_argument(
        "--data",
        nargs="+",
        help=f"{data_help()} (default {' '.join(DEFAULT_EVALUATION)}; none when --tasks is given without --data)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="downstream tasks, space- or comma-separated: 'bigbench' (the built-in default BIG-bench "
        "tasks), built-in BIG-bench task names, BIG-bench task.json paths, lm-eval task YAML files or "
        "directories, lm-eval task names (their datasets from the local Hugging Face cache unless --hub)",
    )
    p.add_argument(
        "--harness",
        choices=("lm-eval", "builtin"),
        help="who scores --tasks: lm-evaluation-harness (default; pip install 'brickwork[eval]') or "
        "brickwork's own BIG-bench scorer",
    )
    add_options(
        p,
        function_settings(evaluate_tasks, EVALUATE_TASKS_HELP),
        "examples",
        "batch_size",
        "allow_hub",
        keep_default=True,
        examples={"flag": "--task-examples", "dest": "task_examples", "type": positive_int},
        batch_size={
            "flag": "--task-batch-size",
            "dest": "task_batch_size",
            "type": positive_int,
            "default": None,
        },
        allow_hub={"flag": "--hub", "dest": "hub"},
    )
    p.add_argument("--parent", help="a parent model to compare against (KL(parent||model), top-1 agreement)")
    add_options(
        p,
        function_settings(evaluate, EVALUATE_HELP),
        "window",
        "max_tokens",
        "batch_size",
        keep_default=True,
        window={"type": window},
        max_tokens={"type": positive_int},
        batch_size={"type": positive_int},
    )
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument(
        "--budget",
        type=fraction,
        help="carved models: evaluate at this fraction of FFN weights read per token instead of the carved one "
        "(set_budget; no re-carving)",
    )
    per_token = p.add_mutually_exclusive_group()
    per_token.add_argument(
        "--token-threshold",
        type=fraction,
        help="carved models: each token keeps the fewest of its top-k experts whose router mass reaches this "
        "share of theirs (set_token_budget; 1: the carve's fixed top-k); prints the mean reads per token",
    )
    per_token.add_argument(
        "--token-budget",
        type=fraction,
        help="carved models: fit per-token thresholds so that tokens read this fraction of the FFN weights on "
        "average on calibration text (fit_token_budget; below the carve's own, its cap)",
    )
    fit = "with --token-budget: "
    add_options(
        p,
        function_settings(fit_token_budget, FIT_TOKEN_BUDGET_HELP),
        "min_active",
        "zero_share",
        "copy",
        "per_layer",
        keep_default=True,
        min_active={
            "flag": "--token-min-active",
            "dest": "token_min_active",
            "type": non_negative_int,
            "default": None,
            "prefix": "with --token-threshold/--token-budget: ",
        },
        zero_share={
            "flag": "--token-zero-share",
            "dest": "token_zero_share",
            "type": non_negative_float,
            "default": None,
            "prefix": fit,
        },
        copy={"flag": "--token-copy", "dest": "token_copy", "prefix": fit},
        per_layer={"flag": "--token-per-layer", "dest": "token_per_layer", "prefix": fit},
    )
    p.add_argument(
        "--token-calib",
        help=f"{fit}calibration text, not held-out text (default {DEFAULT_CALIBRATION}); {data_help()}",
    )


def _check_options(args: argparse.Namespace, corpora: list) -> None:
    """Refuse, before the model loads, options given without what they modify."""
    from brickwork.data.sources import check_source

    for data in corpora:
        check_source(data)
    check_json_path(args.json)
    if args.max_tokens is not None and args.max_tokens < args.window:
        raise BrickworkError(
            f"--max-tokens {args.max_tokens} is less than one --window of {args.window} tokens"
        )
    task_options = {
        "task_examples": args.task_examples,
        "task_batch_size": args.task_batch_size,
        "hub": args.hub,
    }
    if not args.tasks:
        given = [f"--{k.replace('_', '-')}" for k, v in task_options.items() if v not in (None, False)]
        given += ["--harness"] if args.harness is not None else []
        if given:
            raise BrickworkError(f"{', '.join(given)}: option(s) of --tasks, which was not given")
    elif args.harness == "builtin" and (args.hub or args.task_batch_size is not None):
        raise BrickworkError("--hub and --task-batch-size are options of --harness lm-eval")
    if args.parent and not corpora:
        raise BrickworkError("--parent compares perplexity on held-out text: give --data too")
    _check_token_options(args)


def _check_token_options(args: argparse.Namespace) -> None:
    """Refuse per-token budget options given without what they modify."""
    given = [k for k in _TOKEN_FIT_OPTIONS if getattr(args, k) not in (None, False)]
    if given and args.token_budget is None:
        raise BrickworkError(f"{option_names(given)}: option(s) of --token-budget, which was not given")
    if args.token_min_active is not None and args.token_budget is None and args.token_threshold is None:
        raise BrickworkError("--token-min-active: an option of --token-threshold or --token-budget")
    if args.token_calib is not None:
        from brickwork.data.sources import check_source

        check_source(args.token_calib)


def _apply_token_budget(args: argparse.Namespace, model, tokenizer) -> bool:
    """Set (``--token-threshold``) or fit (``--token-budget``) a per-token budget; whether one was given."""
    import brickwork as bw

    if args.token_threshold is None and args.token_budget is None:
        return False
    from brickwork.bricks.state import carved_layers

    if not carved_layers(model):
        raise BrickworkError(f"per-token budgets route a carved model's experts; {args.model} is dense")
    options = {} if args.token_min_active is None else {"min_active": args.token_min_active}
    if args.token_threshold is not None:
        bw.set_token_budget(model, args.token_threshold, **options)
        print(f"per-token budget: threshold {args.token_threshold:g} of each token's router mass")
        return True
    from brickwork.data.corpora import DEFAULT_CALIBRATION

    if args.token_zero_share is not None:
        options["zero_share"] = args.token_zero_share
    fit = bw.fit_token_budget(
        model,
        tokenizer,
        args.token_calib or DEFAULT_CALIBRATION,
        args.token_budget,
        copy=args.token_copy,
        per_layer=args.token_per_layer,
        window=args.window,
        progress=not args.quiet,
        **options,
    )
    thresholds = sorted({b.threshold for b in fit.budgets.values()})
    shown = f"{thresholds[0]:.4g}" if len(thresholds) == 1 else f"{thresholds[0]:.4g} to {thresholds[-1]:.4g}"
    print(
        f"per-token budget fitted to {args.token_budget:.1%}: threshold {shown}; calibration reads per token "
        f"{fit.reads.mean:.1%} on average, {fit.reads.worst:.1%} at most"
    )
    return True


def _perplexities(args: argparse.Namespace, model, tokenizer, parent, corpora: list, per_token: bool) -> list:
    """Each corpus's result (printed), with the FFN reads per token under a per-token budget."""
    from contextlib import nullcontext

    import brickwork as bw
    from brickwork.bricks.token_budget import ReadCounter

    results = []
    for data in corpora:
        with ReadCounter(model) if per_token else nullcontext() as counter:
            result = bw.evaluate(
                model,
                tokenizer,
                data,
                parent=parent,
                window=args.window,
                max_tokens=args.max_tokens,
                batch_size=args.batch_size,
                progress=not args.quiet,
            )
        results.append(result.to_dict())
        line = f"{data:<12} perplexity {result.perplexity:9.3f}  ({result.tokens} tokens, {result.windows} windows)"
        if result.kl is not None:
            line += f"  KL(parent||model) {result.kl:.4f}  top-1 agreement {result.agreement:.3%}"
        if counter is not None:
            reads = counter.reads()
            results[-1]["reads"] = reads.to_dict()
            line += f"  FFN reads per token {reads.mean:.1%} on average ({reads.worst:.1%} at most)"
        print(line)
    return results


def _task_scores(args: argparse.Namespace, model, tokenizer) -> list:
    from brickwork.evaluation import harness

    if args.harness == "builtin":
        return harness.evaluate_builtin(model, tokenizer, args.tasks, examples=args.task_examples)
    batch = {"batch_size": args.task_batch_size} if args.task_batch_size is not None else {}
    return harness.evaluate_tasks(
        model,
        tokenizer,
        args.tasks,
        examples=args.task_examples,
        allow_hub=args.hub,
        progress=not args.quiet,
        **batch,
    )


def run(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.bricks.merged import layer_modules
    from brickwork.bricks.state import model_reads
    from brickwork.data.corpora import DEFAULT_EVALUATION
    from brickwork.models.loading import check_window

    corpora = args.data if args.data is not None else ([] if args.tasks else list(DEFAULT_EVALUATION))
    _check_options(args, corpora)
    if args.tasks and args.harness != "builtin":
        from brickwork.evaluation.harness import require_lm_eval

        require_lm_eval()  # before the model loads
    check_model(args.model)
    if args.parent:
        check_model(args.parent)
    model, tokenizer = bw.load_model(args.model, progress=not args.quiet)
    if corpora:
        check_window(model, args.window)
    if args.budget is not None:
        from brickwork.bricks.state import carved_layers

        if not carved_layers(model):
            raise BrickworkError(f"--budget re-budgets a carved model; {args.model} is dense")
        fractions = bw.set_budget(model, args.budget)
        print(
            f"budget {args.budget:.1%}: FFN weights read per token {sum(fractions.values()) / len(fractions):.1%}"
        )
    per_token = _apply_token_budget(args, model, tokenizer)
    parent = bw.load_model(args.parent, progress=not args.quiet)[0] if args.parent else None
    results = _perplexities(args, model, tokenizer, parent, corpora, per_token)
    report = {"model": args.model, "parent": args.parent, "results": results}
    if layer_modules(
        model
    ):  # every FFN's weights read per token, as carve reports it (reads: per-token means)
        report["reads"] = model_reads(model)
    if args.tasks:
        from brickwork.evaluation.harness import render_table

        scores = _task_scores(args, model, tokenizer)
        print(("\n" if results else "") + render_table(scores))
        report["harness"] = args.harness or "lm-eval"
        report["tasks"] = [score.to_dict() for score in scores]
    if args.json:
        from brickwork.io_utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2))
