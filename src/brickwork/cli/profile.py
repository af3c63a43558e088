"""``brickwork profile``: activation statistics of every FFN neuron on calibration text (ProfileConfig's fields
are the options)."""

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
    given,
    local_inputs,
)


def add_parser(subparsers) -> None:
    from brickwork.profiling.profile import ProfileConfig

    p = command(subparsers, "profile", run, help="profile FFN neurons on calibration text")
    add_model(p)
    add_calib(p)
    add_options(
        p,
        config_settings(ProfileConfig),
        "tokens",
        "window",
        "batch_size",
        "top_fraction",
        "threshold",
        "coactivation",
        "seed",
    )
    add_out(p, "output directory", default=Path("profile"))


def run(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.data.sources import check_source
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window
    from brickwork.profiling.report import summary_table, write_plots

    config = bw.ProfileConfig(**given(args, bw.ProfileConfig))
    check_source(args.calib)
    check_output_dir(args.out, "profile", args.overwrite, local_inputs(args.model))
    check_model(args.model)
    model, tokenizer = bw.load_model(args.model, progress=not args.quiet)
    check_window(model, config.window)
    prof = bw.profile(model, tokenizer, args.calib, config, progress=not args.quiet)
    table = summary_table(prof)
    plots: list[Path] = []

    def extra(tmp: Path) -> None:
        (tmp / "summary.txt").write_text(table + "\n")
        plots.extend(write_plots(prof, tmp))

    out = prof.save(args.out, overwrite=args.overwrite, extra=extra, inputs=local_inputs(args.model))
    print(table)
    print(
        f"\nprofiled {prof.tokens} tokens in {prof.meta['seconds']:.1f} s "
        f"({prof.meta['tokens_per_second']:.0f} tokens/s); wrote {out}/ (profile.safetensors, profile.json, "
        f"summary.txt, {', '.join(p.name for p in plots)})"
    )
