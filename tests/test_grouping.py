from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from brickwork.grouping import balanced_assign, balanced_kmeans
from brickwork.grouping.activation import balanced_kernel_kmeans
from brickwork.routing.lowrank import covariance_weighted_lowrank


@pytest.mark.parametrize("seed", range(5))
def test_balanced_assign_is_balanced_and_near_optimal(seed):
    generator = torch.Generator().manual_seed(seed)
    points, clusters, capacity = 60, 6, 10
    cost = torch.rand(points, clusters, generator=generator)
    assignment = balanced_assign(cost, capacity)
    assert torch.equal(torch.bincount(assignment, minlength=clusters), torch.full((clusters,), capacity))
    # The exact optimum: each cluster repeated `capacity` times as columns of a square assignment problem.
    rows, cols = linear_sum_assignment(np.repeat(cost.numpy(), capacity, axis=1))
    optimum = cost.numpy().repeat(capacity, axis=1)[rows, cols].sum()
    greedy = cost[torch.arange(points), assignment].sum().item()
    assert optimum <= greedy + 1e-9
    assert greedy <= 1.25 * optimum


def test_balanced_kmeans_recovers_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=generator) * 10
    points = torch.cat([c + torch.randn(25, 8, generator=generator) for c in centres])
    assignment = balanced_kmeans(points, 4, torch.Generator().manual_seed(1))
    for block in assignment.view(4, 25):
        assert (block == block[0]).all()


def test_kernel_kmeans_on_coactivation_matches_kmeans_on_patterns():
    generator = torch.Generator().manual_seed(2)
    # Three groups of neurons, each firing on its own third of the tokens.
    patterns = torch.zeros(30, 300)
    for g in range(3):
        patterns[g * 10 : (g + 1) * 10, g * 100 : (g + 1) * 100] = (
            torch.rand(10, 100, generator=generator) < 0.8
        ).float()
    gram = patterns @ patterns.t()
    assignment = balanced_kernel_kmeans(gram, 3, torch.Generator().manual_seed(0))
    for block in assignment.view(3, 10):
        assert (block == block[0]).all()


def test_covariance_weighted_lowrank_is_exact_at_full_rank_and_beats_plain_svd():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 12, generator=generator)
    inputs = torch.randn(500, 12, generator=generator) * torch.linspace(0.1, 3, 12)
    a, b = covariance_weighted_lowrank(weight, inputs, 12)
    torch.testing.assert_close(a @ b, weight.double(), rtol=0, atol=1e-10)
    a, b = covariance_weighted_lowrank(weight, inputs, 4)
    u, s, vh = torch.linalg.svd(weight.double())
    plain = (u[:, :4] * s[:4]) @ vh[:4]

    def error(m):
        return ((inputs.double() @ (weight.double() - m).t()) ** 2).mean().item()

    assert error(a @ b) < error(plain)


def test_balanced_assignment_scales_to_llama3_size():
    """d_ff 14,336 into 64 experts: one balanced assignment (the benchmark times full k-means)."""
    cost = torch.rand(14336, 64, generator=torch.Generator().manual_seed(0))
    assignment = balanced_assign(cost, 224)
    assert torch.equal(torch.bincount(assignment), torch.full((64,), 224))
