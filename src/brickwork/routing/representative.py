"""``representative``: CMoE's training-free router, built from each expert's most central neuron.

Pei et al. 2025, "CMoE: Fast Carving of Mixture-of-Experts for Efficient LLM Inference". For each expert the
representative is the member most co-activated with the rest of its expert (or, without co-activation
statistics, its most frequently active member); the expert's score is that neuron's own |h|,
``|act(gate_r . x) * (up_r . x)|``, computed from its two weight rows.
"""

from __future__ import annotations

import torch

from brickwork.routing.base import Router, RouterInputs, register_router


@register_router
class RepresentativeRouter(Router):
    kind = "representative"
    predicts_mass = True
    param_layout = {"up": "expert", "up_bias": "expert", "gate": "expert", "gate_bias": "expert"}

    def __init__(
        self,
        up: torch.Tensor,
        up_bias: torch.Tensor,
        gate: torch.Tensor | None,
        gate_bias: torch.Tensor | None,
    ):
        super().__init__()
        self.up = torch.nn.Parameter(up)
        self.up_bias = torch.nn.Parameter(up_bias)
        self.gate = None if gate is None else torch.nn.Parameter(gate)
        self.gate_bias = None if gate_bias is None else torch.nn.Parameter(gate_bias)

    def forward(self, x, brick):
        up = torch.nn.functional.linear(x, self.up, self.up_bias)
        if self.gate is None:
            return brick.act(up).abs()
        return (brick.act(torch.nn.functional.linear(x, self.gate, self.gate_bias)) * up).abs()

    @staticmethod
    def representatives(inputs: RouterInputs) -> torch.Tensor:
        experts = inputs.grouping.experts
        if inputs.coactivation is not None:
            c = inputs.coactivation.double()
            centrality = torch.stack([c[e][:, e].sum(1) for e in experts])  # [E, m]
        else:
            centrality = inputs.stats["topk_rate"].double()[experts]
        return experts.gather(1, centrality.argmax(1, keepdim=True)).squeeze(1)

    @classmethod
    def build(cls, inputs: RouterInputs) -> RepresentativeRouter:
        w = inputs.weights
        rep = cls.representatives(inputs)

        def rows(t):
            return None if t is None else t.detach()[rep].clone()

        zeros = torch.zeros(len(rep), dtype=w.up.dtype)
        up_bias = rows(w.up_bias) if w.up_bias is not None else zeros
        gate_bias = (
            None if w.gate is None else (rows(w.gate_bias) if w.gate_bias is not None else zeros.clone())
        )
        return cls(rows(w.up), up_bias, rows(w.gate), gate_bias)

    @classmethod
    def empty(cls, num_experts, d_model, d_ff, gated, **extra):
        gate = torch.zeros(num_experts, d_model) if gated else None
        gate_bias = torch.zeros(num_experts) if gated else None
        return cls(torch.zeros(num_experts, d_model), torch.zeros(num_experts), gate, gate_bias)
