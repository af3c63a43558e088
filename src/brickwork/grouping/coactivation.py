"""``coactivation``: balanced partition of the neuron co-activation graph.

Zhang et al. 2022, "MoEfication" (co-activation graph split with METIS); Zhu et al. 2024, "LLaMA-MoE"
(co-activation graph clustering). Nodes are neurons, edge weights the number of calibration tokens on which
both neurons are in the top-k. METIS (Karypis & Kumar 1998, via ``pymetis``) cuts it into parts with little
weight between them; its parts are balanced only to a tolerance, so a repair step then moves the neurons with
the weakest ties out of over-full parts into the parts they are most tied to, until every part has exactly
``expert_size`` neurons. Shared neurons are the most frequently active ones.
"""

from __future__ import annotations

import numpy as np
import torch

from brickwork.grouping.base import (
    Grouping,
    GroupingInputs,
    register_grouping,
    require_coactivation,
    shared_then_clusters,
)

NEIGHBOURS = 64  # strongest co-activation edges kept per neuron: keeps the graph sparse and METIS fast


def _metis_parts(affinity: torch.Tensor, parts: int, seed: int) -> np.ndarray:
    import pymetis

    n = affinity.shape[0]
    a = affinity.clone()
    a.fill_diagonal_(0)
    k = min(NEIGHBOURS, n - 1)
    top = a.topk(k, dim=1).indices
    mask = torch.zeros_like(a, dtype=torch.bool).scatter_(1, top, True)
    mask |= mask.t().clone()
    scale = 1000.0 / max(float(a.max()), 1e-12)
    weights = torch.where(mask, (a * scale).round().clamp_min(1), torch.zeros_like(a)).long()
    xadj, adjncy, eweights = [0], [], []
    for i in range(n):
        neighbours = torch.nonzero(mask[i]).flatten()
        adjncy.extend(neighbours.tolist())
        eweights.extend(weights[i, neighbours].tolist())
        xadj.append(len(adjncy))
    options = pymetis.Options(seed=seed, ufactor=1)
    _, membership = pymetis.part_graph(parts, xadj=xadj, adjncy=adjncy, eweights=eweights, options=options)
    return np.asarray(membership)


def _repair_balance(assignment: np.ndarray, affinity: torch.Tensor, parts: int, size: int) -> np.ndarray:
    """Move neurons out of over-full parts, weakest-tied first, into the under-full part they are most tied to."""
    assignment = assignment.copy()
    a = affinity.double().numpy()
    tie = a @ np.eye(parts)[assignment]  # tie[i, p]: affinity of neuron i to part p, kept up to date per move
    counts = np.bincount(assignment, minlength=parts)
    while (counts > size).any():
        part = int(np.nonzero(counts > size)[0][0])
        under = np.nonzero(counts < size)[0]
        members = np.nonzero(assignment == part)[0]
        gain = tie[np.ix_(members, under)].max(1) - tie[members, part]
        mover = members[np.argmax(gain)]
        target = int(under[np.argmax(tie[mover, under])])
        assignment[mover] = target
        counts[part] -= 1
        counts[target] += 1
        tie[:, part] -= a[:, mover]
        tie[:, target] += a[:, mover]
    return assignment


@register_grouping("coactivation")
def coactivation_partition(inputs: GroupingInputs) -> Grouping:
    coactivation = require_coactivation(inputs, "coactivation")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=inputs.generator))

    def partition(rest: torch.Tensor) -> torch.Tensor:
        affinity = coactivation[rest][:, rest].double()
        if inputs.num_experts == 1:
            membership = np.zeros(len(rest), dtype=np.int64)
        else:
            membership = _metis_parts(affinity, inputs.num_experts, seed)
        return torch.from_numpy(_repair_balance(membership, affinity, inputs.num_experts, inputs.expert_size))

    return shared_then_clusters(inputs, partition)
