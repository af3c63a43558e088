"""``brickwork setup``: prepare the built-in corpora and cache the bundled models ahead of use."""

from __future__ import annotations

import argparse

from brickwork.cli.options import command


def add_parser(subparsers) -> None:
    from brickwork.data.corpora import CORPORA, SETUP_CORPORA
    from brickwork.models.loading import BUNDLED_MODELS, DEFAULT_MODEL

    p = command(
        subparsers, "setup", run, help="prepare the built-in corpora and cache the bundled default model"
    )
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


def run(args: argparse.Namespace) -> None:
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
