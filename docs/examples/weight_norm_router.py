"""``weight-norm``: a router written as one file, the example of the README's "Writing a router".

An expert's key is the mean of its neurons' gate rows (up rows for plain FFNs), each row scaled by the norm of the
neuron's down row raised to ``power``: the centroid router's key (EMoE, Qiu et al. 2024) weighted by how far each
neuron can move the output, the weight-informed scaling of WINA (Chen et al. 2025, "WINA: Training-free Sparse
Activation via Weight Informed Neuron Activation"). Training-free: it is built from the weights alone.

Everything brickwork asks of a router is declared here, and nothing elsewhere names it:

- ``Options``: its one option, typed, with its range (``brickwork carve --router weight-norm --router-option
  power=2``);
- ``computes = "linear"`` and ``fast_paths``: its scores are ``x W^T``, so the CPU kernels route it inside their
  compiled calls;
- ``param_layout``: its weight has a row per routed expert, so ``prune`` and ``update`` slice it;
- :meth:`refit`: local recovery rebuilds the keys from the brick's recovered weights;
- re-budgeting: the default (the number of routed experts changes).

Register it by importing this file (the test suite does, so every router battery runs it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brickwork.routing.base import (
    LINEAR_FAST_PATHS,
    Router,
    RouterInputs,
    RouterOptions,
    register_router,
    router_option,
)


def _keys(rows: torch.Tensor, down_norms: torch.Tensor, power: float) -> torch.Tensor:
    """``[E, D]`` keys from each expert's rows ``[E, size, D]`` and down-row norms ``[E, size]``."""
    return (rows.float() * down_norms.float()[..., None] ** power).mean(1)


@dataclass(frozen=True)
class WeightNormOptions(RouterOptions):
    power: float = router_option(
        1.0, "exponent of the down-row norm scaling each gate row", lambda v: v >= 0, "a number >= 0"
    )


@register_router
class WeightNormRouter(Router):
    kind = "weight-norm"
    computes = "linear"
    fast_paths = LINEAR_FAST_PATHS
    param_layout = {"weight": "expert"}
    Options = WeightNormOptions

    def __init__(self, weight: torch.Tensor, power: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)  # [E, D]
        self.power = power

    def forward(self, x, brick):
        return torch.nn.functional.linear(x, self.weight)

    def linear_form(self):
        return self.weight, None

    def extra_config(self) -> dict:
        return {"power": self.power}

    @torch.no_grad()
    def refit(self, brick, x, h_dense) -> bool:
        """The keys again, from the brick's own rows (stored order), whose down rows local recovery has refitted."""
        s, e, size = brick.num_shared, brick.num_experts, brick.expert_size
        if not e:
            return False
        rows = (brick.up if brick.gate is None else brick.gate)[s:].view(e, size, -1)
        norms = brick.down_t[s:].norm(dim=1).view(e, size)
        self.weight.copy_(_keys(rows, norms, self.power).to(self.weight.dtype))
        return True

    @classmethod
    def build(cls, inputs: RouterInputs, power: float = 1.0) -> WeightNormRouter:
        w = inputs.weights
        rows = w.up if w.gate is None else w.gate  # [F, D], original neuron order
        experts = inputs.grouping.experts  # [E, size] neuron indices
        norms = w.down.norm(dim=0)  # [F]: the norm of each neuron's down row
        return cls(_keys(rows[experts], norms[experts], power).to(rows.dtype), power)

    @classmethod
    def empty(cls, num_experts, d_model, d_ff, gated, power: float = 1.0, **extra):
        return cls(torch.zeros(num_experts, d_model), power)
