"""``brickwork export``: a carved model in a stock MoE format, validated against brickwork (export's options)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from brickwork.cli.options import (
    OVERWRITE_HELP,
    add_options,
    check_carved,
    check_json_path,
    command,
    data_help,
    function_settings,
    local_inputs,
    positive_int,
    window,
)
from brickwork.errors import BrickworkError


def add_parser(subparsers) -> None:
    from brickwork.io.export import EXPORT_HELP, export
    from brickwork.io.formats import EXPORT_FORMATS

    p = command(
        subparsers,
        "export",
        run,
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
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    settings = function_settings(export, EXPORT_HELP)
    add_options(
        p,
        settings,
        "dtype",
        "validate_data",
        "validate_tokens",
        "window",
        keep_default=True,
        validate_data={
            "flag": "--data",
            "dest": "data",
            "text": f"{settings['validate_data'].help}; {data_help()}",
        },
        validate_tokens={"flag": "--tokens", "dest": "tokens", "type": positive_int},
        window={"type": window},
    )
    p.add_argument("--no-validate", action="store_true", help="skip validation (top-1 carves only)")
    add_options(p, settings, "stock_routing", keep_default=True)
    p.add_argument("--json", type=Path, help="also write the export report (validation figures) here")


def _default_format(model: str, out: Path) -> str:
    """``--format`` when not given: the file format of ``out``'s suffix (gguf), else the stock format that computes
    the carve's combine rule (:func:`brickwork.io.formats.default_format`)."""
    from brickwork.io.formats import default_format

    try:
        layers = json.loads((Path(model) / "brickwork.json").read_text())["layers"]
        rules = {(layer.get("combine") or {}).get("rule", "sum") for layer in layers}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        rules = set()  # the checks that follow say what is wrong with the folder
    return default_format(out, rules)


def run(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.data.sources import check_source
    from brickwork.io.export import check_export_output, export, plan_export
    from brickwork.models.loading import check_window

    inputs = local_inputs(args.model)
    args.format = args.format or _default_format(args.model, args.out)
    check_export_output(args.out, args.format, args.overwrite, inputs)
    check_json_path(args.json)
    if not args.no_validate:
        check_source(args.data)
        if args.tokens < args.window:
            raise BrickworkError(f"--tokens {args.tokens} is less than one --window of {args.window} tokens")
    check_carved(args.model, "export")
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
