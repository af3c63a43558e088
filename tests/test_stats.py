from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import brickwork.profiling.stats as stats_module
from brickwork.profiling.stats import MASS_SHARE_FRACTIONS, NeuronStats, coactivation_counts


def brute_force(h: torch.Tensor, top_fraction: float, threshold: float, share_stride: int) -> dict:
    """Token-by-token statistics, written as plainly as possible."""
    h = h.double()
    n, f = h.shape
    k = math.ceil(top_fraction * f)
    a = h.abs()
    indicator = torch.zeros(n, f, dtype=torch.float64)
    for t in range(n):
        indicator[t, torch.argsort(a[t], descending=True)[:k]] = 1
    shares = []
    for t in range(0, n, share_stride):
        ordered = torch.sort(a[t], descending=True).values
        shares.append([ordered[: math.ceil(p * f)].sum() / a[t].sum() for p in MASS_SHARE_FRACTIONS])
    return {
        "topk_rate": indicator.mean(0),
        "threshold_rate": (a > threshold * a.mean(1, keepdim=True)).double().mean(0),
        "mean_abs": a.mean(0),
        "mean_sq": (h * h).mean(0),
        "mass_share": torch.tensor(shares, dtype=torch.float64).mean(0),
        "coactivation": indicator.t() @ indicator,
        "indicator": indicator,
    }


@pytest.mark.parametrize("share_stride", [1, 3])
def test_streaming_statistics_equal_brute_force(share_stride):
    torch.manual_seed(0)
    f = 40
    h = torch.randn(203, f) * torch.rand(f) * 3  # neurons with different scales
    stats = NeuronStats(f, top_fraction=0.2, threshold=1.3, share_stride=share_stride)
    for chunk in torch.split(h, [50, 1, 77, 75]):  # uneven batches, as a stream delivers them
        stats.update(chunk.view(1, -1, f))
    expected = brute_force(h, 0.2, 1.3, share_stride)
    got = stats.result()
    assert stats.tokens == 203
    for name in ("topk_rate", "threshold_rate", "mean_abs", "mean_sq", "mass_share"):
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(got["coactivation"].double(), expected["coactivation"], rtol=0, atol=0)


def test_threshold_zero_is_the_relu_definition():
    h = torch.relu(torch.randn(64, 16))
    stats = NeuronStats(16, threshold=0.0)
    stats.update(h)
    torch.testing.assert_close(stats.result()["threshold_rate"], (h > 0).float().mean(0))


def test_int8_and_float32_coactivation_give_the_same_exact_counts(monkeypatch):
    indicator = (torch.rand(700, 24) < 0.6).to(torch.int8)
    exact = indicator.double().t() @ indicator.double()
    int8 = coactivation_counts(indicator, use_int8=True)
    float32 = coactivation_counts(indicator, use_int8=False)
    torch.testing.assert_close(int8.double(), exact, rtol=0, atol=0)
    torch.testing.assert_close(float32.double(), exact, rtol=0, atol=0)
    # chunked sums (as past 2^24 rows) stay exact too
    monkeypatch.setattr(stats_module, "_FLOAT32_EXACT_ROWS", 256)
    chunked = coactivation_counts(indicator, use_int8=False)
    assert chunked.dtype == torch.float64
    torch.testing.assert_close(chunked, exact, rtol=0, atol=0)


def test_int8_gemm_is_chosen_only_where_it_is_fast(monkeypatch):
    stats_module.int8_gemm_is_fast.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not stats_module.int8_gemm_is_fast("cpu")
    assert stats_module.int8_gemm_is_fast("cuda")
    stats_module.int8_gemm_is_fast.cache_clear()


def test_reservoir_is_exact_when_it_holds_every_token():
    torch.manual_seed(1)
    h = torch.randn(90, 30)
    exact = NeuronStats(30, top_fraction=0.2)
    sampled = NeuronStats(30, top_fraction=0.2, coactivation_exact_max=10, sample_size=128)
    for chunk in h.split(40):
        exact.update(chunk)
        sampled.update(chunk)
    assert sampled.coactivation is None and sampled.sample_filled == 90
    torch.testing.assert_close(sampled.coactivation_counts(), exact.coactivation_counts(), rtol=0, atol=0)


def test_reservoir_sample_is_a_seeded_subset_of_the_patterns():
    torch.manual_seed(2)
    h = torch.randn(500, 24)
    patterns = brute_force(h, 0.25, 1.0, 1)["indicator"].numpy().astype(bool)
    packed_all = {row.tobytes() for row in np.packbits(patterns, axis=1)}

    def run(seed):
        stats = NeuronStats(24, top_fraction=0.25, coactivation_exact_max=8, sample_size=64, seed=seed)
        for chunk in h.split(70):
            stats.update(chunk)
        return stats

    a, b, c = run(0), run(0), run(5)
    assert a.sample_filled == 64
    assert all(row.tobytes() in packed_all for row in a.sample)
    assert np.array_equal(a.sample, b.sample)
    assert not np.array_equal(a.sample, c.sample)
    exact = torch.from_numpy(patterns.astype(np.float64))
    exact = exact.t() @ exact
    # Every token has exactly k active neurons, so the scaled trace is exact whatever the sample.
    assert a.coactivation_counts().trace().item() == pytest.approx(exact.trace().item())


def test_reservoir_is_uniform_over_a_changing_stream():
    # The first 250 tokens activate neurons 0-5, the last 250 neurons 18-23: a sample that favours early or
    # late tokens (keeping the first or last S) gets the two groups' totals badly wrong.
    h = torch.rand(500, 24) * 0.1
    h[:250, :6] += 1
    h[250:, 18:] += 1
    totals = []
    for seed in range(40):
        stats = NeuronStats(24, top_fraction=0.25, coactivation_exact_max=8, sample_size=64, seed=seed)
        for chunk in h.split(70):
            stats.update(chunk)
        diagonal = stats.coactivation_counts().diagonal()
        totals.append([diagonal[:6].sum().item(), diagonal[18:].sum().item()])
    early, late = torch.tensor(totals).mean(0).tolist()
    # Exact: each group is active 6 times in 250 tokens -> 1500. Hypergeometric sd of the mean over 40 seeds ~2%.
    assert early == pytest.approx(1500, rel=0.06) and late == pytest.approx(1500, rel=0.06)
