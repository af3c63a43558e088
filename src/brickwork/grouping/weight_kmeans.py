"""``weight_kmeans``: balanced k-means on the neurons' normalised input weights (the parameter split).

Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts" (parameter
clustering split); Qiu et al. 2024, "Unlocking Emergent Modularity in Large Language Models" (EMoE).
Each neuron is the concatenation of its unit-normalised gate and up rows (up only for plain FFNs); neurons
whose keys point the same way fire on the same inputs. Shared neurons are the most frequently active ones.
"""

from __future__ import annotations

import torch

from brickwork.grouping.base import (
    Grouping,
    GroupingInputs,
    balanced_kmeans,
    register_grouping,
    shared_then_clusters,
)


def neuron_keys(inputs: GroupingInputs) -> torch.Tensor:
    w = inputs.weights
    rows = [w.up] if w.gate is None else [w.gate, w.up]
    return torch.cat([r.float() / r.float().norm(dim=1, keepdim=True).clamp_min(1e-12) for r in rows], dim=1)


@register_grouping("weight_kmeans")
def weight_kmeans(inputs: GroupingInputs) -> Grouping:
    return shared_then_clusters(
        inputs, lambda rest: balanced_kmeans(neuron_keys(inputs)[rest], inputs.num_experts, inputs.generator)
    )
