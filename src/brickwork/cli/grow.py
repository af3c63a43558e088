"""``brickwork grow``: new routed experts for new text, the carved ones frozen (grow_'s and TrainConfig's
options)."""

from __future__ import annotations

import argparse
import json

from brickwork.cli.options import (
    add_device,
    add_options,
    add_out,
    check_carved,
    check_device,
    command,
    config_settings,
    data_help,
    function_settings,
    given,
    local_inputs,
)


def add_parser(subparsers) -> None:
    from brickwork.ops.grow import GROW_HELP, GROW_SEED_HELP, KINDS, grow_
    from brickwork.ops.train import TrainConfig

    p = command(
        subparsers,
        "grow",
        run,
        help="add new routed experts for new text, the carved ones frozen (trains only the new experts and their "
        "router; --replay keeps their gates closed on the original text)",
    )
    p.add_argument("model", help="a carved model directory")
    p.add_argument("--data", required=True, help=f"the new text: {data_help()}")
    settings = function_settings(grow_, GROW_HELP)
    add_options(
        p, settings, "experts", "kind", "expert_size", "rank", "active", "layers", kind={"choices": KINDS}
    )
    p.add_argument(
        "--replay", help=f"text of the original domain the new gates must stay closed on: {data_help()}"
    )
    add_options(p, settings, "replay_tokens", "replay_weight")
    add_options(
        p,
        config_settings(TrainConfig),
        "tokens",
        "window",
        "batch_size",
        "lr",
        "seed",
        seed={"text": GROW_SEED_HELP},
    )
    add_device(p, "where to train")
    add_out(p, "output directory for the grown model")


def run(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.data.sources import check_source
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window
    from brickwork.ops.grow import GROW_HELP, grow_
    from brickwork.ops.train import TrainConfig

    config = TrainConfig(**given(args, TrainConfig))
    options = {name: getattr(args, name) for name in GROW_HELP if hasattr(args, name)}
    check_source(args.data)
    if args.replay is not None:
        check_source(args.replay)
    check_device(args.device)
    check_carved(args.model, "grow")
    inputs = local_inputs(args.model, args.data, args.replay)
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
