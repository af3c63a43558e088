"""``centroid``: score = x . (mean key of the expert's neurons); training-free.

Qiu et al. 2024, "Unlocking Emergent Modularity in Large Language Models" (EMoE): an expert's key is the
average of its neurons' input weights (gate rows for gated FFNs, up rows otherwise), so its dot product with x
estimates how strongly the expert's neurons respond.
"""

from __future__ import annotations

import torch

from brickwork.routing.base import LINEAR_FAST_PATHS, Router, RouterInputs, register_router


@register_router
class CentroidRouter(Router):
    kind = "centroid"
    computes = "linear"
    fast_paths = LINEAR_FAST_PATHS
    param_layout = {"keys": "expert", "bias": "expert"}

    def __init__(self, keys: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.keys = torch.nn.Parameter(keys)  # [E, D]
        self.bias = torch.nn.Parameter(bias)  # [E]

    def forward(self, x, brick):
        return torch.nn.functional.linear(x, self.keys, self.bias)

    def linear_form(self):
        return self.keys, self.bias

    @classmethod
    def build(cls, inputs: RouterInputs) -> CentroidRouter:
        w = inputs.weights
        key_rows, key_bias = (w.up, w.up_bias) if w.gate is None else (w.gate, w.gate_bias)
        experts = inputs.grouping.experts
        keys = key_rows.detach().float()[experts].mean(1)
        bias = (
            key_bias.detach().float()[experts].mean(1) if key_bias is not None else torch.zeros(len(experts))
        )
        return cls(keys.to(key_rows.dtype), bias.to(key_rows.dtype))

    @classmethod
    def empty(cls, num_experts, d_model, d_ff, gated, **extra):
        return cls(torch.zeros(num_experts, d_model), torch.zeros(num_experts))
