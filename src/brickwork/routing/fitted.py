"""``fitted``: a linear router fitted in closed form to predict each expert's activation mass.

Zhang et al. 2022, "MoEfication" (routers trained to predict which experts carry the most activation). Here
the predictor is linear, ``score = x W + b``, fitted per layer by ridge regression of the experts' true mass
``sum_{i in e} |h_i|`` on the calibration FFN inputs: one D x D solve, a second or less per layer on a CPU.
``target="output"`` regresses the norm of each expert's contribution to the FFN output instead of its mass.
``intercept=False`` fits ``score = x W`` alone, the form of the gates of stock MoE architectures (Mixtral,
Qwen2-MoE), so that the carve can be exported to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from brickwork.routing.base import (
    LINEAR_FAST_PATHS,
    Router,
    RouterInputs,
    RouterOptions,
    register_router,
    router_option,
)

RIDGE = 1e-3  # relative to the mean diagonal of X^T X


def ridge_fit(
    x: torch.Tensor, y: torch.Tensor, ridge: float = RIDGE, intercept: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [out, in] and bias [out] minimising ||x W^T + b - y||^2 + ridge * scale * ||W||^2 (b = 0 without
    an intercept)."""
    x, y = x.double(), y.double()
    if not intercept:
        gram = x.t() @ x
        gram.diagonal().add_(ridge * gram.diagonal().mean().clamp_min(1e-12))
        return torch.linalg.solve(gram, x.t() @ y).t(), torch.zeros(y.shape[1], dtype=y.dtype)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.t() @ xc
    gram.diagonal().add_(ridge * gram.diagonal().mean().clamp_min(1e-12))
    weight = torch.linalg.solve(gram, xc.t() @ yc).t()
    return weight, y_mean - weight @ x_mean


@dataclass(frozen=True)
class FittedOptions(RouterOptions):
    intercept: bool = router_option(True, "fit a bias (false: the bias-free gate stock MoE formats hold)")
    target: Literal["mass", "output"] = router_option(
        "mass", "what the scores regress: each expert's activation mass, or the norm of its output"
    )


@register_router
class FittedRouter(Router):
    kind = "fitted"
    computes = "linear"
    predicts_mass = True
    needs_samples = True
    Options = FittedOptions
    fast_paths = LINEAR_FAST_PATHS
    param_layout = {"weight": "expert", "bias": "expert"}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)  # [E, D]
        self.bias = torch.nn.Parameter(bias)

    def forward(self, x, brick):
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def linear_form(self):
        return self.weight, self.bias

    def refit(self, brick, x, h_dense) -> bool:
        """The ridge fit again, of each routed expert's mass in ``h_dense`` on ``x`` (with an intercept only where
        the router has a bias that is not all zero)."""
        if not brick.num_experts:
            return False
        s, e, size = brick.num_shared, brick.num_experts, brick.expert_size
        mass = h_dense[:, s:].abs().view(-1, e, size).sum(-1)
        intercept = bool(self.bias.abs().max() > 0)
        weight, bias = ridge_fit(x, mass, intercept=intercept)
        self.weight.copy_(weight.to(self.weight.dtype))
        self.bias.copy_(bias.to(self.bias.dtype))
        return True

    @classmethod
    def build(cls, inputs: RouterInputs, intercept: bool = True, target: str = "mass") -> FittedRouter:
        mass = inputs.expert_importance(target)  # raises a clear error when no samples were kept
        weight, bias = ridge_fit(inputs.inputs, mass, intercept=intercept)
        dtype = inputs.weights.up.dtype
        return cls(weight.to(dtype), bias.to(dtype))

    @classmethod
    def empty(cls, num_experts, d_model, d_ff, gated, **extra):
        return cls(torch.zeros(num_experts, d_model), torch.zeros(num_experts))
