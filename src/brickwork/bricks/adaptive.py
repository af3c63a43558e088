"""Per-token budgets: the router chooses how many routed experts each token runs, up to the carve's ``active``.

A brick runs the top ``active`` routed experts of every token. With a :class:`TokenBudget` in its spec that number
is a cap: each token keeps the first ``k_t`` of those experts, in router order, the fewest (but at least
``min_active``) whose router mass reaches ``threshold`` times the mass of all ``active``. This is top-p routing
(Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"), applied within a cap so that
the worst case per token stays the carve's.

MoE++'s zero-computation "zero" expert (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with
Zero-Computation Experts") outputs nothing and costs nothing. Here it is a virtual expert of constant router mass
``zero_mass`` that every token holds for free: a token keeps the fewest experts with ``kept mass + zero_mass >=
threshold * (cap mass + zero_mass)``, i.e. it may drop ``(1 - threshold) * (its cap mass + zero_mass)`` of mass. At
``zero_mass`` 0 the share dropped is relative to the token's own mass; as it grows, tokens whose router predicts
little mass drop more, and with ``min_active=0`` a token whose whole cap mass is at most
``zero_mass * (1 - threshold) / threshold`` runs no routed expert at all (the shared neurons always run).

``copy_gain`` adds MoE++'s "copy" expert, whose output is its input: a token that drops a share ``d_t`` of its
cap's router mass adds ``copy_gain * d_t * x``, the dropped experts replaced by a multiple of the FFN input
(:func:`fit_copy_gain` fits the gain in closed form on calibration inputs). It reads one number, no weight row.

Router mass: for the weighted combine rules, the rule's probabilities of the cap's experts (what the engines
weight them by); for the ``sum`` rule, the router's scores clamped at 0, for routers that declare their scores to
be an estimate of each expert's activation mass (``Router.predicts_mass``: ``fitted``, ``oracle``, ``partial``,
``lowrank``, ``representative``). Other routers' scores have no mass to share out and are refused.

Exactness: the cumulative masses are float64 sums in router order, so every path keeps the same experts. A
threshold of 1 keeps every expert of the cap, as a carve without a token budget does, bit for bit (the paths then
route exactly as without one). A dropped slot of the fixed-shape ``[T, active]`` selection holds -1 (weight 0);
every path skips it and reads no weights for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from brickwork.errors import BrickworkError
from brickwork.routing.base import topk_by_position

if TYPE_CHECKING:
    from brickwork.bricks.module import BrickFFN


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TokenBudget:
    """How many of a brick's ``active`` routed experts each token keeps (see the module docstring)."""

    threshold: float = field(
        default=1.0,
        metadata={
            "help": "share of the cap's router mass a token's kept experts must reach, in (0, 1]; 1 keeps all"
        },
    )
    min_active: int = field(
        default=1, metadata={"help": "routed experts every token keeps at least (0: a token may keep none)"}
    )
    copy_gain: float = field(
        default=0.0,
        metadata={
            "help": "MoE++'s copy expert: a token adds copy_gain x (dropped share of mass) x its input"
        },
    )
    zero_mass: float = field(
        default=0.0,
        metadata={
            "help": "MoE++'s zero expert: router mass every token holds for free (>= 0, the router's units)"
        },
    )

    def __post_init__(self) -> None:
        if not _number(self.threshold) or not 0 < self.threshold <= 1:
            raise ValueError(f"token budget threshold must be in (0, 1], got {self.threshold!r}")
        if isinstance(self.min_active, bool) or not isinstance(self.min_active, int) or self.min_active < 0:
            raise ValueError(f"token budget min_active must be an integer >= 0, got {self.min_active!r}")
        if not _number(self.copy_gain):
            raise ValueError(f"token budget copy_gain must be a finite number, got {self.copy_gain!r}")
        if not _number(self.zero_mass) or self.zero_mass < 0:
            raise ValueError(f"token budget zero_mass must be a finite number >= 0, got {self.zero_mass!r}")
        for name in ("threshold", "copy_gain", "zero_mass"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def adaptive(self) -> bool:
        """Whether tokens may keep fewer experts than the cap (a threshold of 1 keeps them all)."""
        return self.threshold < 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record) -> TokenBudget:
        """From :meth:`to_dict`'s form; ValueError on anything else."""
        if not isinstance(record, dict) or not set(record) <= {
            "threshold",
            "min_active",
            "copy_gain",
            "zero_mass",
        }:
            raise ValueError(
                f"a token budget is {{threshold, min_active, copy_gain, zero_mass}}, got {record!r}"
            )
        return cls(**record)


def kept_counts(mass: torch.Tensor, budget: TokenBudget) -> torch.Tensor:
    """``[T]`` int64: how many of the cap's experts each token keeps, from their router ``mass [T, active]`` in
    router order (non-negative): the smallest k >= ``min_active`` whose first k masses and ``zero_mass`` reach
    ``threshold`` times all of them and ``zero_mass``, summed in float64 (k = 0 when the zero expert alone
    reaches it)."""
    cap = mass.shape[-1]
    if not budget.adaptive:
        return torch.full(mass.shape[:1], cap, dtype=torch.int64, device=mass.device)
    cumulative = mass.double().cumsum(-1)
    zero = budget.zero_mass
    goal = budget.threshold * (cumulative[:, -1:] + zero) - zero  # what the kept experts' mass must reach
    # the first k with cumsum_k >= goal is 1 + (how many cumsums fall short), cumsum_0 = 0 counting only when
    # the goal is above zero
    short = (cumulative < goal).sum(-1) + (goal[:, 0] > 0).long()
    return short.clamp(max(0, min(budget.min_active, cap)), cap)


def dropped_share(mass: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``[T]`` float64: the share of the cap's router mass each token drops by keeping its first ``kept``
    experts (0 where the mass is all zero)."""
    cumulative = torch.cat([mass.new_zeros(len(mass), 1).double(), mass.double().cumsum(-1)], dim=1)
    total = cumulative[:, -1]
    share = 1.0 - cumulative.gather(1, kept[:, None])[:, 0] / total.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(total > 0, share, torch.zeros_like(share))


def drop_slots(selection: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``[T, active]`` bool: the slots past each token's ``kept`` experts (they become -1 in the selection)."""
    slots = torch.arange(selection.shape[1], device=selection.device)
    return slots[None, :] >= kept[:, None]


def copy_coefficients(budget: TokenBudget, dropped: torch.Tensor) -> torch.Tensor | None:
    """``[T]`` float32 ``copy_gain * dropped`` (what each token's copy expert multiplies its input by), or None
    when no copy gain is set or no token drops any mass."""
    if budget.copy_gain == 0 or not bool((dropped > 0).any()):
        return None
    return (budget.copy_gain * dropped).float()


# --- a brick's routing within its cap (BrickFFN.route_tokens; the kernels cut by mass in cpu.cut_by_mass) -----------
def ranked_values(brick: BrickFFN, scores: torch.Tensor) -> torch.Tensor:
    """``[T, E]`` what a per-token budget ranks ``brick``'s experts by and reads their mass from: the combine rule's
    probabilities, or for the ``sum`` rule the router's scores (their mass: clamped at 0), if they estimate
    activation mass (``Router.predicts_mass``); else a BrickworkError saying what to carve instead."""
    if brick.combine.weighted:
        return brick.combine.probabilities(scores)
    if not brick.router.predicts_mass:
        raise BrickworkError(
            f"a per-token budget keeps experts by their share of the router's mass, and the "
            f"'{brick.router.kind}' router's scores do not estimate it (sum combine rule): carve with a router "
            "that predicts activation mass (fitted, oracle, partial, lowrank, representative) or with a weighted "
            "combine rule (softmax, softmax_topk, sigmoid)"
        )
    return scores


def cap_mass(brick: BrickFFN, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selection [T, active], mass [T, active])``: each token's top ``active`` experts by
    :func:`ranked_values` in router order (ties by position) and their router mass."""
    values = ranked_values(brick, scores)
    selection = topk_by_position(values, brick.active)
    mass = values.gather(1, selection)
    return selection, mass if brick.combine.weighted else mass.clamp_min(0)


def kept_weights(brick: BrickFFN, mass: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor | None:
    """A weighted rule's ``[T, active]`` weights of the kept experts from their probabilities ``mass`` (a dropped
    slot weighs 0 and takes no share of a renormalised total); None for the ``sum`` rule."""
    if not brick.combine.weighted:
        return None
    return brick.combine.weigh(mass.masked_fill(dropped, 0.0)).masked_fill(dropped, 0.0)


def route_within_cap(brick: BrickFFN, scores: torch.Tensor):
    """``(selection [T, active], weights or None, copy coefficients or None)`` of a brick with a per-token budget,
    from its router's ``scores``: the cap in router order, then each token's first experts by
    :func:`kept_counts`; the slots past them hold -1."""
    budget = brick.spec.token_budget
    selection, mass = cap_mass(brick, scores)
    kept = kept_counts(mass.detach(), budget)
    dropped = drop_slots(selection, kept)
    copy = copy_coefficients(budget, dropped_share(mass.detach(), kept)) if budget.copy_gain else None
    return selection.masked_fill(dropped, -1), kept_weights(brick, mass, dropped), copy


def add_copy(y: torch.Tensor, x: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    """``y [T, D]`` plus each token's copy expert, ``copy [T] * x [T, D]``, in y's dtype: the same operations on
    every path, so that the paths that agree on y agree on the sum."""
    return y + copy[:, None].to(y.dtype) * x.to(y.dtype)


@torch.no_grad()
def fit_copy_gain(inputs: torch.Tensor, dropped: torch.Tensor, lost: torch.Tensor) -> float:
    """The least-squares ``g`` of ``lost ≈ g * dropped * inputs`` over calibration tokens: ``inputs [N, D]`` the
    FFN inputs, ``dropped [N]`` each token's dropped share of router mass, ``lost [N, D]`` what the cap's
    experts add that the kept ones do not. Closed form, ``sum_t d_t <lost_t, x_t> / sum_t d_t^2 ||x_t||^2``
    (0 when no token drops anything); rounded to a float32 value, which every path multiplies by."""
    d = dropped.double()
    x = inputs.double()
    denominator = float((d.pow(2) * x.pow(2).sum(-1)).sum())
    if denominator <= 0:
        return 0.0
    numerator = float((d * (lost.double() * x).sum(-1)).sum())
    return float(torch.tensor(numerator / denominator, dtype=torch.float32))
