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
    # Neurons are split into this many fixed slices (the units of parallel work): for the down sums each slice
    # has its own accumulator and the slices are summed in order at the end, so whole contiguous rows are
    # streamed and the result does not depend on the number of threads.
    SLICES = 8

    @njit(cache=True, fastmath=False, inline="always")
    def _silu(v):
        return v / (1.0 + math.exp(-v))

    @njit(cache=True, parallel=True, fastmath=True)
    def partial_scores(xs, cols, gate_t, up_t, first, scores):
        """scores[n - first] = |silu(g~) u~| with g~, u~ from input columns ``cols`` (values ``xs``) only.

        The neurons are split into fixed slices (threads); each slice streams the rows of ``gate_t``/``up_t``
        [D, F] of four columns at a time, so its partial sums are loaded and stored once per four columns."""
        f = gate_t.shape[1]
        per = (f - first + SLICES - 1) // SLICES
        kk = len(cols)
        for c in prange(SLICES):
            lo = first + c * per
            hi = min(f, lo + per)
            if lo >= hi:
                continue
            g = np.zeros(hi - lo, dtype=np.float32)
            u = np.zeros(hi - lo, dtype=np.float32)
            k = 0
            while k + 4 <= kk:
                j0, j1, j2, j3 = cols[k], cols[k + 1], cols[k + 2], cols[k + 3]
                v0, v1, v2, v3 = xs[k], xs[k + 1], xs[k + 2], xs[k + 3]
                for n in range(lo, hi):
                    g[n - lo] += (
                        gate_t[j0, n] * v0 + gate_t[j1, n] * v1 + gate_t[j2, n] * v2 + gate_t[j3, n] * v3
                    )
                    u[n - lo] += up_t[j0, n] * v0 + up_t[j1, n] * v1 + up_t[j2, n] * v2 + up_t[j3, n] * v3
                k += 4
            while k < kk:
                j, v = cols[k], xs[k]
                for n in range(lo, hi):
                    g[n - lo] += gate_t[j, n] * v
                    u[n - lo] += up_t[j, n] * v
                k += 1
            for n in range(lo, hi):
                scores[n - first] = abs(_silu(g[n - lo]) * u[n - lo])

    @njit(cache=True)
    def _topk_indices(values, k):
        """Indices of the k largest values (any order; ties broken by position)."""
        n = values.shape[0]
        if k >= n:
            return np.arange(n)
        threshold = np.partition(values.copy(), n - k)[n - k]
        out = np.empty(k, dtype=np.int64)
        c = 0
        for i in range(n):
            if values[i] > threshold:
                out[c] = i
                c += 1
        for i in range(n):
            if c >= k:
                break
            if values[i] == threshold:
                out[c] = i
                c += 1
        return out

    @njit(cache=True, fastmath=True, inline="always")
    def _neuron_h(rows, n, x):
        """h of packed neuron ``n``: silu(gate . x) * (up . x)."""
        g = np.float32(0.0)
        u = np.float32(0.0)
        for j in range(x.shape[0]):
            g += rows[n, 0, j] * x[j]
            u += rows[n, 1, j] * x[j]
        return np.float32(_silu(g) * u)

    @njit(cache=True, inline="always")
    def _sum_slices(acc, out):
        """out[j] = the slices' accumulators summed in slice order."""
        for j in range(out.shape[0]):
            total = np.float32(0.0)
            for c in range(acc.shape[0]):
                total += acc[c, j]
            out[j] = total

    @njit(cache=True, parallel=True, fastmath=True)
    def _fused_rows(x, rows, neurons, out):
        """out = sum over ``neurons`` of silu(gate . x) * (up . x) * down: each neuron's packed (gate, up, down)
        block read once, in one pass."""
        m = neurons.shape[0]
        d = x.shape[0]
        acc = np.zeros((SLICES, d), dtype=np.float32)
        per = (m + SLICES - 1) // SLICES
        for c in prange(SLICES):
            for i in range(c * per, min(m, (c + 1) * per)):
                n = neurons[i]
                h = _neuron_h(rows, n, x)
                for j in range(d):
                    acc[c, j] += h * rows[n, 2, j]
        _sum_slices(acc, out)

    @njit(cache=True, parallel=True, fastmath=True)
    def _down_rows(rows, neurons, weights, out):
        """out = sum of weights[i] * down row of neurons[i], in the fixed slices of :func:`_fused_rows`."""
        m = neurons.shape[0]
        d = out.shape[0]
        acc = np.zeros((SLICES, d), dtype=np.float32)
        per = (m + SLICES - 1) // SLICES
        for c in prange(SLICES):
            for i in range(c * per, min(m, (c + 1) * per)):
                w = weights[i]
                n = neurons[i]
                for j in range(d):
                    acc[c, j] += w * rows[n, 2, j]
        _sum_slices(acc, out)

    @njit(cache=True, parallel=True, fastmath=True)
    def _experts_token(x, rows, chosen, shared, size, keep, out):
        """The shared neurons and the chosen experts' neurons; with down-row sparsity (``keep`` < their number)
        h of all of them first, then the down sum over the ``keep`` largest |h|."""
        m = shared + chosen.shape[0] * size
        neurons = np.empty(m, dtype=np.int64)
        for i in range(shared):
            neurons[i] = i
        for c in range(chosen.shape[0]):
            for i in range(size):
                neurons[shared + c * size + i] = shared + chosen[c] * size + i
        if keep >= m:
            _fused_rows(x, rows, neurons, out)
            return
        h = np.empty(m, dtype=np.float32)
        for i in prange(m):
            h[i] = _neuron_h(rows, neurons[i], x)
        top = _topk_indices(np.abs(h), keep)
        _down_rows(rows, neurons[top], h[top], out)

    @njit(cache=True, fastmath=True)
    def linear_router_token(x, router_w, router_b, active, rows, shared, size, keep, out):
        """One token through a carved FFN routed by ``scores = W x + b``: route, compute, sum; one call."""
        e = router_w.shape[0]
        d = x.shape[0]
        scores = np.empty(e, dtype=np.float32)
        for i in range(e):
            acc = router_b[i]
            for j in range(d):
                acc += router_w[i, j] * x[j]
            scores[i] = acc
        _experts_token(x, rows, _topk_indices(scores, active), shared, size, keep, out)

    @njit(cache=True, fastmath=True)
    def partial_router_token(x, input_keep, gate_t, up_t, active, rows, shared, size, keep, out):
        """One token through a carved FFN routed by the partial-input estimate (TEAL-style); one call."""
        cols = _topk_indices(np.abs(x), input_keep)
        f = gate_t.shape[1]
        scores = np.empty(f - shared, dtype=np.float32)
        partial_scores(x[cols], cols, gate_t, up_t, shared, scores)
        e = (f - shared) // size
        if size > 1:
            expert_scores = np.zeros(e, dtype=np.float32)
            for i in range(e):
                for j in range(size):
                    expert_scores[i] += scores[i * size + j]
        else:
            expert_scores = scores
        _experts_token(x, rows, _topk_indices(expert_scores, active), shared, size, keep, out)


def pack_rows(gate, up, down_t) -> np.ndarray:
    """``[F, 3, D]`` float32: each stored neuron's gate row, up row and down row, contiguous."""
    return np.ascontiguousarray(np.stack([gate, up, down_t], axis=1), dtype=np.float32)
