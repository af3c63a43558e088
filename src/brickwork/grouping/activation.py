"""``activation``: shared = most active neurons; routed = balanced clusters of activation patterns (CMoE).

Pei et al. 2025, "CMoE: Fast Carving of Mixture-of-Experts for Efficient LLM Inference". Each neuron's
pattern is its 0/1 top-k indicator over the calibration tokens. Balanced k-means on those patterns needs only
their Gram matrix, which is the co-activation matrix C: the squared distance of neuron i to the mean of group
g is ``C_ii - 2 mean_{j in g} C_ij + mean_{j,l in g} C_jl``, so clustering is kernel k-means on C, exact for
the patterns without ever storing them.
"""

from __future__ import annotations

import torch

from brickwork.grouping.base import (
    Grouping,
    GroupingInputs,
    balanced_assign,
    register_grouping,
    require_coactivation,
    shared_then_clusters,
)


def balanced_kernel_kmeans(
    gram: torch.Tensor, num_clusters: int, generator: torch.Generator, iterations: int = 25
) -> torch.Tensor:
    n = gram.shape[0]
    capacity = n // num_clusters
    g = gram.double()
    diagonal = g.diagonal()
    seeds = torch.randperm(n, generator=generator)[:num_clusters]
    distance = diagonal[:, None] - 2 * g[:, seeds] + diagonal[seeds][None, :]
    assignment = balanced_assign(distance, capacity)
    for _ in range(iterations):
        membership = torch.nn.functional.one_hot(assignment, num_clusters).double() / capacity
        to_group = g @ membership  # mean_{j in g} C_ij
        within = (membership * to_group).sum(0)  # mean_{j,l in g} C_jl
        distance = diagonal[:, None] - 2 * to_group + within[None, :]
        new = balanced_assign(distance, capacity)
        if torch.equal(new, assignment):
            break
        assignment = new
    return assignment


@register_grouping("activation")
def activation_clusters(inputs: GroupingInputs) -> Grouping:
    coactivation = require_coactivation(inputs, "activation")
    return shared_then_clusters(
        inputs,
        lambda rest: balanced_kernel_kmeans(
            coactivation[rest][:, rest], inputs.num_experts, inputs.generator
        ),
    )
