"""``brickwork update``: train only the routed experts a domain's text uses (the options of choose_bricks,
update_ and TrainConfig)."""

from __future__ import annotations

import argparse
import json

from brickwork.cli.options import (
    add_device,
    add_options,
    add_out,
    command,
    config_settings,
    data_help,
    default_of,
    fraction,
    function_settings,
    given,
    load_carved,
)
from brickwork.errors import BrickworkError


def add_parser(subparsers) -> None:
    from brickwork.ops.train import TrainConfig
    from brickwork.ops.update import CHOOSE_BRICKS_HELP, UPDATE_HELP, choose_bricks, update_

    p = command(
        subparsers,
        "update",
        run,
        help="train only the routed experts a domain's text uses (everything else frozen) on that text",
    )
    p.add_argument("model", help="a carved model directory")
    p.add_argument("--data", required=True, help=f"the domain's training text; {data_help()}")
    p.add_argument(
        "--bricks",
        required=True,
        help="auto: per layer the experts covering --coverage of its selections on --data; N: the N most used",
    )
    add_options(
        p,
        function_settings(choose_bricks, CHOOSE_BRICKS_HELP),
        "coverage",
        keep_default=True,
        coverage={"type": fraction},
    )
    add_options(p, function_settings(update_, UPDATE_HELP), "train_router", keep_default=True)
    add_options(p, config_settings(TrainConfig), "tokens", "window", "batch_size", "lr", "seed")
    add_device(p, "where to train")
    add_out(p, "output directory for the updated model")


def run(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.ops.train import TrainConfig
    from brickwork.ops.update import choose_bricks, update_
    from brickwork.ops.usage import expert_usage

    config = TrainConfig(**given(args, TrainConfig))
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
    model, tokenizer, inputs = load_carved(args, "update")
    usage = expert_usage(
        model,
        tokenizer,
        args.data,
        tokens=min(config.tokens, default_of(expert_usage, "tokens")),  # at most what prune counts on
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
