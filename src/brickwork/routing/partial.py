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
from dataclasses import dataclass

import torch

from brickwork.routing.base import (
    Router,
    RouterInputs,
    RouterOptions,
    register_router,
    router_option,
    topk_by_position,
)

DEFAULT_INPUT_FRACTION = 0.25

# (reads budget, input_fraction, fraction of neurons computed, fraction reading down rows): the neuron-level
# settings measured best at each budget (brickwork.carving.presets.recommended, bench/results/carving-quality).
MEASURED_BEST = ((0.25, 0.125, 330 / 1536, 0.12), (0.50, 0.375, 0.375, 0.28), (0.75, 0.25, 0.75, 0.60))


def neuron_level_settings(budget: float, d_ff: int, d_model: int, gated: bool) -> tuple[int, float, int]:
    """``(neurons computed, input_fraction, down rows)`` of the neuron-level carve reading at most ``budget`` of
    the FFN per token, with the settings measured best at the nearest budget (:data:`MEASURED_BEST`).

    Per token, with a fraction s of neurons computed and d = r s of them reading down rows, and the router
    reading q of the inputs of the neurons it leaves out: reads / dense = ``(g s + r s + g q (1 - s)) / (g + 1)``
    for g input projections (2 when gated); solve for s.
    """
    _, q, measured_computed, measured_down = min(MEASURED_BEST, key=lambda best: abs(best[0] - budget))
    r = measured_down / measured_computed
    q = math.ceil(q * d_model) / d_model  # the router reads whole input columns
    g = 2 if gated else 1
    computed = ((g + 1) * budget - g * q) / (g + r - g * q)
    if computed >= 1:  # every neuron computed; spend what is left on down rows
        active, down = d_ff, (g + 1) * budget - g
    else:
        active, down = max(1, math.floor(computed * d_ff)), r * computed
    return active, q, max(1, math.floor(down * d_ff))


def _input_keep(brick) -> int:
    """The inputs the partial estimate keeps per token (the spec's ``input_fraction`` of d_model)."""
    spec = brick.spec
    return max(1, math.ceil(spec.router_config["input_fraction"] * spec.d_model))


def _partial_token(brick, plan):
    """One compiled call per token: the partial-input estimate, top-k, the experts
    (:func:`cpu.partial_router_token`)."""
    from brickwork.kernels import cpu

    gate_t, up_t = plan.transposed()
    rows, s, size, keep = plan.experts_args
    args = (_input_keep(brick), gate_t, up_t, brick.spec.active, rows, s, size, keep)
    return cpu.partial_router_token, args


def _partial_batch(brick, plan):
    """``x [T, D] -> chosen [T, k]`` by the partial-input estimate (:func:`cpu.partial_router_batch`)."""
    from brickwork.kernels import cpu

    gate_t, up_t = plan.transposed()
    _, s, size, _ = plan.experts_args
    args = (_input_keep(brick), gate_t, up_t, brick.spec.active, s, size)
    return lambda xn: cpu.partial_router_batch(xn, *args, cpu.numba.get_num_threads())


@dataclass(frozen=True)
class PartialOptions(RouterOptions):
    input_fraction: float = router_option(
        DEFAULT_INPUT_FRACTION,
        "share of each token's inputs (the largest) the estimate is computed from",
        lambda v: 0 < v <= 1,
        "a number in (0, 1]",
    )


@register_router
class PartialInputRouter(Router):
    kind = "partial"
    computes = "partial"
    predicts_mass = True
    Options = PartialOptions
    fast_paths = {"token": _partial_token, "batch": _partial_batch}
    # from brickwork bench speed on SmolLM2 (the "Kernel paths" table of bench/results/speed-smollm2): the
    # per-token kernel leads up to 3 tokens (4 for the 50% neuron-level carve); grouped matmuls from 512
    switch_points = {"token_max": ((0.3, 3), (1.0, 4)), "grouped_min": ((1.0, 512),)}
    param_layout = {}  # no parameters: it scores from the brick's own weights, which pruning slices

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

    def set_config(self, config: dict) -> None:
        if "input_fraction" in config:  # the reference path reads its own
            self.input_fraction = config["input_fraction"]

    def rebudget(self, brick, budget, carved):
        """The neuron-level preset's own settings for ``budget`` (:func:`neuron_level_settings`): the neurons
        computed, the down rows read and the input fraction, so that the result is the carve the preset makes for
        this budget from the same calibration; the preset's neuron count is tried first (not the most that fits:
        on SmolLM2 "one more neuron" was not "better")."""
        active, input_fraction, down_rows = neuron_level_settings(
            budget, brick.d_ff, brick.d_model, brick.gate is not None
        )
        down_fraction = None if down_rows >= active else down_rows / brick.d_ff
        router_config = carved["router_config"] | {"input_fraction": input_fraction}

        def settings_for(k: int) -> dict:
            computed = brick.num_shared + k * brick.expert_size
            keep = None if down_fraction is None else max(1, round(down_fraction * brick.d_ff))  # as carve_
            return {
                "active": k,
                "down_keep": None if keep is None or keep >= computed else keep,
                "router_config": router_config,
                "combine": carved["combine"],
            }

        neuron_level = brick.num_shared == 0 and brick.expert_size == 1 and active <= brick.num_experts
        return settings_for, active if neuron_level else None

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
