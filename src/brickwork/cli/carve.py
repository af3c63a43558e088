"""``brickwork carve``: cut a model's FFNs into shared and routed experts (CarveConfig's fields are the options)."""

from __future__ import annotations

import argparse
from pathlib import Path

from brickwork.cli.options import (
    add_calib,
    add_model,
    add_options,
    add_out,
    check_model,
    command,
    config_settings,
    fraction,
    given,
    local_inputs,
    non_negative_int,
    positive_int,
)
from brickwork.errors import BrickworkError

# CLI-only defaults: the held-out comparison after carving, and the demo continuations.
EVAL_TOKENS = 16384
SAMPLE_TOKENS = 20
DEMO_PROMPTS = (
    "The capital of France is",
    "Once upon a time, a little fox",
    "The main reason people drink water is",
)

# --reads picks a measured configuration for a budget (a preset); --active-fraction is the older name of --reads
# and of --neuron-share. These helps, _is_preset and _budget_options are the CLI's only readers of the two.
READS_HELP = (
    "the FFN weights a token reads (router included) as a fraction of dense: picks the best measured configuration "
    "for that budget, neuron-level (or with --stock, stock-exportable); the other options given override it"
)
ACTIVE_FRACTION_HELP = (
    "the older name of --reads (without --experts, or with --stock) and of --neuron-share (with --experts or "
    "--active)"
)
STOCK_HELP = (
    "with --reads: the best measured configuration that stock MoE engines run exactly (expert-level, "
    "fitted bias-free router, sigmoid combine: exports to glm4_moe and gguf; add --combine softmax for qwen2_moe)"
)


def add_parser(subparsers) -> None:
    from brickwork.bricks.combine import COMBINE_RULES
    from brickwork.bricks.spec import ACCUMULATE
    from brickwork.carving.config import LAYER_BUDGETS, CarveConfig
    from brickwork.carving.sequential import STORAGE_DTYPES
    from brickwork.grouping import GROUPING_METHODS
    from brickwork.routing import ROUTERS

    p = command(
        subparsers, "carve", run, help="carve FFNs into shared + routed experts and save the carved model"
    )
    add_model(p)
    settings = config_settings(CarveConfig)
    add_options(
        p,
        settings,
        "experts",
        "shared",
        "active",
        "neuron_share",
        neuron_share={"type": fraction, "metavar": "SHARE"},
    )
    p.add_argument("--reads", type=fraction, default=argparse.SUPPRESS, metavar="FRACTION", help=READS_HELP)
    p.add_argument(
        "--active-fraction",
        type=fraction,
        default=argparse.SUPPRESS,
        metavar="FRACTION",
        help=ACTIVE_FRACTION_HELP,
    )
    p.add_argument("--stock", action="store_true", help=STOCK_HELP)
    add_options(
        p,
        settings,
        "method",
        "router",
        "router_options",
        "down_fraction",
        "layers",
        "accumulate",
        "combine",
        "combine_budgets",
        "layer_budgets",
        "layer_step",
        method={"choices": sorted(GROUPING_METHODS)},
        router={"choices": sorted(ROUTERS)},
        router_options={
            "flag": "--router-option",
            "text": "an option of the router's builder, KEY=VALUE (repeatable), e.g. intercept=false for a fitted "
            "router that stock MoE formats can hold",
            "action": "append",
            "metavar": "KEY=VALUE",
        },
        accumulate={"choices": ("auto", *ACCUMULATE)},
        combine={"choices": COMBINE_RULES},
        combine_budgets={"type": fraction, "metavar": "FRACTION"},
        layer_budgets={"choices": LAYER_BUDGETS},
    )
    p.add_argument("--rank", type=int, help="rank of the lowrank router's approximations (its option rank)")
    add_calib(p)
    add_options(p, settings, "calib_tokens", "router_samples", "window", "seed")
    add_out(p, "output directory", default=Path("carved"))
    p.add_argument("--eval", nargs="*", help="held-out corpora to compare carved and dense on")
    p.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=EVAL_TOKENS,
        help=f"held-out tokens per corpus (default {EVAL_TOKENS})",
    )
    p.add_argument(
        "--samples",
        type=non_negative_int,
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
        choices=list(STORAGE_DTYPES),
        help="with --sequential: the dtype the carved weights are stored in; computation is float32 "
        f"(default {_default_storage_dtype()})",
    )


def _default_storage_dtype() -> str:
    from brickwork.carving.sequential import carve_sequential
    from brickwork.cli.options import default_of

    return str(default_of(carve_sequential, "dtype")).removeprefix("torch.")


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
    if not _is_preset(args, options):
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

    options = given(args, bw.CarveConfig)
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


def _check_combinations(args: argparse.Namespace, options: dict) -> None:
    """Refuse options given without the one they modify."""
    if "layer_step" in options and options.get("layer_budgets") != "sensitivity":
        raise BrickworkError("--layer-step is an option of --layer-budgets sensitivity, which was not given")
    if args.stock and not _is_preset(args, options):
        raise BrickworkError("--stock picks a configuration for a budget: give --reads too")
    if args.stock and "active" in options:
        raise BrickworkError("--stock chooses --active from --reads; give one of --stock and --active")


def _check_inputs(args: argparse.Namespace) -> None:
    """Refuse, before anything loads, a text that cannot be read and evaluation options that cannot apply."""
    from brickwork.data.sources import check_source

    check_source(args.calib)
    for data in args.eval or []:
        check_source(data)
    if args.eval is not None and not args.eval:
        raise BrickworkError("--eval needs at least one corpus")
    if args.dtype is not None and not args.sequential:
        raise BrickworkError("--dtype is the storage dtype of a --sequential carve: give --sequential too")
    if args.sequential and (args.eval or args.samples):
        raise BrickworkError(
            "--sequential never loads the whole model, so it does not evaluate: evaluate the saved carve with "
            "`brickwork eval OUT --parent MODEL`"
        )


def _preset_config(args: argparse.Namespace, options: dict, budget: float, model):
    """The measured configuration for the reads ``budget`` (--stock: the stock-exportable one), sized to
    ``model``."""
    import brickwork as bw
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
    return config


def run(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.carving.carve import plan_layers
    from brickwork.carving.config import check_router_options
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window

    options = _carve_options(args)
    _check_combinations(args, options)
    budget = _budget_options(args, options)
    preset = budget is not None
    if preset:  # checked now; the measured configuration needs the model's shapes
        check_router_options(_router_of(args, options), options.get("router_options", {}))
    config = None if preset else bw.CarveConfig(**options)
    _check_inputs(args)
    inputs = local_inputs(args.model)
    check_output_dir(args.out, "carve", args.overwrite, inputs)
    check_model(args.model)
    if args.sequential:  # a meta-device skeleton: shapes for the checks and presets, no weights
        from brickwork.carving.sequential import resolve_safetensors_model
        from brickwork.models.lazy import open_lazy_model

        model = open_lazy_model(resolve_safetensors_model(args.model, progress=not args.quiet)).model
    else:
        model, tokenizer = bw.load_model(args.model, progress=not args.quiet)
    if preset:
        config = _preset_config(args, options, budget, model)
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
            _continuations(parent, tokenizer, prompts),
            _continuations(model, tokenizer, prompts),
            strict=True,
        ):
            print(f"\n> {prompt}\n  dense : {d}\n  carved: {c}")


def _continuations(model, tokenizer, prompts) -> list[str]:
    import torch

    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=SAMPLE_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        out.append(
            tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True).replace("\n", " ")
        )
    return out


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
