"""``brickwork recover``: win back quality after carving, by layer-local refits or distillation from the parent
(the options of LocalRecoveryConfig and E2EConfig)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from brickwork.cli.options import (
    DEFAULT_DEVICE,
    add_calib,
    add_device,
    add_joint_option,
    add_options,
    add_out,
    check_carved,
    check_device,
    check_model,
    command,
    config_settings,
    given,
    local_inputs,
    option_names,
)
from brickwork.errors import BrickworkError

MODES = ("local", "e2e")
# E2EConfig's options that local recovery has no use for.
_E2E_ONLY = ("lr", "batch_size", "checkpoint_every", "temperature", "lm_weight", "balance")


def add_parser(subparsers) -> None:
    from brickwork.recovery.e2e import E2EConfig
    from brickwork.recovery.local import LocalRecoveryConfig

    p = command(
        subparsers,
        "recover",
        run,
        help="win back quality after carving: layer-local closed-form refits (local) or distillation from the "
        "dense parent with accelerate (e2e; for several processes: `accelerate launch` on GPUs, "
        "`ACCELERATE_USE_CPU=true torchrun --nproc_per_node N` on CPUs)",
    )
    p.add_argument("model", help="a carved model directory")
    p.add_argument("--mode", choices=MODES, default=MODES[0])
    add_calib(p)
    both = {"local": config_settings(LocalRecoveryConfig), "e2e": config_settings(E2EConfig)}
    add_joint_option(p, "--tokens", "tokens", both, type=int)
    add_joint_option(p, "--window", "window", both, type=int)
    p.add_argument("--parent", help="e2e: the dense parent (default: the base model recorded when carving)")
    e2e = both["e2e"]
    add_options(p, e2e, "lr", "batch_size", "temperature", "lm_weight", "balance")
    add_device(p, "local: where to refit")
    p.add_argument("--checkpoint-dir", type=Path, help="e2e: where to save accelerate checkpoints")
    add_options(p, e2e, "checkpoint_every")
    p.add_argument("--resume", action="store_true", help="e2e: continue from the latest checkpoint")
    add_out(p, "output directory for the recovered model")


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


def _config(args: argparse.Namespace):
    """The mode's config from the options given, after refusing those of the other mode."""
    from brickwork.recovery import LocalRecoveryConfig
    from brickwork.recovery.e2e import E2EConfig

    if args.mode == "e2e":
        if args.device != DEFAULT_DEVICE:
            raise BrickworkError(
                "--device is for local recovery; e2e runs where accelerate puts it (a GPU when there is one, "
                "ACCELERATE_USE_CPU=true for the CPU)"
            )
        return E2EConfig(**given(args, E2EConfig))
    wrong = [option_names([n]) for n in _E2E_ONLY if hasattr(args, n)]
    wrong += [flag for flag, on in (("--parent", args.parent), ("--resume", args.resume)) if on]
    wrong += ["--checkpoint-dir"] if args.checkpoint_dir is not None else []
    if wrong:
        raise BrickworkError(f"{', '.join(wrong)}: option(s) of --mode e2e, not of local recovery")
    config = LocalRecoveryConfig(**given(args, LocalRecoveryConfig))
    check_device(args.device)
    return config


def _recover_local(args: argparse.Namespace, model, tokenizer, config) -> dict:
    from brickwork.recovery import recover_local_

    report = recover_local_(model, tokenizer, args.calib, config, progress=not args.quiet)
    errors = [(layer.error_before, layer.error_after) for layer in report.layers]
    print(
        f"recovered {len(errors)} layers in {report.seconds:.1f} s; mean held-out relative layer error "
        f"{sum(b for b, _ in errors) / len(errors):.4f} -> {sum(a for _, a in errors) / len(errors):.4f}"
    )
    return {"mode": "local", "seconds": report.seconds, "layers": [vars(layer) for layer in report.layers]}


def _recover_e2e(args: argparse.Namespace, model, tokenizer, config, parent_name: str) -> tuple[dict, bool]:
    """The distillation's summary, and whether this is the main process (the one that saves)."""
    from accelerate import PartialState

    import brickwork as bw
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
    return summary, main_process


def run(args: argparse.Namespace) -> None:
    import brickwork as bw
    from brickwork.data.sources import check_source
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window

    config = _config(args)
    check_source(args.calib)
    check_carved(args.model, "recover")
    parent_name = None
    if args.mode == "e2e":
        parent_name = args.parent or _recorded_parent(args.model)
        check_model(parent_name)
    inputs = local_inputs(args.model, parent_name, args.checkpoint_dir)
    check_output_dir(args.out, "carve", args.overwrite, inputs)
    model, tokenizer = bw.load_model(args.model, device=args.device, progress=not args.quiet)
    check_window(model, config.window)
    if args.mode == "local":
        summary, main_process = _recover_local(args, model, tokenizer, config), True
    else:
        summary, main_process = _recover_e2e(args, model, tokenizer, config, parent_name)
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
