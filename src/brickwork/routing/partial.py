"""``partial``: score neurons by their activation computed from each token's largest inputs only.

Input sparsity comes from TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language
Models"): most of ``W x`` comes from the few coordinates of x with the largest magnitude. Here that cheap,
exact-on-a-subset signal is the router: for each token, gate and up are computed from the
``ceil(input_fraction * D)`` largest |x_j| alone, and an expert's score is the sum over its neurons of
``|act(g~) * u~|`` (``|act(u~)|`` for plain FFNs). No fitting, no extra parameters.

Weights read: the partial columns of every routed neuron. The selected neurons reuse their partial sums and
read only their remaining columns, so the router's own cost is the partial columns of the neurons it leaves
out; :meth:`weights_read` counts exactly that (a kernel must reuse the sums to achieve it; the reference
forward recomputes them, which changes the time, not the result).
"""

from __future__ import annotations

import math

import torch

from brickwork.routing.base import Router, RouterInputs, register_router, topk_by_position

DEFAULT_INPUT_FRACTION = 0.25


@register_router
class PartialInputRouter(Router):
    kind = "partial"
    computes = "partial"
    predicts_mass = True

    def __init__(self, input_fraction: float = DEFAULT_INPUT_FRACTION):
        super().__init__()
        if not 0 < input_fraction <= 1:
            raise ValueError(f"input_fraction must be in (0, 1], got {input_fraction}")
        self.input_fraction = input_fraction

    def sparse_inputs(self, x: torch.Tensor, by_position: bool = False) -> torch.Tensor:
        """x with all but its ``input_fraction`` largest-magnitude coordinates (per token) set to zero (ties
        broken by position with ``by_position``, as the kernels break them)."""
        keep = max(1, math.ceil(self.input_fraction * x.shape[-1]))
        if by_position:
            index = topk_by_position(x.abs(), keep)
        else:
            index = x.abs().topk(keep, dim=-1, sorted=False).indices
        return torch.zeros_like(x).scatter_(-1, index, x.gather(-1, index))

    def forward(self, x, brick):
        exact = brick.exact(x)  # float64 sums rounded once (see BrickFFN): the scores the kernels compute
        h = brick.hidden(self.sparse_inputs(x, by_position=exact), brick.num_shared, brick.d_ff)
        h = h.abs().view(x.shape[0], brick.num_experts, brick.expert_size)
        return h.sum(-1, dtype=torch.float64).float() if exact else h.sum(-1)

    def weights_read(self, brick, routed=None) -> int:
        left_out = brick.expert_size * (brick.num_experts - (brick.active if routed is None else routed))
        keep = math.ceil(self.input_fraction * brick.d_model)
        return keep * (2 if brick.gate is not None else 1) * left_out

    def extra_config(self) -> dict:
        return {"input_fraction": self.input_fraction}

    @classmethod
    def build(
        cls, inputs: RouterInputs, input_fraction: float = DEFAULT_INPUT_FRACTION
    ) -> PartialInputRouter:
        return cls(input_fraction)

    @classmethod
    def empty(
        cls, num_experts, d_model, d_ff, gated, input_fraction: float = DEFAULT_INPUT_FRACTION, **extra
    ):
        return cls(input_fraction)
