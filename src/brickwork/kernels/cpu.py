"""Fused CPU kernels (numba) for one token through a carved SwiGLU FFN.

Per token, a carved FFN reads the shared neurons and the selected experts' neurons. Weights are packed once per
BrickFFN as ``rows [F, 3, D]`` = (gate, up, down) of each stored neuron, so a neuron is one contiguous 3*D block
and an expert a contiguous run of them; the whole token is one compiled call with no per-token weight copy
and no Python loop over experts (the loop's dispatch cost is what made small experts slow; DejaVu, Liu et al.
2023 and PowerInfer, Song et al. 2023 make the same point for GPU kernels).

For the ``partial`` router (TEAL-style input sparsity, Liu et al. 2024) the kernel also holds the gate and up
matrices transposed, ``[D, F]``, so that the partial sums over the token's largest inputs read whole rows;
the neurons it selects then read their full rows.

Threads: the neuron loops are split over numba's threads (``prange``); the default is torch's thread count.
"""

from __future__ import annotations

import math

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this keeps an import error readable
    numba = None

HAVE_NUMBA = numba is not None

if HAVE_NUMBA:

    @njit(cache=True, fastmath=False, inline="always")
    def _silu(v):
        return v / (1.0 + math.exp(-v))

    @njit(cache=True, parallel=True, fastmath=True)
    def neurons_h(x, rows, neurons, h):
        """h_i = silu(gate_n . x) * (up_n . x) for each stored neuron n = neurons[i]."""
        d = x.shape[0]
        for i in prange(neurons.shape[0]):
            n = neurons[i]
            g = np.float32(0.0)
            u = np.float32(0.0)
            for j in range(d):
                g += rows[n, 0, j] * x[j]
                u += rows[n, 1, j] * x[j]
            h[i] = _silu(g) * u

    @njit(cache=True, parallel=True, fastmath=True)
    def down_sum(rows, neurons, h, keep, out):
        """out = sum over the ``keep`` largest |h| (all when keep >= len(h)) of h_i * (down row of neurons[i])."""
        d = out.shape[0]
        m = h.shape[0]
        use = neurons
        weights = h
        if keep < m:
            order = np.argsort(-np.abs(h))[:keep]
            use = neurons[order]
            weights = h[order]
        chunk = 64
        for c in prange((d + chunk - 1) // chunk):
            lo = c * chunk
            hi = min(d, lo + chunk)
            acc = np.zeros(hi - lo, dtype=np.float32)
            for i in range(use.shape[0]):
                w = weights[i]
                n = use[i]
                for j in range(lo, hi):
                    acc[j - lo] += w * rows[n, 2, j]
            out[lo:hi] = acc

    @njit(cache=True, parallel=True, fastmath=True)
    def partial_scores(xs, cols, gate_t, up_t, first, scores):
        """scores[n - first] = |silu(g~) u~| with g~, u~ from input columns ``cols`` (values ``xs``) only."""
        f = gate_t.shape[1]
        chunk = 64
        for c in prange((f - first + chunk - 1) // chunk):
            lo = first + c * chunk
            hi = min(f, lo + chunk)
            g = np.zeros(hi - lo, dtype=np.float32)
            u = np.zeros(hi - lo, dtype=np.float32)
            for k in range(len(cols)):
                j = cols[k]
                v = xs[k]
                for n in range(lo, hi):
                    g[n - lo] += gate_t[j, n] * v
                    u[n - lo] += up_t[j, n] * v
            for n in range(lo, hi):
                scores[n - first] = abs(_silu(g[n - lo]) * u[n - lo])


def pack_rows(gate, up, down_t) -> np.ndarray:
    """``[F, 3, D]`` float32: each stored neuron's gate row, up row and down row, contiguous."""
    return np.ascontiguousarray(np.stack([gate, up, down_t], axis=1), dtype=np.float32)
