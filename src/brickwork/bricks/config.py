"""CarveConfig: how each FFN is cut into shared and routed experts, and how tokens are routed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

CONFIG_VERSION = 1
# accumulate="auto" sums in float64 when more experts than this are routed (neuron-level and fine-grained carves):
# on SmolLM2 the fast and reference paths of 16-expert carves agree exactly with float32 sums, those of
# neuron-level carves (1,536 routed) do not (bench/results/path-agreement).
EXACT_ABOVE = 64
# What BrickFFN.accumulate takes (CarveConfig also takes "auto").
ACCUMULATE = ("float32", "float64")


@dataclass
class CarveConfig:
    """How to carve.

    Each carved FFN is cut into ``experts`` equal slices of ``d_ff / experts`` neurons; ``shared`` of them run
    for every token and ``active`` of the other ``experts - shared`` (routed) ones are picked per token by the
    router. So ``(shared + active) / experts`` of the FFN runs per token; e.g. ``experts=16, shared=2,
    active=2`` runs 25%. ``experts = d_ff`` is the neuron level. Instead of ``active``, ``active_fraction``
    asks for a fraction of the FFN: ``active = round(active_fraction * experts) - shared``.

    ``router_options`` passes keyword arguments to the router's builder (e.g. ``{"rank": 64}`` for lowrank).
    ``down_fraction`` (of d_ff) caps how many of the computed neurons' down rows each token reads: those with
    the largest |h| (default: all computed neurons).

    ``accumulate``: ``"float64"`` sums in float64 and rounds once at inference, so that every kernel path gives
    the reference path's float32 values (see :class:`~brickwork.bricks.BrickFFN`); ``"float32"`` sums in float32
    (faster for batches: the grouped and dense-down paths are float32 matmuls). ``"auto"`` (default): float64 when
    more than :data:`EXACT_ABOVE` experts are routed (choosing among many small experts leaves near-ties that
    float32 rounding flips), float32 otherwise.
    """

    experts: int = 16
    shared: int = 2
    active: int | None = 2
    active_fraction: float | None = None
    method: str = "activation"
    router: str = "fitted"
    router_options: dict = field(default_factory=dict)
    down_fraction: float | None = None
    layers: list[int] | None = None  # None: every FFN
    seed: int = 0
    calib_tokens: int = 16384  # tokens profiled for grouping and routers
    router_samples: int = 8192  # of those, how many (x, h) pairs routers are fitted on
    window: int = 512
    accumulate: str = "auto"

    def __post_init__(self) -> None:
        from brickwork.grouping import GROUPING_METHODS
        from brickwork.routing import ROUTERS

        if self.experts < 1:
            raise ValueError(f"experts must be >= 1, got {self.experts}")
        if not 0 <= self.shared < self.experts:
            raise ValueError(
                f"shared must be in [0, experts - 1] = [0, {self.experts - 1}], got {self.shared}"
            )
        routed = self.experts - self.shared
        if self.active_fraction is not None:
            if not 0 < self.active_fraction <= 1:
                raise ValueError(f"active_fraction must be in (0, 1], got {self.active_fraction}")
            resolved = round(self.active_fraction * self.experts) - self.shared
            if resolved < 1:
                raise ValueError(
                    f"active_fraction {self.active_fraction} with {self.shared} shared of {self.experts} "
                    "experts leaves no routed expert active: raise it or lower `shared`"
                )
            self.active = min(resolved, routed)
        if self.active is None:
            raise ValueError("give `active` (routed experts per token) or `active_fraction`")
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
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError("layers must be a non-empty list of layer indices >= 0 (or None for all)")
        if self.accumulate != "auto" and self.accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be auto, float32 or float64, got {self.accumulate!r}")
        if self.calib_tokens < self.window or self.router_samples < 1:
            raise ValueError(f"calib_tokens must be >= window ({self.window}) and router_samples >= 1")

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
        return {"version": CONFIG_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> CarveConfig:
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(f"carve config version {version} is newer than this brickwork understands")
        return cls(**data)
