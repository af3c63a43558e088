"""Routers: modules that score a layer's routed experts for each token; the router registry.

A router is one file: a :class:`Router` subclass registered with :func:`register_router`, which declares
everything the rest of brickwork asks of it (the pattern of peft's per-method configs and torchao's handlers):

- ``Options``: its build options, a :class:`RouterOptions` dataclass (typed fields with help and range);
- ``computes`` and ``fast_paths``: what its scores are and how the CPU kernels route with them
  (:data:`LINEAR_FAST_PATHS` for ``x W^T + b``), with ``switch_points`` where its kernels switch paths at other
  token counts than the linear ones;
- ``param_layout``: how its parameters split per routed expert (``prune``, ``update``);
- :meth:`Router.refit`: whether and how it refits on a layer's inputs (local recovery);
- :meth:`Router.rebudget` and :meth:`Router.set_config`: how it follows a new budget (``set_budget``).

:func:`capabilities` says which of these a router has; code outside ``brickwork.routing`` asks the router, never
its name.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from brickwork.errors import BrickworkError
from brickwork.grouping.base import Grouping
from brickwork.models.specs import FFNWeights

if TYPE_CHECKING:
    from brickwork.bricks.module import BrickFFN


@dataclass
class RouterInputs:
    """What a router may be built from, for one FFN."""

    weights: FFNWeights  # the dense FFN, canonical orientation, original neuron order
    grouping: Grouping
    stats: dict[str, torch.Tensor]  # the layer's profile statistics
    coactivation: torch.Tensor | None
    inputs: torch.Tensor | None  # [N, D] calibration FFN inputs x
    hidden: torch.Tensor | None  # [N, F] the matching h, original neuron order
    active: int | None = None  # routed experts run per token (what routers trained to choose need to know)

    def expert_mass(self) -> torch.Tensor:
        """[N, E] activation mass of each routed expert on the calibration tokens: sum of |h| over its neurons."""
        if self.hidden is None:
            raise BrickworkError("this router fits on calibration activations: calibrate with samples=True")
        return self.hidden.abs()[:, self.grouping.experts].sum(-1)

    def expert_output_norm(self) -> torch.Tensor:
        """[N, E] norm of each routed expert's contribution to the FFN output, ``||sum_{i in e} h_i down_i||``:
        what leaving the expert out changes, where the activation mass ignores the down rows' sizes."""
        if self.hidden is None:
            raise BrickworkError("this router fits on calibration activations: calibrate with samples=True")
        h, down = self.hidden.float(), self.weights.down.float()
        return torch.stack(
            [(h[:, neurons] @ down[:, neurons].t()).norm(dim=-1) for neurons in self.grouping.experts], dim=1
        )

    def expert_importance(self, target: str) -> torch.Tensor:
        """The per-token expert scores a router is fitted to: ``mass`` or ``output`` (see above)."""
        if target not in ("mass", "output"):
            raise BrickworkError(f"router target must be 'mass' or 'output', got {target!r}")
        return self.expert_mass() if target == "mass" else self.expert_output_norm()


def router_option(
    default, help: str, check: Callable[[object], bool] | None = None, allowed: str | None = None
):
    """A :class:`RouterOptions` field: its default, its help text and, for a range, ``check(value)`` and the
    words that say what is allowed (``"an integer >= 1"``)."""
    return field(default=default, metadata={"help": help, "check": check, "allowed": allowed})


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class RouterOptions:
    """A router's build options (subclass per router, fields made with :func:`router_option`): the keyword
    arguments its ``build`` takes besides the calibration inputs, typed, with help, checked by :meth:`check`."""

    @classmethod
    def types(cls) -> dict[str, object]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in fields(cls)}

    @classmethod
    def describe(cls, name: str) -> str:
        """What ``name`` may be, in words (``"an integer >= 1"``, ``"mass or output"``)."""
        spec = {f.name: f for f in fields(cls)}[name]
        if spec.metadata.get("allowed"):
            return spec.metadata["allowed"]
        kind = cls.types()[name]
        if typing.get_origin(kind) is Literal:
            return " or ".join(str(v) for v in typing.get_args(kind))
        return _TYPE_WORDS.get(kind, "any value")

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each option's help text with its default."""
        return {
            f.name: f"{f.metadata['help']} (default {f.default if f.default is not MISSING else 'required'})"
            for f in fields(cls)
        }

    @classmethod
    def check_value(cls, name: str, value) -> None:
        """ValueError unless ``value`` is of the option's type and in its range."""
        kind = cls.types()[name]
        if typing.get_origin(kind) is Literal:
            ok = value in typing.get_args(kind) and isinstance(value, str)
        elif kind is bool:
            ok = isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, kind) and not isinstance(value, bool)
        check = {f.name: f for f in fields(cls)}[name].metadata.get("check")
        if not ok or (check is not None and not check(value)):
            raise ValueError(f"router option {name} must be {cls.describe(name)}, got {value!r}")

    @classmethod
    def parse_value(cls, name: str, text: str):
        """``text`` (from the command line) as the option's type; the text itself when it is not one."""
        kind = cls.types()[name]
        lowered = text.strip().lower()
        if kind is bool and lowered in ("true", "false"):
            return lowered == "true"
        if kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                return text
        return text


def _linear_token(brick, plan):
    """One compiled call per token: ``scores = W x + b``, top-k, then the experts (:func:`cpu.linear_router_token`)."""
    from brickwork.kernels import cpu

    router_w, router_b = plan.linear_router(brick)
    rows, s, size, keep = plan.experts_args
    return cpu.linear_router_token, (router_w, router_b, brick.spec.active, rows, s, size, keep)


def _linear_batch(brick, plan):
    """``x [T, D] -> chosen [T, k]`` for every token at once (:func:`cpu.linear_router_batch`)."""
    from brickwork.kernels import cpu

    router_w, router_b = plan.linear_router(brick)
    active = brick.spec.active
    return lambda xn: cpu.linear_router_batch(xn, router_w, router_b, active)


# The fast paths of routers whose scores are ``x W^T + b`` (``computes = "linear"``, with :meth:`Router.linear_form`).
LINEAR_FAST_PATHS: dict[str, Callable] = {"token": _linear_token, "batch": _linear_batch}


class Router(nn.Module):
    """Scores ``[T, E]`` for the routed experts of one BrickFFN; the top ``active`` are run.

    Subclasses set ``kind`` (their registry name) and implement :meth:`forward`, :meth:`weights_read` (weights a
    token reads to be routed, for the active-fraction figure) and :meth:`extra_config` (what ``empty`` needs,
    besides the shapes, to rebuild the router before its state dict is loaded), and declare their capabilities
    (see the module docstring).
    """

    kind: str = ""
    Options: ClassVar[type[RouterOptions]] = RouterOptions
    needs_samples: bool = False  # whether build() fits on calibration (x, h) pairs
    # What the scores are (the kernels take the fast paths the router brings for its form, ``fast_paths``):
    # "scores": whatever forward() computes, scored in torch as the reference path scores it (any router);
    # "linear": x W^T + b with (W, b) = linear_form(), routed inside the compiled kernels;
    # "partial": PartialInputRouter's estimate from each token's largest inputs, routed inside the kernels.
    computes: str = "scores"
    # Whether the scores estimate each expert's activation mass (non-negative, and additive over experts), so
    # that a share of a token's total means something: per-token budgets of the ``sum`` rule keep experts by
    # their share of these scores, clamped at 0 (brickwork.bricks.adaptive); other routers' are refused.
    predicts_mass: bool = False
    # The fast path's routing, per kernel path ("token": ``prepare(brick, plan) -> (kernel, args)`` for the fused
    # per-token call; "batch": ``prepare(brick, plan) -> (x [T, D] -> chosen [T, k])``); a path not listed is routed
    # in torch, as the reference path routes (brickwork.bricks.paths). Routers that compute anything but "scores"
    # must bring both.
    fast_paths: ClassVar[dict[str, Callable]] = {}
    # Switch points of its own, as brickwork.bricks.paths.SWITCH_POINTS holds them ({name: ((fraction, tokens),
    # ...)}); a name not given takes the linear routers' points.
    switch_points: ClassVar[dict[str, tuple]] = {}
    # How each parameter splits per routed expert: "expert" (a row per routed expert), "neuron" (a row per routed
    # neuron, in stored order) or "whole" (shared by every expert). None: unknown, so that pruning and per-expert
    # training refuse the router. Routers without parameters declare {}.
    param_layout: ClassVar[dict[str, str] | None] = None
    # Parameters that are data, not weights to train (a quantized copy of the FFN's rows): sliced by pruning as
    # param_layout says, never trained by update.
    frozen: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a class that declares a score form brings that form's fast paths (an inherited one is another form's)
        own = "fast_paths" in cls.__dict__ or "computes" not in cls.__dict__
        if cls.computes != "scores" and not (own and {"token", "batch"} <= set(cls.fast_paths)):
            raise TypeError(
                f"{cls.__name__} declares computes = {cls.computes!r} but brings no fast path for it "
                "(fast_paths needs 'token' and 'batch'); declare computes = 'scores' to be routed in torch"
            )

    def refit(self, brick: BrickFFN, x: torch.Tensor, h_dense: torch.Tensor) -> bool:
        """Refit the router in place on a layer's inputs ``x [N, D]`` and the dense FFN's ``h_dense [N, F]`` (stored
        order), as local recovery asks after refitting the layer; True when it did. Default: it keeps its weights."""
        return False

    def rebudget(
        self, brick: BrickFFN, budget: float, carved: dict
    ) -> tuple[Callable[[int], dict], int | None] | None:
        """How the router follows a new ``budget``: ``(settings for k routed experts, the k to try first or None)``,
        the settings being ``{active, down_keep, router_config, combine}`` as :mod:`brickwork.bricks.budget` keeps
        them, from the ``carved`` ones. None (default): the number of routed experts changes and nothing else."""
        return None

    def set_config(self, config: dict) -> None:
        """Take a new ``router_config`` (a budget's): the router's :meth:`extra_config` keys it reads at run time.
        Default: nothing to take."""

    def forward(self, x: torch.Tensor, brick: BrickFFN) -> torch.Tensor:
        raise NotImplementedError

    def weights_read(self, brick: BrickFFN, routed: int | None = None) -> int:
        """Weights a token reads to be routed (its parameters, by default) when it runs ``routed`` experts (None:
        ``brick.active``; routers that reuse their work for the experts they select read more for fewer)."""
        return sum(p.numel() for p in self.parameters())

    def extra_config(self) -> dict:
        return {}

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(W [E, D], b [E] or None)`` when the scores are ``x W^T + b``, else None (export needs this)."""
        return None

    @classmethod
    def empty(cls, num_experts: int, d_model: int, d_ff: int, gated: bool, **extra) -> Router:
        """An uninitialised router of the right shapes, to load a saved state dict into."""
        raise NotImplementedError


ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Register a Router subclass; its ``build(inputs, **options)`` classmethod constructs it from calibration data,
    with ``options`` the fields of its ``Options``."""
    if not cls.kind:
        raise TypeError(f"{cls.__name__} has no kind: set kind = '<name>' to register it")
    built = {
        name
        for name, p in inspect.signature(cls.build).parameters.items()
        if name != "inputs" and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    declared = {f.name for f in fields(cls.Options)}
    if built != declared:
        raise TypeError(
            f"router {cls.kind!r}: build() takes {sorted(built)} but its Options declare {sorted(declared)}; "
            "declare every build option in Options"
        )
    ROUTERS[cls.kind] = cls
    return cls


def router_class(kind: str) -> type[Router]:
    """The registered router ``kind``; ValueError naming the known ones."""
    if kind not in ROUTERS:
        raise ValueError(f"unknown router '{kind}'; known: {', '.join(sorted(ROUTERS))}")
    return ROUTERS[kind]


def capabilities(kind: str) -> dict[str, bool]:
    """Which of the optional capabilities router ``kind`` declares: a compiled fast path, a per-expert parameter
    layout (prune, update), a refit (local recovery), a re-budgeting of its own, mass-like scores (per-token
    budgets)."""
    cls = router_class(kind)
    return {
        "fast_path": bool(cls.fast_paths),
        "param_layout": cls.param_layout is not None,
        "refit": cls.refit is not Router.refit,
        "rebudget": cls.rebudget is not Router.rebudget,
        "predicts_mass": cls.predicts_mass,
    }


def check_router_options(router: str, options: dict, builder: str = "build") -> None:
    """Refuse options the router's ``builder`` (``build``: its Options; ``empty``: what a saved record may hold)
    does not take, or values outside their range (ValueError)."""
    if not isinstance(options, dict):
        raise ValueError(f"router options must be a dict of keyword arguments, got {options!r}")
    cls = router_class(router)
    parameters = inspect.signature(getattr(cls, builder)).parameters
    known = sorted(
        name
        for name, p in parameters.items()
        if name not in ("inputs", "num_experts", "d_model", "d_ff", "gated", "routed_neurons")
        and p.kind is not inspect.Parameter.VAR_KEYWORD
    )
    declared = {f.name for f in fields(cls.Options)}
    for key, value in options.items():
        if key not in known:
            raise ValueError(
                f"router '{router}' takes no option '{key}'; its options: {', '.join(known) or 'none'}"
            )
        if key in declared:
            cls.Options.check_value(key, value)


def parse_router_options(router: str, items: list[str]) -> dict:
    """``["intercept=false", "rank=32"]`` -> ``{"intercept": False, "rank": 32}``, each typed as router ``router``
    declares it (ValueError for a malformed item; :func:`check_router_options` checks the values)."""
    cls = router_class(router)
    declared = {f.name for f in fields(cls.Options)}
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--router-option takes key=value, got '{item}'")
        out[key] = cls.Options.parse_value(key, text) if key in declared else text
    return out


def topk_by_position(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[T, k]`` indices of each row's k largest scores, ties broken by position (the lower index first), as the
    kernels' selection breaks them (``torch.topk`` leaves the order of ties unspecified)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
