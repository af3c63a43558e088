"""BrickSpec: the one description of a carved FFN's shape and combination rule.

A :class:`~brickwork.bricks.BrickFFN` is built from a spec and exposes it as ``brick.spec``; saving writes it
(``brickwork.json``, one record per carved layer), loading rebuilds the brick from it, and export and the kernels
read the shapes and the combine rule from it. A spec is frozen: to change a brick's rule or accumulation, derive a
new spec (``dataclasses.replace``) and give the brick that, never edit one in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from brickwork.bricks.adaptive import TokenBudget
from brickwork.bricks.combine import Combine

# 1: the record brickwork.json has held since format 1 (files written before the spec existed carry no
# ``spec_version`` and read as version 1). 2: the record has ``combine_fits`` (written as 2 only then, so that
# records without them still load in a brickwork that reads 1).
SPEC_VERSION = 2
# What BrickFFN.accumulate takes (CarveConfig also takes "auto").
ACCUMULATE = ("float32", "float64")
# What ``dtype`` takes (torch dtype names).
DTYPES = ("float32", "float64", "float16", "bfloat16")


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class CarvedSettings:
    """The settings a brick was carved with (``brickwork.json``'s ``calibrated`` record), which
    ``set_budget(model, None)`` restores: routed experts per token, the down-row cap, the router's configuration
    and the combine rule."""

    active: int
    down_keep: int | None
    router_config: dict = field(default_factory=dict, hash=False)
    combine: Combine = field(default_factory=Combine)

    def to_dict(self) -> dict:
        return {
            "active": self.active,
            "down_keep": self.down_keep,
            "router_config": dict(self.router_config),
            "combine": self.combine.to_dict(),
        }

    @classmethod
    def from_dict(cls, record, combine: Combine) -> CarvedSettings:
        """From :meth:`to_dict`'s form; records written before ``combine`` was kept in them take ``combine`` (no
        carve then fitted its rule for more than one top-k). ValueError on anything else."""
        keys = {"active", "down_keep", "router_config"}
        if not isinstance(record, dict) or not keys <= set(record) <= keys | {"combine"}:
            raise ValueError(f"expected {{active, down_keep, router_config[, combine]}}, got {record!r}")
        if not isinstance(record["router_config"], dict):
            raise ValueError(f"router_config must be a dict, got {record['router_config']!r}")
        rule = Combine.from_dict(record["combine"]) if "combine" in record else combine
        return cls(record["active"], record["down_keep"], dict(record["router_config"]), rule)


@dataclass(frozen=True)
class BrickSpec:
    """The shape and combination rule of one carved FFN.

    ``num_shared`` neurons run for every token; ``num_experts`` routed experts of ``expert_size`` neurons each,
    of which the router (``router``, its registry kind, rebuilt with ``router_config``) picks ``active`` per
    token; ``d_ff = num_shared + num_experts * expert_size``. ``gated`` and the ``*_bias`` flags say which weights
    exist; ``dtype`` is the parameters' dtype when carved. ``down_keep`` caps the down rows a token reads (None:
    all computed neurons; a cap at or above them is no cap and reads as None); ``accumulate`` says how inference
    sums (:class:`~brickwork.bricks.BrickFFN`); ``combine`` how the selected experts are combined
    (:mod:`brickwork.bricks.combine`); ``combine_fits`` the weighted rule fitted for other top-k values,
    ``((k, Combine), ...)`` in increasing k, which :func:`~brickwork.bricks.budget.set_budget` takes when it sets
    one of them (``CarveConfig.combine_budgets``). ``token_budget`` (:mod:`brickwork.bricks.adaptive`) lets each
    token keep fewer than ``active`` routed experts (None: every token runs ``active``). Invalid values raise
    ``ValueError`` naming the allowed range.
    """

    d_model: int
    num_shared: int
    num_experts: int
    expert_size: int
    active: int
    router: str
    router_config: dict = field(default_factory=dict, hash=False)
    gated: bool = True
    up_bias: bool = False
    gate_bias: bool = False
    down_bias: bool = False
    down_keep: int | None = None
    accumulate: str = "float32"
    combine: Combine = field(default_factory=Combine)
    combine_fits: tuple = ()
    dtype: str = "float32"
    token_budget: TokenBudget | None = None
    # Provenance, not shape (not compared): the settings it was carved with, once a budget changed them (None:
    # its own), and the dense FFN's d_ff when experts were pruned away (brickwork.ops.prune; None: not pruned).
    carved: CarvedSettings | None = field(default=None, compare=False)
    pruned_from: int | None = field(default=None, compare=False)
    version: int = field(default=SPEC_VERSION, compare=False)  # the record's, not the brick's: not compared

    def __post_init__(self) -> None:
        if not _is_int(self.d_model, 1):
            raise ValueError(f"d_model must be an integer >= 1, got {self.d_model!r}")
        shared, experts, size = self.num_shared, self.num_experts, self.expert_size
        if not (_is_int(shared, 0) and _is_int(experts, 1) and _is_int(size, 1)):
            raise ValueError("num_shared >= 0, num_experts >= 1 and expert_size >= 1 must be integers")
        if not _is_int(self.active, 1) or self.active > experts:
            raise ValueError(f"active {self.active!r} is not in [1, num_experts] = [1, {experts}]")
        for name in ("gated", "up_bias", "gate_bias", "down_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.router, str) or not self.router:
            raise ValueError(f"router must be a router kind, got {self.router!r}")
        if not isinstance(self.router_config, dict):
            raise ValueError(f"router_config must be a dict of keyword arguments, got {self.router_config!r}")
        object.__setattr__(self, "router_config", dict(self.router_config))  # a copy: the caller's may change
        if self.down_keep is not None:
            if not _is_int(self.down_keep, 1):
                raise ValueError(f"down_keep {self.down_keep!r} is not an integer >= 1")
            if self.down_keep >= self.computed_neurons:
                object.__setattr__(self, "down_keep", None)
        if self.accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {self.accumulate!r}")
        if not isinstance(self.combine, Combine):
            raise ValueError(f"combine must be a Combine, got {self.combine!r}")
        if self.token_budget is not None:
            if not isinstance(self.token_budget, TokenBudget):
                raise ValueError(f"token_budget must be a TokenBudget or None, got {self.token_budget!r}")
            if self.token_budget.min_active > self.active:
                raise ValueError(
                    f"token budget min_active {self.token_budget.min_active} is above the cap, active = "
                    f"{self.active}"
                )
        if not isinstance(self.combine_fits, tuple):
            raise ValueError(f"combine_fits must be a tuple of (k, Combine) pairs, got {self.combine_fits!r}")
        for pair in self.combine_fits:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], Combine)):
                raise ValueError(f"combine_fits holds (k, Combine) pairs, got {pair!r}")
            if not _is_int(pair[0], 1) or pair[0] > self.num_experts:
                raise ValueError(f"combine_fits: k must be in [1, {self.num_experts}], got {pair[0]!r}")
            if pair[1].rule != self.combine.rule or not pair[1].weighted:
                raise ValueError(f"combine_fits must fit this carve's weighted rule, got {pair[1].rule!r}")
        ks = [k for k, _ in self.combine_fits]
        if ks != sorted(set(ks)):
            raise ValueError(f"combine_fits must be in increasing k, each once, got k = {ks}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.carved is not None:
            if not isinstance(self.carved, CarvedSettings):
                raise ValueError(f"carved must be CarvedSettings or None, got {self.carved!r}")
            c = self.carved  # a spec with these settings must be valid
            replace(
                self,
                active=c.active,
                down_keep=c.down_keep,
                router_config=c.router_config,
                combine=c.combine,
                token_budget=None,
                carved=None,
            )
        if self.pruned_from is not None and (
            not _is_int(self.pruned_from, 2) or self.pruned_from <= self.d_ff
        ):
            raise ValueError(
                f"pruned_from {self.pruned_from!r} must be the dense d_ff, above this d_ff {self.d_ff}"
            )
        if not _is_int(self.version, 1) or self.version > SPEC_VERSION:
            raise ValueError(
                f"brick spec version {self.version!r} is newer than this brickwork understands (<= {SPEC_VERSION})"
            )

    @property
    def d_ff(self) -> int:
        return self.num_shared + self.num_experts * self.expert_size

    @property
    def computed_neurons(self) -> int:
        """Neurons each token computes: the shared ones and its ``active`` experts'."""
        return self.num_shared + self.active * self.expert_size

    @property
    def input_weights_per_neuron(self) -> int:
        return self.d_model * (2 if self.gated else 1)

    @property
    def weights_per_neuron(self) -> int:
        return self.input_weights_per_neuron + self.d_model

    @property
    def adaptive(self) -> bool:
        """Whether tokens may keep fewer than ``active`` routed experts (a token budget below threshold 1)."""
        return self.token_budget is not None and self.token_budget.adaptive

    @property
    def settings(self) -> CarvedSettings:
        """The settings a budget changes, as they are now."""
        return CarvedSettings(self.active, self.down_keep, dict(self.router_config), self.combine)

    @property
    def carved_settings(self) -> CarvedSettings:
        """The settings it was carved with (:attr:`carved`, or its own when no budget changed them)."""
        return self.settings if self.carved is None else self.carved

    def fitted_combine(self, k: int) -> Combine | None:
        """The weighted rule fitted for top-k = ``k`` (``combine_fits``), or None when none was."""
        return next((c for j, c in self.combine_fits if j == k), None)

    def to_dict(self) -> dict:
        """The JSON form (brickwork.json's per-layer record, less ``layer``, ``reads`` and a grown bank);
        ``token_budget``, ``combine_fits`` and ``pruned_from`` only when set, and ``calibrated`` without its rule
        when that is the spec's own and no other top-k was fitted, so that records without them read as they
        always have (and, without ``combine_fits``, as spec version 1)."""
        budget = {} if self.token_budget is None else {"token_budget": self.token_budget.to_dict()}
        if self.combine_fits:
            budget["combine_fits"] = [{"active": k, **c.to_dict()} for k, c in self.combine_fits]
        carved = self.carved_settings.to_dict()
        if not self.combine_fits and carved["combine"] == self.combine.to_dict():
            del carved["combine"]  # the record older brickwork reads (the rule is the spec's)
        provenance = {"calibrated": carved}
        if self.pruned_from is not None:
            provenance["pruned_from"] = self.pruned_from
        return {
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "num_shared": self.num_shared,
            "num_experts": self.num_experts,
            "expert_size": self.expert_size,
            "active": self.active,
            "gated": self.gated,
            "up_bias": self.up_bias,
            "gate_bias": self.gate_bias,
            "down_bias": self.down_bias,
            "router": self.router,
            "router_config": dict(self.router_config),
            "down_keep": self.down_keep,
            "accumulate": self.accumulate,
            "combine": self.combine.to_dict(),
            "dtype": self.dtype,
            **budget,
            "spec_version": self.version if self.combine_fits else min(self.version, 1),
            **provenance,
        }

    @classmethod
    def record_keys(cls) -> frozenset[str]:
        """The keys :meth:`to_dict` writes and :meth:`from_dict` reads."""
        return frozenset(
            {f.name for f in fields(cls)} - {"version", "carved"} | {"d_ff", "spec_version", "calibrated"}
        )

    @classmethod
    def from_dict(cls, record: dict) -> BrickSpec:
        """From :meth:`to_dict`'s form; ValueError on anything else. Records written before a field existed lack
        it and get the value those files meant: ``down_keep`` None, ``accumulate`` float32 (sums before the
        option), ``combine`` sum, ``dtype`` float32, ``token_budget`` None, ``spec_version`` 1. ``d_ff``, when
        given, must match."""
        if not isinstance(record, dict):
            raise ValueError(f"a brick spec is a dict, got {type(record).__name__}")
        unknown = sorted(set(record) - cls.record_keys())
        if unknown:
            raise ValueError(f"unknown brick spec field(s) {unknown}")
        data = {k: v for k, v in record.items() if k not in ("d_ff", "spec_version", "calibrated")}
        data["version"] = record.get("spec_version", 1)
        if "combine" in data:
            data["combine"] = Combine.from_dict(data["combine"])
        if "calibrated" in record:
            data["carved"] = CarvedSettings.from_dict(record["calibrated"], data.get("combine", Combine()))
        if data.get("token_budget") is not None:
            data["token_budget"] = TokenBudget.from_dict(data["token_budget"])
        if "combine_fits" in data:
            fits = data["combine_fits"]
            if not isinstance(fits, list) or not all(isinstance(f, dict) and "active" in f for f in fits):
                raise ValueError(
                    f"combine_fits must be a list of {{active, rule, temperature, scale}}, got {fits!r}"
                )
            data["combine_fits"] = tuple(
                (f["active"], Combine.from_dict({k: v for k, v in f.items() if k != "active"})) for f in fits
            )
        spec = cls(**data)
        if "d_ff" in record and record["d_ff"] != spec.d_ff:
            raise ValueError(
                f"{spec.num_shared} shared + {spec.num_experts} x {spec.expert_size} neurons is not "
                f"d_ff = {record['d_ff']}"
            )
        return spec

    def describe(self) -> str:
        """One line: the shapes, the router and the rule."""
        keep = "" if self.down_keep is None else f", down_keep {self.down_keep}"
        if self.token_budget is not None:
            b = self.token_budget
            keep += f", token budget {b.threshold:g} (min {b.min_active}, zero {b.zero_mass:g}, copy {b.copy_gain:g})"
        share = self.computed_neurons / self.d_ff if self.d_ff else math.nan
        return (
            f"{self.num_shared} shared + {self.num_experts} x {self.expert_size} (active {self.active}, "
            f"{share:.1%} of d_ff {self.d_ff}), router {self.router}, combine {self.combine.rule}{keep}, "
            f"{self.accumulate} sums"
        )
