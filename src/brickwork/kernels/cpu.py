"""Fused CPU kernels (numba) for carved SwiGLU FFNs: one token at a time, or a batch of tokens at once.

Per token, a carved FFN reads the shared neurons and the selected experts' neurons. Weights are packed once per
BrickFFN as ``rows [F, 3, D]`` = (gate, up, down) of each stored neuron, so a neuron is one contiguous 3*D block
and an expert a contiguous run of them; the whole token is one compiled call with no per-token weight copy
and no Python loop over experts (the loop's dispatch cost is what made small experts slow; DejaVu, Liu et al.
2023 and PowerInfer, Song et al. 2023 make the same point for GPU kernels).

For the ``partial`` router (TEAL-style input sparsity, Liu et al. 2024) the kernel also holds the gate and up
matrices transposed, ``[D, F]``, so that the partial sums over the token's largest inputs read whole rows;
the neurons it selects then read their full rows.

For many tokens at once (:func:`hidden_batch`, :func:`down_batch` and the ``*_router_batch`` functions) each
selected neuron's rows are read once for all the tokens that selected it, four tokens per pass, and the partial
router's estimate runs over blocks of neurons whose slice of the transposed gate/up stays in the L2 cache while
every token adds its columns, four per pass.

Threads: the loops are split over numba's threads (``prange``: neuron slices per token, neurons or tokens for a
batch); the default is torch's thread count. Every sum runs in an order fixed by one token's own data, so
results do not depend on the thread count. Every cached function that calls a parallel one is compiled
``parallel=True`` itself, prange or not: a cached serial caller of a parallel function can crash, or compute
garbage, when a later process loads it from the cache (numba issues #4807 and #8578; seen here as a segfault of
the linear router's per-token kernel once another process had cached ``_experts_token`` first).

Accumulation: every kernel sums in the dtype of the inputs ``x`` it is given. float32 inputs: float32 sums.
float64 inputs (the float32 inputs widened, for bricks with ``accumulate="float64"``): products and sums in
float64 from the float32 weights, each h, score and output rounded to float32 once, and the activation in
float64, so that the result does not depend on the order of the sums (see :class:`brickwork.bricks.BrickFFN`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this keeps an import error readable
    numba = None

HAVE_NUMBA = numba is not None

if HAVE_NUMBA:
    # The callers of parallel functions are compiled parallel=True for the cache's sake (see Threads above), with
    # no loop of their own to run in parallel; numba's warning that it found none says nothing to act on.
    warnings.filterwarnings(
        "ignore",
        message=r"(?s).*'parallel=True' was specified but no transformation for parallel execution",
        category=numba.NumbaPerformanceWarning,
    )
    # Neurons are split into this many fixed slices (the units of parallel work): for the down sums each slice
    # has its own accumulator and the slices are summed in order at the end, so whole contiguous rows are
    # streamed and the result does not depend on the number of threads.
    SLICES = 8
    # Top-k over at most this many values sorts them; over more, radix select (see _topk_indices).
    SMALL_SELECT = 64
    # A per-token budget's cut by router mass runs in the calling thread below this many tokens
    # (cut_by_mass_serial): a parallel call's thread wake-up costs tens of microseconds, the cut of one token a few.
    SERIAL_CUT_TOKENS = 16
    # The batch partial sums run over neuron blocks of this size: the block's slice of the transposed gate/up
    # (576 columns x 64 neurons x 2 x 4 bytes = 295 KB on SmolLM2) stays in the L2 cache.
    NEURON_BLOCK = 128
    # ... from this many tokens; below, one block per thread.
    BLOCK_TOKENS = 64

    @njit(cache=True, fastmath=False, inline="always")
    def _silu(v):
        return v / (1.0 + math.exp(-v))

    @njit(cache=True, fastmath={"nnan", "ninf", "nsz", "contract", "arcp"})
    def _abs_silu_product(g, u, out):
        """out[i] = |silu(g[i]) * u[i]|, with an exp the compiler vectorises: exp(z) = 2^k e^r, k = round(z / ln 2),
        r = z - k ln 2 in two parts (Cody and Waite), e^r by Cephes' degree-6 polynomial for expf (Moshier 1989);
        within 1 ulp of the C library's expf here, 3x faster than calling it per element. z is clamped to
        [-87, 88], where silu(g) is g or an underflow either way."""
        n = g.shape[0]
        powers = np.empty(n, dtype=np.int32)
        poly = np.empty(n, dtype=np.float32)
        for i in range(n):
            z = min(max(-g[i], np.float32(-87.0)), np.float32(88.0))
            k = np.floor(z * np.float32(1.44269504088896341) + np.float32(0.5))
            r = z - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
            q = np.float32(1.9875691500e-4)
            q = q * r + np.float32(1.3981999507e-3)
            q = q * r + np.float32(8.3334519073e-3)
            q = q * r + np.float32(4.1665795894e-2)
            q = q * r + np.float32(1.6666665459e-1)
            q = q * r + np.float32(5.0000001201e-1)
            poly[i] = q * r * r + r + np.float32(1.0)
            powers[i] = (np.int32(k) + np.int32(127)) << np.int32(23)
        scale = powers.view(np.float32)
        for i in range(n):
            out[i] = abs(g[i] / (np.float32(1.0) + poly[i] * scale[i]) * u[i])

    @njit(cache=True, fastmath={"nnan", "ninf", "nsz", "contract"})
    def _silu_product64(g, u, out, absolute):
        """out[i] = silu(g[i]) * u[i] (its absolute value with ``absolute``) for float64 g, u, rounded once to
        float32: exp in float64 as Cephes' exp computes it (Moshier 1989: Cody-Waite reduction,
        e^r = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2))), within an ulp of float64 and vectorised by the compiler. z is
        clamped to [-708, 709], where silu(g) is g or an underflow of float32 either way."""
        n = g.shape[0]
        powers = np.empty(n, dtype=np.int64)
        ratio = np.empty(n, dtype=np.float64)
        for i in range(n):
            z = min(max(-g[i], -708.0), 709.0)
            k = np.floor(z * 1.4426950408889634 + 0.5)
            r = z - k * 6.93145751953125e-1 - k * 1.42860682030941723212e-6
            rr = r * r
            p = r * (
                (1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1
            )
            q = (
                (3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1
            ) * rr
            q = q + 2.0
            ratio[i] = 1.0 + 2.0 * p / (q - p)
            powers[i] = (np.int64(k) + np.int64(1023)) << np.int64(52)
        scale = powers.view(np.float64)
        if absolute:
            for i in range(n):
                out[i] = abs(g[i] / (1.0 + ratio[i] * scale[i]) * u[i])
        else:
            for i in range(n):
                out[i] = g[i] / (1.0 + ratio[i] * scale[i]) * u[i]

    @njit(cache=True, inline="always")
    def _abs_silu(g, u, out):
        """out = |silu(g) * u|, in the precision of g and u."""
        if g.itemsize == 8:
            _silu_product64(g, u, out, True)
        else:
            _abs_silu_product(g, u, out)

    @njit(cache=True, fastmath=True, inline="always")
    def _axpy(a, v, y):
        """y += a * v (the loop the compiler vectorises best here: whole contiguous rows, no 2-D indexing)."""
        for n in range(y.shape[0]):
            y[n] += a[n] * v

    @njit(cache=True, fastmath=True, inline="always")
    def _axpy4(a0, a1, a2, a3, v0, v1, v2, v3, y):
        """y += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3, added in that order: four rows per pass over y, so y is
        loaded and stored once for four rows."""
        for n in range(y.shape[0]):
            y[n] = (((y[n] + a0[n] * v0) + a1[n] * v1) + a2[n] * v2) + a3[n] * v3

    @njit(cache=True, fastmath=True, inline="always")
    def _add_columns(xs, cols, w_t, lo, hi, y):
        """y += the sum over k of xs[cols[k]] * w_t[cols[k], lo:hi], four columns per pass, in the order of
        cols."""
        m = cols.shape[0]
        k = 0
        while k + 4 <= m:
            _axpy4(
                w_t[cols[k], lo:hi],
                w_t[cols[k + 1], lo:hi],
                w_t[cols[k + 2], lo:hi],
                w_t[cols[k + 3], lo:hi],
                xs[cols[k]],
                xs[cols[k + 1]],
                xs[cols[k + 2]],
                xs[cols[k + 3]],
                y,
            )
            k += 4
        while k < m:
            _axpy(w_t[cols[k], lo:hi], xs[cols[k]], y)
            k += 1

    @njit(cache=True, parallel=True, fastmath=True)
    def partial_scores(x, cols, gate_t, up_t, first, scores):
        """scores[n - first] = |silu(g~) u~| with g~, u~ from the input columns ``cols`` of ``x`` only.

        The neurons are split into fixed slices (threads); each slice adds each column's part of the ``gate_t``/
        ``up_t`` [D, F] rows to its partial sums, four columns at a time."""
        f = gate_t.shape[1]
        per = (f - first + SLICES - 1) // SLICES
        for c in prange(SLICES):
            lo = first + c * per
            hi = min(f, lo + per)
            if lo >= hi:
                continue
            g = np.zeros(hi - lo, dtype=x.dtype)
            u = np.zeros(hi - lo, dtype=x.dtype)
            _add_columns(x, cols, gate_t, lo, hi, g)
            _add_columns(x, cols, up_t, lo, hi, u)
            _abs_silu(g, u, scores[lo - first : hi - first])

    @njit(cache=True)
    def _sort_keys(values):
        """uint32 keys that order like the float32 values (-0.0 counted as 0.0)."""
        bits = values.view(np.uint32)
        keys = np.empty(values.shape[0], dtype=np.uint32)
        for i in range(values.shape[0]):
            b = bits[i]
            if b == np.uint32(0x80000000):
                b = np.uint32(0)
            keys[i] = ~b if b >> np.uint32(31) else b | np.uint32(0x80000000)
        return keys

    @njit(cache=True)
    def _radix_digit(keys, shift, width, prefix, need, counts):
        """Among keys whose bits above ``shift + width`` equal ``prefix``: the digit (bits shift .. shift + width)
        holding the ``need``-th largest, and how many of those keys lie in higher digits."""
        counts[:] = 0
        top = np.uint32(shift + width)
        digit_mask = np.uint32((1 << width) - 1)
        for i in range(keys.shape[0]):
            key = keys[i]
            if top >= 32 or key >> top == prefix:
                counts[(key >> np.uint32(shift)) & digit_mask] += 1
        above = 0
        digit = (1 << width) - 1
        while above + counts[digit] < need:
            above += counts[digit]
            digit -= 1
        return digit, above

    @njit(cache=True)
    def _topk_indices(values, k):
        """Indices of the k largest values (ascending index among those above the k-th largest, then ties by
        position). The k-th largest is found by a radix select on the values' bits, most significant digit first:
        branch-free counting, 2-3x faster than quickselect on these sizes, whose comparisons mispredict."""
        n = values.shape[0]
        if k >= n:
            return np.arange(n)
        keys = _sort_keys(values)
        if n <= SMALL_SELECT:  # a few experts: the 2,048 counters would cost more than sorting
            threshold = np.sort(keys)[n - k]
        else:
            # Digits of 11, 11 and 10 bits for long rows; of 8 bits (four passes, 256 counters) for shorter ones,
            # where clearing 2,048 counters would cost more than a fourth pass.
            width = 11 if n > 1024 else 8
            counts = np.empty(1 << width, dtype=np.int64)
            need = k
            prefix = np.uint32(0)
            shift = 32
            while shift > 0:
                w = min(width, shift)
                shift -= w
                digit, above = _radix_digit(keys, shift, w, prefix, need, counts)
                need -= above
                prefix = (prefix << np.uint32(w)) | np.uint32(digit)
            threshold = prefix
        out = np.empty(k, dtype=np.int64)
        c = 0
        for i in range(n):
            if keys[i] > threshold:
                out[c] = i
                c += 1
        for i in range(n):
            if c >= k:
                break
            if keys[i] == threshold:
                out[c] = i
                c += 1
        return out

    @njit(cache=True, fastmath=True, inline="always")
    def _gate_up(rows, n, x):
        """gate . x and up . x of packed neuron ``n``, summed in x's dtype."""
        g = x.dtype.type(0.0)
        u = x.dtype.type(0.0)
        for j in range(x.shape[0]):
            g += rows[n, 0, j] * x[j]
            u += rows[n, 1, j] * x[j]
        return g, u

    @njit(cache=True, fastmath=True, inline="always")
    def _neuron_h(rows, n, x):
        """h of packed neuron ``n``: silu(gate . x) * (up . x), summed in x's dtype, rounded to float32."""
        g, u = _gate_up(rows, n, x)
        return np.float32(_silu(g) * u)

    @njit(cache=True, inline="always")
    def _sum_slices(acc, out):
        """out[j] = the slices' accumulators summed in slice order (in their dtype, rounded to out's once)."""
        for j in range(out.shape[0]):
            total = acc.dtype.type(0.0)
            for c in range(acc.shape[0]):
                total += acc[c, j]
            out[j] = total

    @njit(cache=True, parallel=True, fastmath=True)
    def _fused_rows(x, rows, neurons, out):
        """out = sum over ``neurons`` of silu(gate . x) * (up . x) * down: each neuron's packed (gate, up, down)
        block read once, in one pass."""
        m = neurons.shape[0]
        d = x.shape[0]
        acc = np.zeros((SLICES, d), dtype=x.dtype)
        per = (m + SLICES - 1) // SLICES
        for c in prange(SLICES):
            for i in range(c * per, min(m, (c + 1) * per)):
                n = neurons[i]
                h = x.dtype.type(_neuron_h(rows, n, x))
                for j in range(d):
                    acc[c, j] += h * rows[n, 2, j]
        _sum_slices(acc, out)

    @njit(cache=True, parallel=True, fastmath=True)
    def _down_rows(rows, neurons, weights, out, x):
        """out = sum of weights[i] * down row of neurons[i], in the fixed slices of :func:`_fused_rows`, summed in
        the dtype of ``x``."""
        m = neurons.shape[0]
        d = out.shape[0]
        acc = np.zeros((SLICES, d), dtype=x.dtype)
        per = (m + SLICES - 1) // SLICES
        for c in prange(SLICES):
            for i in range(c * per, min(m, (c + 1) * per)):
                w = x.dtype.type(weights[i])
                n = neurons[i]
                for j in range(d):
                    acc[c, j] += w * rows[n, 2, j]
        _sum_slices(acc, out)

    @njit(cache=True, inline="always")
    def _computed_neurons(chosen, shared, size):
        """Stored indices of the shared neurons, then of each chosen expert's neurons, for one token; a slot
        holding -1 (an expert a per-token budget dropped) is skipped."""
        routed = 0
        for c in range(chosen.shape[0]):
            if chosen[c] >= 0:
                routed += 1
        neurons = np.empty(shared + routed * size, dtype=np.int64)
        for i in range(shared):
            neurons[i] = i
        j = shared
        for c in range(chosen.shape[0]):
            if chosen[c] < 0:
                continue
            for i in range(size):
                neurons[j + i] = shared + chosen[c] * size + i
            j += size
        return neurons

    @njit(cache=True, inline="always")
    def _expert_scores(neuron_scores, size, x):
        """Each expert's score: the sum of its ``size`` neurons' scores in the dtype of ``x``, rounded to float32
        (the scores themselves when size is 1)."""
        if size == 1:
            return neuron_scores
        e = neuron_scores.shape[0] // size
        out = np.empty(e, dtype=np.float32)
        for i in range(e):
            total = x.dtype.type(0.0)
            for j in range(size):
                total += neuron_scores[i * size + j]
            out[i] = total
        return out

    @njit(cache=True, parallel=True, fastmath=True)
    def _experts_token(x, rows, chosen, shared, size, keep, out):
        """The shared neurons and the chosen experts' neurons; with down-row sparsity (``keep`` < their number)
        h of all of them first, then the down sum over the ``keep`` largest |h|."""
        neurons = _computed_neurons(chosen, shared, size)
        if keep >= neurons.shape[0]:
            _fused_rows(x, rows, neurons, out)
            return
        h = _token_hidden(x, rows, neurons)
        top = _topk_indices(np.abs(h), keep)
        _down_rows(rows, neurons[top], h[top], out, x)

    @njit(cache=True, parallel=True, fastmath=True)
    def _token_hidden(x, rows, neurons):
        """float32 h of ``neurons`` for one token ``x`` (float64 inputs: the dot products first, then one
        vectorised pass of silu)."""
        m = neurons.shape[0]
        h = np.empty(m, dtype=np.float32)
        if x.itemsize == 8:
            g = np.empty(m, dtype=np.float64)
            u = np.empty(m, dtype=np.float64)
            for i in prange(m):
                g[i], u[i] = _gate_up(rows, neurons[i], x)
            _silu_product64(g, u, h, False)
        else:
            for i in prange(m):
                h[i] = _neuron_h(rows, neurons[i], x)
        return h

    @njit(cache=True, parallel=True, fastmath=True)
    def weighted_experts_token(x, rows, chosen, weights, shared, size, keep, out):
        """As :func:`_experts_token`, each chosen expert's h multiplied by its weight (float32, as the reference
        path multiplies) before the down projection (and before the ``keep`` largest |h| are picked)."""
        neurons = _computed_neurons(chosen, shared, size)
        m = neurons.shape[0]
        h = _token_hidden(x, rows, neurons)
        j = shared
        for c in range(chosen.shape[0]):
            if chosen[c] < 0:  # dropped by a per-token budget: not computed
                continue
            w = np.float32(weights[c])
            for i in range(size):
                h[j + i] *= w
            j += size
        if keep >= m:
            _down_rows(rows, neurons, h, out, x)
        else:
            top = _topk_indices(np.abs(h), keep)
            _down_rows(rows, neurons[top], h[top], out, x)

    @njit(cache=True, fastmath=True, inline="always")
    def _linear_choice(x, router_w, router_b, active):
        """The ``active`` experts with the largest ``W x + b`` for one token ``x``."""
        e = router_w.shape[0]
        scores = np.empty(e, dtype=np.float32)
        for i in range(e):
            acc = x.dtype.type(router_b[i])
            for j in range(x.shape[0]):
                acc += router_w[i, j] * x[j]
            scores[i] = acc
        return _topk_indices(scores, active)

    @njit(cache=True, parallel=True, fastmath=True)  # parallel: it calls parallel functions (numba #8578)
    def linear_router_token(x, router_w, router_b, active, rows, shared, size, keep, out):
        """One token through a carved FFN routed by ``scores = W x + b``: route, compute, sum; one call."""
        _experts_token(x, rows, _linear_choice(x, router_w, router_b, active), shared, size, keep, out)

    @njit(cache=True, parallel=True, fastmath=True)  # parallel: it calls parallel functions (numba #8578)
    def partial_router_token(x, input_keep, gate_t, up_t, active, rows, shared, size, keep, out):
        """One token through a carved FFN routed by the partial-input estimate (TEAL-style); one call."""
        cols = _topk_indices(np.abs(x).astype(np.float32), input_keep)
        f = gate_t.shape[1]
        scores = np.empty(f - shared, dtype=np.float32)
        partial_scores(x, cols, gate_t, up_t, shared, scores)
        _experts_token(
            x, rows, _topk_indices(_expert_scores(scores, size, x), active), shared, size, keep, out
        )

    # ---- Many tokens at once (batch decode, prefill) ------------------------------------------------------------
    # Per token the work is sparse, but over a batch most experts have some token, so the per-token kernel would
    # read most weights once per token. These kernels read each selected neuron's packed row once per call and
    # use it for every token that selected it (and, for the partial router, each input column's row once for
    # every token that kept that column). Every h and every estimate is a sum in a fixed order over one token's
    # own inputs, so a token's result does not depend on the thread count.

    @njit(cache=True)
    def _token_lists(items, n):
        """For ``items [T, k]`` of values in [0, n) (or -1: nothing): ``offsets [n + 1]`` and ``tokens`` such that
        ``tokens[offsets[v]:offsets[v + 1]]`` are the rows holding value v, ascending."""
        rows, k = items.shape
        offsets = np.zeros(n + 1, dtype=np.int64)
        for t in range(rows):
            for c in range(k):
                if items[t, c] >= 0:
                    offsets[items[t, c] + 1] += 1
        for v in range(n):
            offsets[v + 1] += offsets[v]
        tokens = np.empty(offsets[n], dtype=np.int64)
        fill = offsets[:n].copy()
        for t in range(rows):
            for c in range(k):
                v = items[t, c]
                if v >= 0:
                    tokens[fill[v]] = t
                    fill[v] += 1
        return offsets, tokens

    @njit(cache=True, parallel=True)
    def _topk_rows(values, k):
        """``[T, k]``: :func:`_topk_indices` of each row."""
        out = np.empty((values.shape[0], k), dtype=np.int64)
        for t in prange(values.shape[0]):
            out[t] = _topk_indices(values[t], k)
        return out

    @njit(cache=True)
    def _cut_row(values, active, threshold, min_active, zero_mass, clamp, chosen):
        """One token of :func:`cut_by_mass`: writes its row of ``chosen``, returns its dropped share."""
        top = _topk_indices(values, active)
        k = top.shape[0]
        ranked = np.empty(k, dtype=np.float32)
        for i in range(k):
            ranked[i] = values[top[i]]
        # router order: by value, ties by position (top lists equal values in ascending position; a stable sort
        # keeps that)
        order = np.argsort(-ranked, kind="mergesort")
        cumulative = np.empty(k, dtype=np.float64)
        total = 0.0
        for i in range(k):
            mass = np.float64(ranked[order[i]])
            if clamp and mass < 0.0:
                mass = 0.0
            total += mass
            cumulative[i] = total
        kept = k
        if threshold < 1.0:
            goal = threshold * (total + zero_mass) - zero_mass
            short = 1 if goal > 0.0 else 0
            for i in range(k):
                if cumulative[i] < goal:
                    short += 1
            kept = min(max(short, min(min_active, k)), k)
        for i in range(k):
            chosen[i] = top[order[i]] if i < kept else -1
        if not total > 0.0:
            return 0.0
        reached = cumulative[kept - 1] if kept > 0 else 0.0
        return 1.0 - reached / max(total, 2.2250738585072014e-308)

    @njit(cache=True)
    def cut_by_mass_serial(values, active, threshold, min_active, zero_mass, clamp):
        """:func:`cut_by_mass` in the calling thread, row by row with the same :func:`_cut_row`, so the same bits: for
        a few tokens (batch-1 decode), where waking numba's threads costs more than the cut itself."""
        tokens = values.shape[0]
        chosen = np.empty((tokens, active), dtype=np.int64)
        dropped = np.empty(tokens, dtype=np.float64)
        for t in range(tokens):
            dropped[t] = _cut_row(values[t], active, threshold, min_active, zero_mass, clamp, chosen[t])
        return chosen, dropped

    @njit(cache=True, parallel=True)
    def cut_by_mass(values, active, threshold, min_active, zero_mass, clamp):
        """A per-token budget's routing (:mod:`brickwork.bricks.adaptive`) from ``values [T, E]``, the router's
        probabilities (or, ``clamp``: its scores, whose mass is clamped at 0): ``(chosen [T, active], dropped [T])``,
        each token's top ``active`` experts in router order with -1 past those it keeps, and the share of mass it
        drops. The masses are summed in float64 in router order, as :func:`~brickwork.bricks.adaptive.kept_counts`
        sums them (no fastmath: the same operations, the same bits)."""
        tokens = values.shape[0]
        chosen = np.empty((tokens, active), dtype=np.int64)
        dropped = np.empty(tokens, dtype=np.float64)
        for t in prange(tokens):
            dropped[t] = _cut_row(values[t], active, threshold, min_active, zero_mass, clamp, chosen[t])
        return chosen, dropped

    @njit(cache=True, parallel=True, fastmath=True)
    def linear_router_batch(x, router_w, router_b, active):
        """``[T, active]`` experts chosen by ``scores = W x + b`` for each token."""
        chosen = np.empty((x.shape[0], active), dtype=np.int64)
        for t in prange(x.shape[0]):
            chosen[t] = _linear_choice(x[t], router_w, router_b, active)
        return chosen

    @njit(cache=True, parallel=True, fastmath=True)
    def partial_router_batch(x, input_keep, gate_t, up_t, active, shared, size, threads):
        """``[T, active]`` experts chosen by the partial-input estimate (as :func:`partial_router_token`);
        ``threads``: numba's thread count.

        The neurons are cut into blocks of NEURON_BLOCK (the parallel units): a block's slice of every column of
        ``gate_t``/``up_t`` stays in the L2 cache while the tokens pass; for each token the block's partial sums
        over its kept columns (four at a time, in the order of its columns, as :func:`partial_scores` adds them)
        stay in L1 and become scores at once, so no [T, F] array of sums is written."""
        tokens = x.shape[0]
        f = gate_t.shape[1]
        cols = _topk_rows(np.abs(x).astype(np.float32), input_keep)
        neuron_scores = np.empty((tokens, f - shared), dtype=np.float32)
        # Few tokens: one block per thread, so that each column's row is read in long runs; the sums do not
        # depend on the blocks.
        per = NEURON_BLOCK if tokens >= BLOCK_TOKENS else max(1, -(-(f - shared) // threads))
        blocks = (f - shared + per - 1) // per
        for b in prange(blocks):
            lo = shared + b * per
            hi = min(f, lo + per)
            g = np.empty(hi - lo, dtype=x.dtype)
            u = np.empty(hi - lo, dtype=x.dtype)
            for t in range(tokens):
                g[:] = 0.0
                u[:] = 0.0
                _add_columns(x[t], cols[t], gate_t, lo, hi, g)
                _add_columns(x[t], cols[t], up_t, lo, hi, u)
                _abs_silu(g, u, neuron_scores[t, lo - shared : hi - shared])
        if size == 1:
            return _topk_rows(neuron_scores, active)
        scores = np.empty((tokens, (f - shared) // size), dtype=np.float32)
        for t in prange(tokens):
            scores[t] = _expert_scores(neuron_scores[t], size, x[t])
        return _topk_rows(scores, active)

    @njit(cache=True, fastmath=True, inline="always")
    def _sums4(rows, n, x, t0, t1, t2, t3):
        """Neuron n's gate and up sums for four tokens (in x's dtype), its rows read once."""
        g0 = g1 = g2 = g3 = u0 = u1 = u2 = u3 = x.dtype.type(0.0)
        for j in range(x.shape[1]):
            wg = rows[n, 0, j]
            wu = rows[n, 1, j]
            g0 += wg * x[t0, j]
            u0 += wu * x[t0, j]
            g1 += wg * x[t1, j]
            u1 += wu * x[t1, j]
            g2 += wg * x[t2, j]
            u2 += wu * x[t2, j]
            g3 += wg * x[t3, j]
            u3 += wu * x[t3, j]
        return g0, g1, g2, g3, u0, u1, u2, u3

    @njit(cache=True, fastmath=True, inline="always")
    def _h4(rows, n, x, t0, t1, t2, t3, h):
        """h[t, n] for four tokens: neuron n's gate and up rows read once."""
        g0, g1, g2, g3, u0, u1, u2, u3 = _sums4(rows, n, x, t0, t1, t2, t3)
        h[t0, n] = _silu(g0) * u0
        h[t1, n] = _silu(g1) * u1
        h[t2, n] = _silu(g2) * u2
        h[t3, n] = _silu(g3) * u3

    @njit(cache=True, parallel=True, fastmath=True)
    def _hidden_batch(x, rows, shared, size, offsets, tokens, h):
        """h[t, n] of every shared neuron for every token, and of every routed neuron n for the tokens listed for
        its expert (``tokens[offsets[i]:offsets[i + 1]]``, i = (n - shared) // size). Four tokens per pass over a
        neuron's rows; the rest one at a time."""
        f = rows.shape[0]
        everyone = np.arange(x.shape[0])
        for n in prange(f):
            if n < shared:
                listed = everyone
            else:
                i = (n - shared) // size
                listed = tokens[offsets[i] : offsets[i + 1]]
            m = listed.shape[0]
            q = 0
            if x.itemsize == 8:  # float64 sums: silu in one vectorised pass over the neuron's tokens
                g = np.empty(m, dtype=np.float64)
                u = np.empty(m, dtype=np.float64)
                while q + 4 <= m:
                    g[q], g[q + 1], g[q + 2], g[q + 3], u[q], u[q + 1], u[q + 2], u[q + 3] = _sums4(
                        rows, n, x, listed[q], listed[q + 1], listed[q + 2], listed[q + 3]
                    )
                    q += 4
                while q < m:
                    g[q], u[q] = _gate_up(rows, n, x[listed[q]])
                    q += 1
                out = np.empty(m, dtype=np.float32)
                _silu_product64(g, u, out, False)
                for q in range(m):
                    h[listed[q], n] = out[q]
                continue
            while q + 4 <= m:
                _h4(rows, n, x, listed[q], listed[q + 1], listed[q + 2], listed[q + 3], h)
                q += 4
            while q < m:
                t = listed[q]
                h[t, n] = _neuron_h(rows, n, x[t])
                q += 1

    @njit(cache=True, parallel=True)
    def _kept_rows(h, chosen, shared, size, keep):
        """``[T, keep]`` stored indices of the ``keep`` largest |h| among each token's computed neurons (all of
        them when ``keep`` is at least their number), in the order :func:`_topk_indices` gives; a token that
        computes fewer (a per-token budget dropped experts) has -1 after its own."""
        tokens = h.shape[0]
        k = min(keep, shared + chosen.shape[1] * size)
        out = np.empty((tokens, k), dtype=np.int64)
        for t in prange(tokens):
            computed = _computed_neurons(chosen[t], shared, size)
            m = computed.shape[0]
            if k < m:
                values = np.empty(m, dtype=np.float32)
                for i in range(m):
                    values[i] = abs(h[t, computed[i]])
                out[t] = computed[_topk_indices(values, k)]
            else:
                out[t, :m] = computed
                out[t, m:] = -1
        return out

    @njit(cache=True, parallel=True, fastmath=True)
    def _down_batch(rows, h, kept, out, x):
        """out[t] = sum over kept[t] (in its order) of h[t, n] * down row n, summed in x's dtype; one token per
        task."""
        for t in prange(h.shape[0]):
            acc = np.zeros(out.shape[1], dtype=x.dtype)
            for i in range(kept.shape[1]):
                n = kept[t, i]
                if n < 0:  # the token's own neurons end here
                    break
                _axpy(rows[n, 2], x.dtype.type(h[t, n]), acc)
            out[t] = acc

    @njit(cache=True, parallel=True)  # parallel: it calls parallel functions (numba #8578)
    def hidden_batch(x, chosen, rows, shared, size):
        """``h [T, F]`` of each token's shared and chosen experts' neurons (0 elsewhere)."""
        e = (rows.shape[0] - shared) // size
        offsets, tokens = _token_lists(chosen, e)
        h = np.zeros((x.shape[0], rows.shape[0]), dtype=np.float32)
        _hidden_batch(x, rows, shared, size, offsets, tokens, h)
        return h

    @njit(cache=True, parallel=True)  # parallel: it calls parallel functions (numba #8578)
    def down_batch(h, chosen, rows, shared, size, keep, out, x):
        """out = the down projection of ``h`` over each token's computed neurons, or their ``keep`` largest |h|:
        only those down rows are read; summed in the dtype of the inputs ``x``."""
        _down_batch(rows, h, _kept_rows(h, chosen, shared, size, keep), out, x)


def pack_rows(gate, up, down_t) -> np.ndarray:
    """``[F, 3, D]`` float32: each stored neuron's gate row, up row and down row, contiguous."""
    return np.ascontiguousarray(np.stack([gate, up, down_t], axis=1), dtype=np.float32)
