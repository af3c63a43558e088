"""How a brick combines the routed experts it selects: part of the brick's saved description.

- ``sum``: the selected experts' outputs summed with weight 1 (MoEfication, Zhang et al. 2022): with every expert
  selected the brick computes the dense FFN. Stock MoE formats hold it exactly only for top-1 with
  renormalisation.
- ``softmax``: ``p = softmax(scores / temperature)`` over all routed experts; the top-k experts by p, each weighted
  ``scale * p``. Qwen2-MoE with ``norm_topk_prob=False`` and llama.cpp's ``qwen2moe`` compute this (the scale
  is folded into the experts' down projections on export).
- ``softmax_topk``: as ``softmax``, with the k weights renormalised to sum to one before ``scale``: Mixtral
  (Jiang et al. 2024), Qwen2-MoE with ``norm_topk_prob=True``, Qwen3-MoE.
- ``sigmoid``: ``p = sigmoid(scores / temperature)`` for each expert on its own; the top-k experts by p, each
  weighted ``scale * p`` (no renormalisation): DeepSeek-V3's gate (DeepSeek-AI 2024) as GLM-4.5's ``glm4_moe``
  computes it with ``norm_topk_prob=False``, one expert group, and a zero selection bias (llama.cpp's
  ``glm4moe``). Weights do not compete, so at a large temperature every selected expert weighs about
  ``scale / 2`` and the rule approaches the unweighted sum, which the fit can choose where it is better.

Scores here are the router's (``brick.router(x)``); the temperature divides them before the softmax, and export
divides the router's weights by it (a power of two when :func:`fit_combine` chose it: exact in floating point).
Selection is by the float32 probabilities, as the engines select, with exact ties broken by position (the lower
expert first).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from brickwork.routing.base import topk_by_position

COMBINE_RULES: tuple[str, ...] = ("sum", "softmax", "softmax_topk", "sigmoid")


# A k-th/(k+1)-th logit gap (scores / temperature) below this is "fragile": float32 probabilities 2^-21 apart
# differ by about 8 units in the last place, within reach of another engine's exp() and summation order. (How
# close the scores themselves are does not depend on the temperature: that is the router's own fragility, the
# same for the unweighted sum.)
FRAGILE_GAP = 2.0**-21
# sigmoid: the largest |k-th logit| / temperature allowed on the calibration tokens. Beyond it the top experts'
# probabilities crowd towards 1, where float32 barely orders them (sigmoid(17) rounds to 1), and held-out tokens
# with larger logits than any calibration token would tie; sigmoid(8) = 1 - 3.4e-4 leaves a margin of two.
SIGMOID_SATURATION = 8.0
# fit_combine takes the smallest temperature whose error is within this factor of the best one: a larger one
# buys nothing measurable and makes more tokens fragile.
NEAR_BEST = 1.01


@dataclass(frozen=True)
class Combine:
    """The combination rule of one brick (see the module docstring)."""

    rule: str = "sum"
    temperature: float = 1.0
    scale: float = 1.0

    def __post_init__(self):
        if self.rule not in COMBINE_RULES:
            raise ValueError(f"combine rule must be one of {COMBINE_RULES}, got {self.rule!r}")
        for name in ("temperature", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"combine {name} must be a finite number, got {value!r}")
            if value <= 0:
                raise ValueError(f"combine {name} must be > 0, got {value!r}")
        if self.rule == "sum" and (self.temperature != 1.0 or self.scale != 1.0):
            raise ValueError("the 'sum' rule has no temperature or scale")

    @property
    def weighted(self) -> bool:
        return self.rule != "sum"

    @property
    def renormalise(self) -> bool:
        return self.rule == "softmax_topk"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record) -> Combine:
        """From :meth:`to_dict`'s form; ValueError on anything else."""
        if not isinstance(record, dict) or not set(record) <= {"rule", "temperature", "scale"}:
            raise ValueError(f"combine must be {{rule, temperature, scale}}, got {record!r}")
        return cls(**record)

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` float32 softmax (``sigmoid``: sigmoid) of ``scores / temperature``: the engines' fp32 router
        probabilities, by which they select and weight."""
        if self.rule == "sigmoid":
            return torch.sigmoid(scores.float() / self.temperature)
        return torch.softmax(scores.float() / self.temperature, dim=-1)

    def shares(self, scores: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` each token's router probabilities as a distribution over the experts (sigmoid scores are
        normalised to sum to one, as DeepSeek-V3's balance loss normalises them): what a balance loss averages."""
        probs = self.probabilities(scores)
        return probs / probs.sum(-1, keepdim=True) if self.rule == "sigmoid" else probs

    def route(self, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [T, k], weights [T, k])`` of a weighted rule from the router's ``scores [T, E]``."""
        probs = self.probabilities(scores)
        indices = topk_by_position(probs, k)
        return indices, self.weigh(probs.gather(1, indices))

    def weigh(self, selected: torch.Tensor) -> torch.Tensor:
        """``[T, k]`` weights of the selected experts from their probabilities ``selected [T, k]``: renormalised
        over the k (``softmax_topk``; a slot whose probability is set to zero takes no share), times ``scale``."""
        if self.renormalise:
            selected = selected / selected.sum(-1, keepdim=True)
        return selected * self.scale


def boundary_ties(probs: torch.Tensor, k: int) -> torch.Tensor:
    """``[T]`` bool: the k-th and (k+1)-th largest probabilities are equal and not zero, so engines may select
    different experts with different weights (ties at zero, from underflow, weigh nothing either way)."""
    if k >= probs.shape[-1]:
        return torch.zeros(len(probs), dtype=torch.bool)
    top = probs.topk(k + 1, dim=-1).values
    return (top[:, k - 1] == top[:, k]) & (top[:, k] > 0)


@torch.no_grad()
def fit_combine(
    rule: str,
    scores: torch.Tensor,
    outputs: torch.Tensor,
    target: torch.Tensor,
    k: int,
    powers: range = range(-8, 21),
    max_fragile: float = 1e-2,
) -> tuple[Combine, dict]:
    """The temperature (a power of two) and scale of ``rule`` that best reproduce ``target`` on calibration tokens.

    ``scores [N, E]``: the router's scores; ``outputs [N, k, D]``: the outputs of the k experts the scores select
    (in score order; the order of the probabilities is the same, so selection does not depend on the
    temperature); ``target [N, D]``: what the routed experts should add up to (the dense FFN's routed part). For
    each temperature the least-squares scale is closed-form, and the relative error ``||c y - r||^2 / ||r||^2``
    over all tokens is ``1 - <y, r>^2 / (<y, y> <r, r>)``. (Measured on SmolLM2, 64 experts at 50%: this global
    error picks temperatures that evaluate better than a per-token relative error does, x3.64 against x6.14.)

    Robust to rounding: engines sum the router's dot products in other orders, so a token whose k-th and
    (k+1)-th logits (``scores / T``) are closer than rounding could select differently there. A token is
    *fragile* at T when that gap is below :data:`FRAGILE_GAP` times ``max(1, |k-th logit|)``, or when its k-th and
    (k+1)-th float32 probabilities tie exactly (and are not zero). Temperatures that make more than
    ``max(max_fragile, the least fragile share over all temperatures)`` of the calibration tokens fragile are
    skipped (``sigmoid``: also those where a token's k-th logit exceeds :data:`SIGMOID_SATURATION`); of the rest,
    the smallest temperature whose error is within :data:`NEAR_BEST` of the least. Returns
    the rule and
    ``{"relative_error", "sum_relative_error", "temperature", "scale", "fragile"}`` (``sum_relative_error``: the
    unweighted sum's error; ``fragile``: the share of fragile tokens at the chosen temperature).
    """
    if rule not in COMBINE_RULES or rule == "sum":
        raise ValueError(f"fit_combine fits a weighted rule ({COMBINE_RULES[1:]}), got {rule!r}")
    outputs, target = outputs.float(), target.float()
    rr = float(target.double().pow(2).sum())
    sum_error = float((outputs.sum(1).double() - target.double()).pow(2).sum()) / max(rr, 1e-300)
    ordered = scores.double().sort(dim=-1, descending=True).values
    if k < scores.shape[-1]:
        gaps, size = ordered[:, k - 1] - ordered[:, k], ordered[:, k - 1].abs()
    else:
        gaps, size = torch.full((len(scores),), math.inf), torch.zeros(len(scores))

    def fragile_share(combine: Combine) -> float:
        # gap / T below FRAGILE_GAP * max(1, |logit| / T) (the threshold grows with the logits' own size), or
        # an exact tie of non-zero float32 probabilities
        close = gaps < FRAGILE_GAP * size.clamp_min(combine.temperature)
        if rule == "sigmoid" and k < scores.shape[-1]:
            # sigmoid flattens large logits: near 1 (and near 1/2 at large T) distinct logits give probabilities
            # within a few units in the last place, so the gap is measured where engines compare, in probability
            p = torch.sigmoid(ordered[:, k - 1 : k + 1] / combine.temperature)
            close |= (p[:, 0] - p[:, 1]) < FRAGILE_GAP * p[:, 0]
        return float((close | boundary_ties(combine.probabilities(scores), k)).double().mean())

    shares = {power: fragile_share(Combine(rule, temperature=2.0**power)) for power in powers}
    allowed = max(max_fragile, min(shares.values()))
    candidates = []  # (error, temperature, scale, fragile) in increasing temperature
    kth = ordered[:, k - 1].abs().max() if len(scores) else torch.tensor(0.0)
    for power in powers:
        combine = Combine(rule, temperature=2.0**power)
        if shares[power] > allowed:
            continue
        if rule == "sigmoid" and float(kth) / combine.temperature > SIGMOID_SATURATION:
            continue
        _, weights = combine.route(scores, k)
        y = torch.bmm(weights[:, None, :], outputs)[:, 0].double()
        yr, yy = float((y * target.double()).sum()), float(y.pow(2).sum())
        if yy <= 0 or yr <= 0:
            continue
        error = 1.0 - yr * yr / (yy * rr) if rr > 0 else 0.0
        candidates.append((error, combine.temperature, yr / yy, shares[power]))
    if not candidates:
        raise ValueError(
            "the router's scores give no usable weights at any temperature (all zero or negative)"
        )
    least = min(c[0] for c in candidates)
    near = [c for c in candidates if c[0] <= least * NEAR_BEST + 1e-12]
    error, temperature, scale, fragile = near[0]
    scale = float(torch.tensor(scale, dtype=torch.float32))  # a float32 value: what every path multiplies by
    combine = Combine(rule, temperature=temperature, scale=scale)
    return combine, {
        "relative_error": error,
        "sum_relative_error": sum_error,
        "temperature": temperature,
        "scale": scale,
        "fragile": fragile,
    }
