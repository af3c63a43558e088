"""``oracle``: the experts with the largest true activation mass (sum of |h| over their neurons).

It computes the whole FFN's h to decide, so it is an upper bound on what a router could choose, for
evaluation only, never a fast path; its weights-read figure counts every gate and up row it reads.
"""

from __future__ import annotations

from brickwork.routing.base import Router, RouterInputs, register_router


@register_router
class OracleRouter(Router):
    kind = "oracle"
    predicts_mass = True
    param_layout = {}  # no parameters: it scores from the brick's own weights, which pruning slices

    def forward(self, x, brick):
        h = brick.hidden(x, brick.num_shared, brick.d_ff)
        return h.abs().view(x.shape[0], brick.num_experts, brick.expert_size).sum(-1)

    def weights_read(self, brick, routed=None) -> int:
        # The gate/up rows of the experts it then leaves out (those it selects are counted with the experts).
        left_out = brick.num_experts - (brick.active if routed is None else routed)
        return brick.input_weights_per_neuron * brick.expert_size * left_out

    @classmethod
    def build(cls, inputs: RouterInputs) -> OracleRouter:
        return cls()

    @classmethod
    def empty(cls, num_experts, d_model, d_ff, gated, **extra):
        return cls()
