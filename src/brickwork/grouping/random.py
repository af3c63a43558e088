"""``random``: a seeded random equal split of the neurons (the LLaMA-MoE "random split" baseline).

Zhu et al. 2024, "LLaMA-MoE: Building Mixture-of-Experts from LLaMA with Continual Pre-training".
Shared neurons, when asked for, are the most active ones, as for every other method, so that comparing
methods compares how they group the routed neurons; the routed neurons are split at random.
"""

from __future__ import annotations

import torch

from brickwork.grouping.base import Grouping, GroupingInputs, register_grouping, shared_then_clusters


@register_grouping("random")
def random_split(inputs: GroupingInputs) -> Grouping:
    def shuffle(rest: torch.Tensor) -> torch.Tensor:
        order = torch.randperm(len(rest), generator=inputs.generator)
        assignment = torch.empty(len(rest), dtype=torch.long)
        assignment[order] = torch.arange(len(rest)) // inputs.expert_size
        return assignment

    return shared_then_clusters(inputs, shuffle)
