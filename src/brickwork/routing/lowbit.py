"""``lowbit``: predict each neuron's contribution from low-bit copies of its gate and up rows.

A neuron-level predictor in the line of Deja Vu (Liu et al. 2023, "Deja Vu: Contextual Sparsity for Efficient
LLMs at Inference Time"), which predicts from x which neurons will matter, built here without training: the
predictor is the FFN itself at low precision. Each routed neuron's gate and up rows are quantized symmetrically in
groups of ``group`` inputs (``bits`` = 4, 3 or 2: integer codes with one float16 scale per group; ``bits`` = 1: the
signs with the group's mean |w|), and a neuron's score is ``|act(x g~) * (x u~)|`` (``|act(x u~)|`` for plain
FFNs), times the norm of its down row when ``weighted``: how far the neuron moves the output, the weight-informed
scaling of WINA (Chen et al. 2025, "WINA: Training-free Sparse Activation via Weight Informed Neuron Activation").
An expert's score is the sum over its neurons.

Weights read: the packed codes, the scales and the biases and down-row norms, counted in weights of the dtype the
carve runs in (:meth:`LowBitRouter.weights_read`), so a 4-bit copy of gate and up costs about 14% of their float32
bytes and the neurons the budget leaves are fewer by that much (:func:`neuron_level_active`). The codes are held
unpacked (one int8 each) in memory and on disk; the count is what a kernel reading packed codes reads. There is
no compiled fast path yet: every path routes in torch, as the reference path does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from brickwork.routing.base import Router, RouterInputs, RouterOptions, register_router, router_option

DEFAULT_BITS = 4
DEFAULT_GROUP = 32
SCALE_BYTES = 2  # one float16 scale per group


def quantize_rows(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [N, D] int8, scales [N, ceil(D / group)] float16)`` of ``weight [N, D]``, symmetric per group
    of ``group`` consecutive inputs; ``bits`` = 1 keeps the signs (codes +-1) and the group's mean |w|."""
    n, d = weight.shape
    groups = math.ceil(d / group)
    w = torch.nn.functional.pad(weight.detach().float(), (0, groups * group - d)).view(n, groups, group)
    if bits == 1:
        scales = (w.abs().sum(-1) / torch.tensor([min(group, d - g * group) for g in range(groups)])).half()
        codes = torch.where(w >= 0, 1, -1).to(torch.int8)
    else:
        top = 2 ** (bits - 1) - 1
        scales = (w.abs().amax(-1) / top).half()
        safe = scales.float().clamp_min(torch.finfo(torch.float16).tiny)[..., None]
        codes = torch.round(w / safe).clamp(-top, top).to(torch.int8)
    return codes.view(n, groups * group)[:, :d].contiguous(), scales


def dequantize_rows(
    codes: torch.Tensor, scales: torch.Tensor, group: int, dtype=torch.float32
) -> torch.Tensor:
    """The ``[N, D]`` rows that ``codes`` and ``scales`` stand for, in ``dtype``."""
    d = codes.shape[1]
    return codes.to(dtype) * scales.to(dtype).repeat_interleave(group, dim=1)[:, :d]


def predictor_weights(rows: int, d_model: int, bits: int, group: int, extras: int, itemsize: int) -> int:
    """Weights of ``itemsize`` bytes that ``rows`` quantized rows of ``d_model`` inputs (codes packed at ``bits``,
    a float16 scale per group) plus ``extras`` values of that dtype take to read."""
    row_bytes = d_model * bits / 8 + math.ceil(d_model / group) * SCALE_BYTES
    return math.ceil(rows * row_bytes / itemsize) + extras


def copies_read(
    neurons: int, d_model: int, gated: bool, bits: int, group: int, weighted: bool, itemsize: int
) -> int:
    """Weights a token reads to route ``neurons`` by their copies: the copied rows (gate and up, or up), a bias per
    copied row and, when ``weighted``, a down-row norm per neuron."""
    rows = neurons * (2 if gated else 1)
    return predictor_weights(rows, d_model, bits, group, rows + (neurons if weighted else 0), itemsize)


def neuron_level_active(
    reads: float,
    d_ff: int,
    d_model: int,
    gated: bool = True,
    bits: int = DEFAULT_BITS,
    group: int = DEFAULT_GROUP,
    weighted: bool = True,
    itemsize: int = 4,
) -> int:
    """Neurons a neuron-level carve routed by this predictor computes per token to read at most ``reads`` of the
    dense FFN's weights (the predictor's own reads included)."""
    g = 2 if gated else 1
    dense = (g + 1) * d_ff * d_model
    predictor = copies_read(d_ff, d_model, gated, bits, group, weighted, itemsize)
    return max(1, min(d_ff, math.floor((reads * dense - predictor) / ((g + 1) * d_model))))


@dataclass(frozen=True)
class LowBitOptions(RouterOptions):
    bits: int = router_option(
        DEFAULT_BITS, "bits per weight of the gate and up copies", lambda v: v in (1, 2, 3, 4), "1, 2, 3 or 4"
    )
    group: int = router_option(DEFAULT_GROUP, "inputs sharing one scale", lambda v: v >= 1, "an integer >= 1")
    weighted: bool = router_option(True, "scale each neuron's score by the norm of its down row (WINA)")


@register_router
class LowBitRouter(Router):
    kind = "lowbit"
    predicts_mass = True
    Options = LowBitOptions
    param_layout = {
        "up_codes": "neuron",
        "up_scales": "neuron",
        "up_bias": "neuron",
        "gate_codes": "neuron",
        "gate_scales": "neuron",
        "gate_bias": "neuron",
        "down_norm": "neuron",
    }
    frozen = frozenset({"up_codes", "up_scales", "gate_codes", "gate_scales"})

    def __init__(
        self,
        up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        down_norm: torch.Tensor,
        bits: int = DEFAULT_BITS,
        group: int = DEFAULT_GROUP,
        weighted: bool = True,
    ):
        super().__init__()
        self.bits, self.group, self.weighted = bits, group, weighted

        def frozen(t):
            return torch.nn.Parameter(t, requires_grad=False)

        self.up_codes, self.up_scales, self.up_bias = (frozen(t) for t in up)
        self.gate_codes, self.gate_scales, self.gate_bias = (
            (None, None, None) if gate is None else (frozen(t) for t in gate)
        )
        self.down_norm = frozen(down_norm)

    @staticmethod
    def _copy(weight, bias, bits, group, dtype):
        codes, scales = quantize_rows(weight, bits, group)
        bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach()
        return codes, scales, bias.to(dtype).clone()

    def neuron_scores(self, x: torch.Tensor, act, exact: bool = False) -> torch.Tensor:
        """Predicted contribution of each routed neuron, ``[T, N]`` in stored order (float64 sums rounded once
        when ``exact``)."""
        dtype = torch.float64 if exact else x.dtype
        xs = x.to(dtype)

        def project(codes, scales, bias):
            return xs @ dequantize_rows(codes, scales, self.group, dtype).t() + bias.to(dtype)

        up = project(self.up_codes, self.up_scales, self.up_bias)
        h = (
            act(up)
            if self.gate_codes is None
            else act(project(self.gate_codes, self.gate_scales, self.gate_bias)) * up
        )
        return h.abs() * self.down_norm.to(dtype) if self.weighted else h.abs()

    def forward(self, x, brick):
        exact = brick.exact(x)
        scores = self.neuron_scores(x, brick.act, exact)
        scores = scores.view(x.shape[0], brick.num_experts, brick.expert_size)
        return scores.sum(-1).float() if exact else scores.sum(-1)

    def weights_read(self, brick, routed=None) -> int:
        neurons, d_model = self.up_codes.shape
        gated = self.gate_codes is not None
        return copies_read(
            neurons, d_model, gated, self.bits, self.group, self.weighted, brick.up.element_size()
        )

    def extra_config(self) -> dict:
        return {"bits": self.bits, "group": self.group, "weighted": self.weighted}

    @torch.no_grad()
    def refit(self, brick, x, h_dense) -> bool:
        """The copies again, from the brick's own routed rows (stored order), which local recovery has refitted."""
        s = brick.num_shared
        dtype = self.up_bias.dtype
        copies = {"up": (brick.up[s:], brick.up_bias)}
        if self.gate_codes is not None:
            copies["gate"] = (brick.gate[s:], brick.gate_bias)
        for name, (weight, bias) in copies.items():
            codes, scales, bias = self._copy(
                weight, None if bias is None else bias[s:], self.bits, self.group, dtype
            )
            getattr(self, f"{name}_codes").copy_(codes)
            getattr(self, f"{name}_scales").copy_(scales)
            getattr(self, f"{name}_bias").copy_(bias)
        self.down_norm.copy_(brick.down_t[s:].float().norm(dim=1).to(dtype))
        return True

    @classmethod
    def build(
        cls,
        inputs: RouterInputs,
        bits: int = DEFAULT_BITS,
        group: int = DEFAULT_GROUP,
        weighted: bool = True,
    ) -> LowBitRouter:
        w = inputs.weights
        routed = inputs.grouping.experts.flatten()
        dtype = w.up.dtype

        def copy(weight, bias):
            return cls._copy(
                weight.detach()[routed], None if bias is None else bias[routed], bits, group, dtype
            )

        gate = None if w.gate is None else copy(w.gate, w.gate_bias)
        down_norm = w.down.detach()[:, routed].float().norm(dim=0).to(dtype)
        return cls(copy(w.up, w.up_bias), gate, down_norm, bits, group, weighted)

    @classmethod
    def empty(
        cls,
        num_experts,
        d_model,
        d_ff,
        gated,
        bits: int = DEFAULT_BITS,
        group: int = DEFAULT_GROUP,
        weighted: bool = True,
        routed_neurons: int = 0,
        **extra,
    ):
        n, groups = routed_neurons, math.ceil(d_model / group)

        def copy():
            return (
                torch.zeros(n, d_model, dtype=torch.int8),
                torch.zeros(n, groups, dtype=torch.float16),
                torch.zeros(n),
            )

        return cls(copy(), copy() if gated else None, torch.zeros(n), bits, group, weighted)
