"""``lowrank``: predict each neuron's |h| from rank-r approximations of the gate and up projections.

The predictor idea is Deja Vu's (Liu et al. 2023, "Deja Vu: Contextual Sparsity for Efficient LLMs at
Inference Time"): a cheap per-layer model of which neurons will matter, computed from x before the FFN runs.
Here it is fitted in closed form, with no training: for W in {gate, up}, the rank-r matrix minimising the
expected error on calibration inputs, ``E||W x - A B x||^2``, is the truncated SVD of ``W L`` re-expressed
through ``L^-1``, with ``L L^T`` the input covariance (Cholesky). An expert's score is the sum over its neurons of
``|act(g~) * u~|`` (``|act(u~)|`` for plain FFNs). It reads ``r (D + F)`` weights per approximated matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brickwork.errors import BrickworkError
from brickwork.routing.base import Router, RouterInputs, RouterOptions, register_router, router_option

DEFAULT_RANK = 32


def covariance_weighted_lowrank(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [F, r], B [r, D]) with A B x ~ W x on the input distribution (second moments of ``inputs``)."""
    x = inputs.double()
    second_moment = x.t() @ x / x.shape[0]
    second_moment.diagonal().add_(1e-6 * second_moment.diagonal().mean())
    chol = torch.linalg.cholesky(second_moment)
    u, s, vh = torch.linalg.svd(weight.double() @ chol, full_matrices=False)
    a = u[:, :rank] * s[:rank]
    b = torch.linalg.solve_triangular(chol, vh[:rank], upper=False, left=False)  # B L = V_r^T
    return a, b


@dataclass(frozen=True)
class LowRankOptions(RouterOptions):
    rank: int = router_option(
        DEFAULT_RANK, "rank of each approximated projection", lambda v: v >= 1, "an integer >= 1"
    )


@register_router
class LowRankRouter(Router):
    kind = "lowrank"
    predicts_mass = True
    Options = LowRankOptions
    param_layout = {
        "up_a": "neuron",
        "up_b": "whole",
        "up_bias": "neuron",
        "gate_a": "neuron",
        "gate_b": "whole",
        "gate_bias": "neuron",
    }
    needs_samples = True

    def __init__(
        self, up_a, up_b, up_bias, gate_a=None, gate_b=None, gate_bias=None, rank: int = DEFAULT_RANK
    ):
        super().__init__()
        self.rank = rank
        self.up_a, self.up_b = torch.nn.Parameter(up_a), torch.nn.Parameter(up_b)
        self.up_bias = torch.nn.Parameter(up_bias)
        self.gate_a = None if gate_a is None else torch.nn.Parameter(gate_a)
        self.gate_b = None if gate_b is None else torch.nn.Parameter(gate_b)
        self.gate_bias = None if gate_bias is None else torch.nn.Parameter(gate_bias)

    def neuron_scores(self, x: torch.Tensor, act) -> torch.Tensor:
        """Predicted |h| of the routed neurons, in storage order."""
        up = (x @ self.up_b.t()) @ self.up_a.t() + self.up_bias
        if self.gate_a is None:
            return act(up).abs()
        gate = (x @ self.gate_b.t()) @ self.gate_a.t() + self.gate_bias
        return (act(gate) * up).abs()

    def forward(self, x, brick):
        scores = self.neuron_scores(x, brick.act)
        return scores.view(x.shape[0], brick.num_experts, brick.expert_size).sum(-1)

    def extra_config(self) -> dict:
        return {"rank": self.rank}

    @classmethod
    def build(cls, inputs: RouterInputs, rank: int = DEFAULT_RANK) -> LowRankRouter:
        if inputs.inputs is None:
            raise BrickworkError("the lowrank router fits on calibration inputs: calibrate with samples=True")
        w = inputs.weights
        routed = inputs.grouping.experts.flatten()
        rank = min(rank, w.d_model, len(routed))
        dtype = w.up.dtype

        def approximate(weight, bias):
            a, b = covariance_weighted_lowrank(weight.detach()[routed], inputs.inputs, rank)
            bias = bias.detach()[routed] if bias is not None else torch.zeros(len(routed))
            return a.to(dtype), b.to(dtype), bias.to(dtype).clone()

        up_a, up_b, up_bias = approximate(w.up, w.up_bias)
        if w.gate is None:
            return cls(up_a, up_b, up_bias, rank=rank)
        return cls(up_a, up_b, up_bias, *approximate(w.gate, w.gate_bias), rank=rank)

    @classmethod
    def empty(
        cls, num_experts, d_model, d_ff, gated, rank: int = DEFAULT_RANK, routed_neurons: int = 0, **extra
    ):
        n = routed_neurons

        def pair():
            return torch.zeros(n, rank), torch.zeros(rank, d_model), torch.zeros(n)

        return cls(*pair(), *(pair() if gated else (None, None, None)), rank=rank)
