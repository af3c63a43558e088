"""``random``: a seeded random equal split of the neurons (the LLaMA-MoE "random split" baseline).

Zhu et al. 2024, "LLaMA-MoE: Building Mixture-of-Experts from LLaMA with Continual Pre-training".
Shared neurons, if any, are drawn at random too: this method uses no calibration signal at all.
"""

from __future__ import annotations

import torch

from brickwork.grouping.base import Grouping, GroupingInputs, register_grouping


@register_grouping("random")
def random_split(inputs: GroupingInputs) -> Grouping:
    d_ff = inputs.weights.d_ff
    order = torch.randperm(d_ff, generator=inputs.generator)
    shared = order[: inputs.num_shared].sort().values
    experts = order[inputs.num_shared :].view(inputs.num_experts, inputs.expert_size).sort(dim=1).values
    return Grouping(shared=shared, experts=experts)
