"""The Grouping (what every construction method returns), the method registry, and balanced assignment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from brickwork.errors import BrickworkError
from brickwork.models.specs import FFNWeights


@dataclass
class Grouping:
    """Shared neurons (always on) and equal-size routed experts, as neuron indices of one FFN.

    Experts of size 1 are the neuron level of the same structure.
    """

    shared: torch.Tensor  # [S] int64
    experts: torch.Tensor  # [E, m] int64

    @property
    def num_experts(self) -> int:
        return self.experts.shape[0]

    @property
    def expert_size(self) -> int:
        return self.experts.shape[1]

    @property
    def neuron_order(self) -> torch.Tensor:
        """Neurons in storage order: shared first, then expert 0, expert 1, ..."""
        return torch.cat([self.shared, self.experts.flatten()])

    def validate(self, d_ff: int) -> None:
        order = self.neuron_order
        if order.numel() != d_ff or not torch.equal(order.sort().values, torch.arange(d_ff)):
            raise ValueError(f"a grouping must use every one of the {d_ff} neurons exactly once")


@dataclass
class GroupingInputs:
    """What a construction method may use for one FFN."""

    weights: FFNWeights
    stats: dict[str, torch.Tensor]  # the layer's profile statistics (topk_rate, mean_abs, coactivation, ...)
    coactivation: torch.Tensor | None  # [F, F] counts (exact or estimated)
    num_shared: int  # shared neurons
    num_experts: int  # routed experts
    expert_size: int
    generator: torch.Generator


GroupingMethod = Callable[[GroupingInputs], Grouping]
GROUPING_METHODS: dict[str, GroupingMethod] = {}


def register_grouping(name: str) -> Callable[[GroupingMethod], GroupingMethod]:
    """Register an expert-construction method under ``name``."""

    def decorator(fn: GroupingMethod) -> GroupingMethod:
        GROUPING_METHODS[name] = fn
        return fn

    return decorator


def shared_by_rate(inputs: GroupingInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared neurons = the most frequently active (top-k rate, ties by mean |h|); returns (shared, rest)."""
    rate = inputs.stats["topk_rate"].double() + 1e-9 * inputs.stats["mean_abs"].double()
    order = torch.argsort(rate, descending=True, stable=True)
    return order[: inputs.num_shared].sort().values, order[inputs.num_shared :].sort().values


def shared_then_clusters(inputs: GroupingInputs, assign: Callable[[torch.Tensor], torch.Tensor]) -> Grouping:
    """Shared = the most active neurons; the rest cut into equal experts by ``assign(rest)``, which returns each
    neuron's expert (experts of one neuron need no clustering)."""
    shared, rest = shared_by_rate(inputs)
    if inputs.expert_size == 1:
        return Grouping(shared=shared, experts=rest.view(-1, 1))
    return Grouping(shared=shared, experts=groups_from_assignment(rest, assign(rest), inputs.num_experts))


def require_coactivation(inputs: GroupingInputs, method: str) -> torch.Tensor:
    if inputs.coactivation is None:
        raise BrickworkError(f"method '{method}' needs a profile with co-activation statistics")
    return inputs.coactivation


def balanced_assign(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each of n points to one of k clusters, exactly ``capacity`` per cluster (n = k * capacity).

    Greedy on costs in ascending order: a point takes its cheapest cluster that still has room. O(nk log nk);
    at d_ff 14,336 and 64 experts one call takes well under a second. tests/test_grouping.py compares its
    total cost with scipy's exact ``linear_sum_assignment`` on small problems.
    """
    n, k = cost.shape
    if n != k * capacity:
        raise ValueError(f"{n} points do not fill {k} clusters of {capacity}")
    order = torch.argsort(cost.flatten(), stable=True)
    points, clusters = (order // k).tolist(), (order % k).tolist()
    assignment = [-1] * n
    room = [capacity] * k
    left = n
    for point, cluster in zip(points, clusters, strict=True):
        if assignment[point] < 0 and room[cluster]:
            assignment[point] = cluster
            room[cluster] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(assignment)


def groups_from_assignment(neurons: torch.Tensor, assignment: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[num_groups, size] neuron indices (sorted within each group) from a per-neuron group assignment."""
    return torch.stack([neurons[assignment == g].sort().values for g in range(num_groups)])


def balanced_kmeans(
    features: torch.Tensor,
    num_clusters: int,
    generator: torch.Generator,
    iterations: int = 25,
) -> torch.Tensor:
    """Balanced k-means (equal cluster sizes) on rows of ``features``; returns each row's cluster.

    Centroids start at distinct random rows (seeded); each step assigns with :func:`balanced_assign` on squared
    distances and moves centroids to their members' means, until the assignment stops changing.
    """
    n = features.shape[0]
    capacity = n // num_clusters
    x = features.double()
    centroids = x[torch.randperm(n, generator=generator)[:num_clusters]].clone()
    assignment = None
    for _ in range(iterations):
        distance = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.t() + (centroids * centroids).sum(1)
        new = balanced_assign(distance, capacity)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        centroids = torch.stack([x[assignment == c].mean(0) for c in range(num_clusters)])
    return assignment
