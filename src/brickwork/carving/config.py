"""CarveConfig: how each FFN is cut into shared and routed experts, and how tokens are routed.

Every option's default and help text live here, once: the ``brickwork carve`` command reads them from the
fields' metadata (:func:`option_help`) and passes only the options a user gave.
"""

from __future__ import annotations

from dataclasses import MISSING, InitVar, asdict, dataclass, field, fields
from typing import get_type_hints

from brickwork.bricks.spec import ACCUMULATE
from brickwork.routing.base import check_router_options

# 2: a record holding neuron_share (active_fraction before); records without it are still written as 1
CONFIG_VERSION = 2
# accumulate="auto" sums in float64 when more experts than this are routed (neuron-level and fine-grained carves):
# on SmolLM2 the fast and reference paths of 16-expert carves agree exactly with float32 sums, those of
# neuron-level carves (1,536 routed) do not (bench/results/path-agreement).
EXACT_ABOVE = 64
# How a carve's budget is spread over its layers (CarveConfig.layer_budgets).
LAYER_BUDGETS = ("uniform", "sensitivity")
# Routed experts per token when neither `active` nor `neuron_share` is given.
DEFAULT_ACTIVE = 2


# The named starting points of a carve string (``preset=NAME@FRACTION``): the preset functions of
# :mod:`brickwork.carving.presets`, which need the model's FFN shapes.
CARVE_PRESETS = ("neuron", "stock")
# Separates the items of a list value in a carve string (``layers=0/1/2``): commas separate the keys.
_LIST_SEPARATOR = "/"


def _option(default, help: str, default_text: str | None = None):
    metadata = {"help": help} if default_text is None else {"help": help, "default_text": default_text}
    return field(default=default, metadata=metadata)


def option_help(cls, name: str) -> str:
    """A config field's help text with its default, for command-line options."""
    spec = {f.name: f for f in fields(cls)}[name]
    default = spec.default if spec.default is not MISSING else spec.default_factory()
    shown = spec.metadata.get("default_text", default)
    return f"{spec.metadata['help']} (default {shown})"


def _int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {'in ' if high is not None else ''}{allowed}, got {value}")


@dataclass
class CarveConfig:
    """How to carve.

    Each carved FFN is cut into ``experts`` equal slices of ``d_ff / experts`` neurons; ``shared`` of them run
    for every token and ``active`` of the other ``experts - shared`` (routed) ones are picked per token by the
    router. So ``(shared + active) / experts`` of the FFN runs per token; e.g. ``experts=16, shared=2,
    active=2`` runs 25%. ``experts = d_ff`` is the neuron level. Instead of ``active``, ``neuron_share`` asks
    for a share of the FFN's neurons, shared ones included: ``active = round(neuron_share * experts) - shared``;
    giving both is refused unless they agree. Neither: ``active`` is :data:`DEFAULT_ACTIVE`. The neuron share is
    not the weights a token reads (the router's reads and ``down_fraction`` change those): that is
    :attr:`CarveReport.reads <brickwork.carving.carve.CarveReport.reads>`, and the budget the presets
    (:func:`~brickwork.carving.presets.recommended`) and :func:`~brickwork.bricks.budget.set_budget` take.
    ``active_fraction=``, this field's name before, is still read (here, in :meth:`from_dict` and
    :meth:`from_string`).

    ``router_options`` passes keyword arguments to the router's builder (e.g. ``{"rank": 64}`` for lowrank).
    ``down_fraction`` (of d_ff) caps how many of the computed neurons' down rows each token reads: those with
    the largest |h| (default: all computed neurons).

    ``accumulate``: ``"float64"`` sums in float64 and rounds once at inference, so that every kernel path gives
    the reference path's float32 values (see :class:`~brickwork.bricks.BrickFFN`); ``"float32"`` sums in float32
    (faster for batches: the grouped and dense-down paths are float32 matmuls). ``"auto"`` (default): float64 when
    more than :data:`EXACT_ABOVE` experts are routed (choosing among many small experts leaves near-ties that
    float32 rounding flips), float32 otherwise.
    """

    experts: int = _option(16, "equal slices per FFN, shared included (d_ff = neuron level)")
    shared: int = _option(2, "slices run for every token")
    active: int | None = field(
        default=None,
        metadata={
            "help": "routed slices run per token",
            "default_text": f"{DEFAULT_ACTIVE}, or what --neuron-share asks for",
        },
    )
    neuron_share: float | None = _option(
        None,
        "share of the FFN's neurons computed per token, shared included: active = round(share x experts) - shared",
        "unset",
    )
    method: str = _option("activation", "expert construction")
    router: str = _option("fitted", "router kind")
    router_options: dict = field(
        default_factory=dict,
        metadata={"help": "keyword arguments of the router's builder", "default_text": "the builder's own"},
    )
    down_fraction: float | None = _option(
        None, "fraction of d_ff whose down rows a token reads (those with the largest |h|)", "all computed"
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "layers to carve", "default_text": "all"}
    )
    seed: int = _option(0, "seed of grouping and sampling")
    calib_tokens: int = _option(16384, "calibration tokens profiled for grouping and routers")
    router_samples: int = _option(8192, "of those, how many (x, h) pairs routers are fitted on")
    window: int = _option(512, "tokens per calibration sequence (at most the model's positions)")
    accumulate: str = _option(
        "auto",
        "sums at inference: float64 rounded once makes every kernel path give the reference's values "
        f"(auto: float64 when more than {EXACT_ABOVE} experts are routed)",
    )

    combine: str = _option(
        "sum",
        "how selected experts are combined: sum (weight 1), softmax (router probabilities, as Qwen2-MoE and "
        "llama.cpp's qwen2moe), softmax_topk (renormalised over the top-k, as Mixtral) or sigmoid (DeepSeek-V3's "
        "gate, as GLM-4.5's glm4_moe); the weighted rules' temperature and scale are fitted to the dense FFN on "
        "the calibration samples",
    )
    combine_budgets: tuple = _option(
        (),
        "with a weighted combine rule: budgets (fractions of the FFN read per token, router included) the rule is "
        "also fitted for, so that set_budget to one of them weights the experts as a carve made there would",
        "none",
    )
    layer_budgets: str = _option(
        "uniform",
        "uniform: every carved layer reads the same fraction; sensitivity: after carving, move reads from the "
        "layers whose calibration loss suffers least to those it helps most (allocate_budgets), same average",
    )
    layer_step: float = _option(0.1, "with layer_budgets=sensitivity: the fraction a layer moves up or down")
    # neuron_share's name before it was split from the reads budget; read, never stored
    active_fraction: InitVar[float | None] = None

    def __post_init__(self, active_fraction: float | None = None) -> None:
        from brickwork.bricks.combine import COMBINE_RULES
        from brickwork.grouping import GROUPING_METHODS
        from brickwork.routing import ROUTERS

        _int("experts", self.experts, 1)
        _int("shared", self.shared)
        if not 0 <= self.shared < self.experts:
            raise ValueError(
                f"shared must be in [0, experts - 1] = [0, {self.experts - 1}], got {self.shared}"
            )
        routed = self.experts - self.shared
        if self.active is not None:
            _int("active", self.active)
        if active_fraction is not None:
            if self.neuron_share is not None and self.neuron_share != active_fraction:
                raise ValueError("give neuron_share (active_fraction is its older name), not both")
            self.neuron_share = active_fraction
        if self.neuron_share is not None:
            share = self.neuron_share
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise ValueError(f"neuron_share must be in (0, 1], got {share}")
            resolved = round(share * self.experts) - self.shared
            if resolved < 1:
                raise ValueError(
                    f"neuron_share {share} with {self.shared} shared of {self.experts} "
                    "experts leaves no routed expert active: raise it or lower `shared`"
                )
            resolved = min(resolved, routed)
            if self.active is not None and self.active != resolved:
                raise ValueError(
                    f"active {self.active} and neuron_share {share} disagree (the share "
                    f"means active {resolved} with {self.shared} shared of {self.experts} experts): give one"
                )
            self.active = resolved
        if self.active is None:
            self.active = DEFAULT_ACTIVE
        if not 1 <= self.active <= routed:
            raise ValueError(f"active must be in [1, experts - shared] = [1, {routed}], got {self.active}")
        if self.down_fraction is not None and not 0 < self.down_fraction <= self.planned_fraction:
            raise ValueError(
                f"down_fraction must be in (0, {self.planned_fraction:g}] (the fraction of neurons "
                f"computed per token), got {self.down_fraction}"
            )
        if self.method not in GROUPING_METHODS:
            raise ValueError(f"unknown method '{self.method}'; choose from {sorted(GROUPING_METHODS)}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router '{self.router}'; choose from {sorted(ROUTERS)}")
        check_router_options(self.router, self.router_options)
        if self.layers is not None:
            if not self.layers or not all(isinstance(i, int) and i >= 0 for i in self.layers):
                raise ValueError("layers must be a non-empty list of layer indices >= 0 (or None for all)")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers must not repeat an index, got {self.layers}")
        if self.accumulate != "auto" and self.accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be auto, float32 or float64, got {self.accumulate!r}")
        if self.combine not in COMBINE_RULES:
            raise ValueError(f"combine must be one of {', '.join(COMBINE_RULES)}, got {self.combine!r}")
        budgets = self.combine_budgets
        if not isinstance(budgets, (tuple, list)) or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b <= 1 for b in budgets
        ):
            raise ValueError(f"combine_budgets must be fractions in (0, 1], got {budgets!r}")
        if budgets and self.combine == "sum":
            raise ValueError("combine_budgets fit a weighted combine rule; the sum rule has nothing to fit")
        object.__setattr__(self, "combine_budgets", tuple(sorted({float(b) for b in budgets})))
        if self.layer_budgets not in LAYER_BUDGETS:
            raise ValueError(f"layer_budgets must be uniform or sensitivity, got {self.layer_budgets!r}")
        if (
            isinstance(self.layer_step, bool)
            or not isinstance(self.layer_step, (int, float))
            or not (0 < self.layer_step < 1)
        ):
            raise ValueError(f"layer_step must be in (0, 1), got {self.layer_step!r}")
        if self.layer_budgets == "sensitivity":
            planned = self.neuron_share if self.neuron_share is not None else self.planned_fraction
            if not (self.layer_step < planned and planned + self.layer_step <= 1):
                raise ValueError(
                    f"layer_step {self.layer_step} must leave the budget {planned:.3g} -/+ layer_step inside (0, 1]"
                )
            if self.layer_step < 1 / self.experts:
                raise ValueError(
                    f"layer_step {self.layer_step} is less than one routed expert's share of the FFN (about "
                    f"1/{self.experts}): a step moves whole experts; give at least {1 / self.experts:.3g}"
                )
        _int("seed", self.seed)
        _int("window", self.window, 2)
        _int("router_samples", self.router_samples, 1)
        _int("calib_tokens", self.calib_tokens, self.window)

    @property
    def planned_fraction(self) -> float:
        """The fraction of each carved FFN's neurons run per token (router cost not included)."""
        return (self.shared + self.active) / self.experts

    def resolved_accumulate(self) -> str:
        """``accumulate`` with ``"auto"`` resolved."""
        if self.accumulate != "auto":
            return self.accumulate
        return "float64" if self.experts - self.shared > EXACT_ABOVE else "float32"

    def to_dict(self) -> dict:
        """The JSON form (what a saved carve's ``carve_config`` holds). An unset ``neuron_share`` is left out (it
        only ever resolves ``active``), so that brickwork before the name reads the record; a set one makes the
        record version 2, which that brickwork refuses with "newer than this brickwork understands"."""
        record = asdict(self)
        record["combine_budgets"] = list(self.combine_budgets)
        if record["neuron_share"] is None:
            del record["neuron_share"]
            return {"version": 1, **record}
        return {"version": CONFIG_VERSION, **record}

    @classmethod
    def from_string(
        cls, text: str, d_ff: int | None = None, d_model: int | None = None, gated: bool = True
    ) -> CarveConfig:
        """A carve named in one line: comma-separated ``key=value`` items.

        Keys are the fields of this class (``experts=16,shared=2,active=2,combine=sigmoid``), with values typed
        from the fields' types (``none`` for an unset optional field, lists as ``layers=0/1/2``), and
        ``router.NAME=value`` for an option of the router's builder (``router.intercept=false``; a bare ``NAME``
        that is no field of this class means the same, so ``intercept=false`` also reads).
        ``preset=neuron@F`` and ``preset=stock@F`` start from :func:`~brickwork.carving.presets.recommended`
        (the neuron-level default) and :func:`~brickwork.carving.presets.stock_recommended` (``brickwork carve
        --stock``) at the budget ``F``, with the other keys as their overrides; a preset needs the model's
        ``d_ff`` (and ``d_model`` and ``gated`` for ``neuron``). :meth:`to_string` writes the inverse.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a carve string is 'key=value,...', got {text!r}; known keys: {_known_keys()}")
        kwargs: dict = {}
        router_options: dict = {}
        preset = None
        names = {f.name for f in fields(cls)}
        for item in text.split(","):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not key:
                raise ValueError(f"carve string item {item!r} is not key=value (in {text!r})")
            if key == "preset":
                preset = _parse_preset(value)
                continue
            if key == "active_fraction":  # neuron_share's older name
                key = "neuron_share"
            option = key.removeprefix("router.") if key.startswith("router.") else None
            if option is None and key not in names and key in _router_option_types():
                option = key  # the bare router-option names of earlier carve strings
            if option is not None:
                if option in router_options:
                    raise ValueError(f"carve string {text!r} gives router option {option!r} twice")
                router_options[option] = _router_value(option, value)
                continue
            if key not in names or key == "router_options":
                raise ValueError(f"unknown carve string key {key!r} in {text!r}; known keys: {_known_keys()}")
            if key in kwargs:
                raise ValueError(f"carve string {text!r} gives {key!r} twice")
            kwargs[key] = _field_value(key, value)
        if router_options:
            kwargs["router_options"] = router_options
        if preset is None:
            return cls(**kwargs)
        from brickwork.carving.presets import recommended, stock_recommended

        name, fraction = preset
        if d_ff is None or (name == "neuron" and d_model is None):
            needed = "d_ff" if name == "stock" else "d_ff and d_model"
            raise ValueError(
                f"preset={name}@{fraction:g} is sized to the model: give from_string its {needed}"
            )
        if name == "stock":
            return stock_recommended(fraction, d_ff, **kwargs)
        return recommended(fraction, d_ff=d_ff, d_model=d_model, gated=gated, **kwargs)

    def to_string(self) -> str:
        """This config as :meth:`from_string` reads it: the fields that differ from their defaults, in field order
        (``experts=16,shared=2,active=2`` for the defaults); ``from_string(c.to_string()) == c``."""
        items = []
        for spec in fields(self):
            value = getattr(self, spec.name)
            default = spec.default if spec.default is not MISSING else spec.default_factory()
            if spec.name == "router_options":
                items += [f"router.{k}={_format_value(v)}" for k, v in value.items()]
            elif spec.name in ("experts", "shared", "active") or value != default:
                items.append(f"{spec.name}={_format_value(value)}")
        return ",".join(items)

    @classmethod
    def from_dict(cls, data: dict) -> CarveConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a carve config is a dict, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ValueError(
                f"carve config version {version!r} is newer than this brickwork understands "
                f"(<= {CONFIG_VERSION})"
            )
        if "active_fraction" in data:  # neuron_share's older name
            data["neuron_share"] = data.pop("active_fraction")
            if data["neuron_share"] is None:
                del data["neuron_share"]
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown carve config field(s) {unknown}")
        return cls(**data)


def _known_keys() -> str:
    names = [f.name for f in fields(CarveConfig) if f.name != "router_options"]
    options = ", ".join(sorted(_router_option_types()))
    return ", ".join([*names, "router.<option> (" + options + ")", "preset"])


def _router_option_types() -> dict[str, type]:
    """Every registered router's options and their types (a Literal's are strings), as the routers declare them."""
    import typing

    from brickwork.routing import ROUTERS

    types: dict[str, type] = {}
    for cls in ROUTERS.values():
        for name, kind in cls.Options.types().items():
            types[name] = str if typing.get_origin(kind) is typing.Literal else kind
    return types


def _parse_preset(value: str) -> tuple[str, float]:
    name, sep, fraction = value.partition("@")
    try:
        budget = float(fraction)
    except ValueError:
        budget = None
    if name not in CARVE_PRESETS or not sep or budget is None:
        raise ValueError(
            f"preset must be NAME@FRACTION with NAME one of {', '.join(CARVE_PRESETS)} "
            f"(e.g. preset=neuron@0.25), got {value!r}"
        )
    return name, budget


def _scalar(kind: type, text: str, key: str):
    if kind is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"carve string key {key!r} takes true or false, got {text!r}")
        return lowered in ("true", "1", "yes")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"carve string key {key!r} takes {kind.__name__} values, got {text!r}") from None


def _field_value(key: str, text: str):
    """``text`` as the CarveConfig field ``key``'s type (``none`` for an optional field)."""
    hint = get_type_hints(CarveConfig)[key]
    optional = type(None) in getattr(hint, "__args__", ())
    if optional and text.lower() == "none":
        return None
    kinds = [k for k in getattr(hint, "__args__", (hint,)) if k is not type(None)]
    kind = getattr(kinds[0], "__origin__", kinds[0])
    if kind in (list, tuple):
        item = getattr(kinds[0], "__args__", (float,))[0] if key != "combine_budgets" else float
        values = [_scalar(item, part, key) for part in text.split(_LIST_SEPARATOR) if part]
        return kind(values)
    return _scalar(kind, text, key)


def _router_value(option: str, text: str):
    types = _router_option_types()
    if option in types:
        return _scalar(types[option], text, f"router.{option}")
    for kind in (int, float):  # an option without a rule: a number where it reads as one
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _format_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return _LIST_SEPARATOR.join(_format_value(v) for v in value)
    return str(value)
