"""The ``brickwork`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys

from brickwork.cli import bench, carve, export, grow, merge, profile, prune, recover, setup, update
from brickwork.cli import eval as evaluate
from brickwork.errors import BrickworkError

# In the order `brickwork --help` lists them; each module adds its parser (add_parser) and runs it (run).
COMMANDS = (setup, profile, carve, evaluate, export, recover, grow, merge, prune, update, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brickwork", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(subparsers)
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
