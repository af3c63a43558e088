"""``brickwork merge``: children of one carve in one model, each token routed to one child's bricks
(Branch-Train-MiX), or their weights averaged (merge_children's options)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from brickwork.cli.options import (
    add_device,
    add_options,
    add_out,
    check_carved,
    check_device,
    command,
    data_help,
    default_of,
    function_settings,
    local_inputs,
    positive_int,
    window,
)
from brickwork.errors import BrickworkError


def add_parser(subparsers) -> None:
    from brickwork.ops.merge import MERGE_HELP, merge_children

    p = command(
        subparsers,
        "merge",
        run,
        help="merge children of one carve (fine-tuned on different domains) into one model whose layers route "
        "each token to one child's bricks (Branch-Train-MiX), or --average their weights",
    )
    p.add_argument("children", nargs="+", help="carved child model directories (the same carve)")
    p.add_argument("--data", nargs="+", help=f"one domain text per child, in order; {data_help()}")
    settings = function_settings(merge_children, MERGE_HELP)
    add_options(p, settings, "tokens", "window", tokens={"type": positive_int}, window={"type": window})
    p.add_argument("--average", action="store_true", help="average every weight of the children instead")
    add_device(p, "where to merge")
    add_out(p, "output directory for the merged model")


def _check_children(args: argparse.Namespace) -> None:
    from brickwork.data.sources import check_source

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
    check_device(args.device)
    if len(args.children) < 2:
        raise BrickworkError(f"merge takes two or more children; got {len(args.children)}")
    resolved = [str(Path(child).expanduser().resolve()) for child in args.children]
    twice = sorted({c for c, r in zip(args.children, resolved, strict=True) if resolved.count(r) > 1})
    if twice:
        raise BrickworkError(f"each child is merged once; {', '.join(twice)} is given more than once")
    for child in args.children:
        check_carved(child, "merge", takes="carved children")


def run(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window
    from brickwork.ops.merge import average_children, check_children, merge_children

    _check_children(args)
    inputs = local_inputs(*args.children)
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
        check_window(children[0], options.get("window", default_of(merge_children, "window")))
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
