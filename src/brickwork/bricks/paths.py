"""Fast paths for carved FFNs, picked at run time by the number of tokens; the reference path is
:meth:`brickwork.bricks.BrickFFN.forward_reference`, and every fast path is tested against it.

- ``token``: one fused numba call per token (:mod:`brickwork.kernels.cpu`): route, then read only the shared
  and selected neurons' packed rows. Used for decode (one token) and for a few tokens, one at a time.
- ``batch``: all tokens in one set of numba calls: route every token, then read each selected neuron's rows
  once for all the tokens that selected it; the down projection reads only each token's rows, or, once most
  rows are read anyway, is one dense matmul over the zero-filled h (batch decode, prefill).
- ``grouped``: tokens grouped by expert, one matmul per expert that has tokens (long prefills, expert-level
  carves).
- ``reference``: every expert computed and masked (what the dense FFN costs, plus the router); used for
  training, and for bricks the kernels do not support.

A brick with a per-token budget (:mod:`brickwork.bricks.adaptive`) is scored in torch on every path, as the
reference path scores it, and cut by router mass in one compiled call (:func:`cpu.cut_by_mass`); the slots of the
experts a token drops hold -1, and the kernels skip them: they read no weights for them.

:data:`SWITCH_POINTS` holds, per path family and read fraction, the largest token count for which ``token`` is
used, the smallest for which ``grouped`` is, and the smallest for which ``batch`` does its down projection as
one dense matmul; they come from ``brickwork bench speed`` on the 2-core CPU (bench/results/speed-smollm2) and
can be changed with :func:`set_switch_points`.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn

from brickwork.bricks.adaptive import add_copy, copy_coefficients, kept_weights, ranked_values
from brickwork.kernels.cpu import HAVE_NUMBA

# Per router family (``Router.computes``; routers may declare their own points in ``Router.switch_points``, as the
# neuron-level ``partial`` estimate does) and FFN read fraction, the first (fraction, tokens) pair whose fraction
# is at least the brick's:
# ``token_max``: the per-token kernel up to this many tokens; ``grouped_min``: grouped matmuls from this many
# (expert-level carves without down-row sparsity); ``dense_down_min``: from this many tokens the batch path's
# down projection is one dense matmul (bricks without down-row sparsity). From FFN-only times per token count on
# SmolLM2 with the kernels they were set for (the "Kernel paths" table of bench/results/speed-smollm2): the
# per-token kernel leads up to 3 tokens (4 for the 50% neuron-level carve); the batch path from there; grouped
# matmuls from 128 tokens at 25% and 512 at 50%; the dense down matmul from 24 and 12 tokens.
SWITCH_POINTS = {
    "token_max": {"linear": ((1.0, 3),)},
    "grouped_min": {"linear": ((0.3, 128), (1.0, 512))},
    "dense_down_min": {"linear": ((0.3, 24), (1.0, 12))},
}


def set_switch_points(
    token_max: int | dict | None = None,
    grouped_min: int | dict | None = None,
    dense_down_min: int | dict | None = None,
) -> None:
    """Override the switch points: each an int for every brick, or a table like the default's."""
    for name, value in (
        ("token_max", token_max),
        ("grouped_min", grouped_min),
        ("dense_down_min", dense_down_min),
    ):
        if value is not None:
            SWITCH_POINTS[name] = value


def switch_point(name: str, family: str, fraction: float, own: dict | None = None) -> int:
    """``SWITCH_POINTS[name]`` (``token_max``, ``grouped_min``, ``dense_down_min``) for a brick of this router
    family (``Router.computes``) and reads: the table's entry for the family, else the router's ``own`` switch
    points (``Router.switch_points``), else the linear routers'."""
    table = SWITCH_POINTS[name]
    if isinstance(table, int):
        return table
    pairs = table.get(family) or (own or {}).get(name) or table["linear"]
    return next((tokens for bound, tokens in pairs if fraction <= bound), pairs[-1][1])


def _is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ in ("SiLUActivation", "SiLU")


def supports_fast_path(brick) -> bool:
    """Whether ``brick`` can run the CPU kernels: CPU fp32 SwiGLU without biases, numba installed."""
    return (
        HAVE_NUMBA
        and brick.gate is not None
        and brick.up_bias is None
        and brick.gate_bias is None
        and brick.down_bias is None
        and brick.up.dtype == torch.float32
        and brick.up.device.type == "cpu"
        and _is_silu(brick.act)
    )


# --- routing, by what the router declares -----------------------------------------------------------------------
# Each path (``token``: the fused per-token call; ``batch``: the batch kernels; ``grouped``: per-expert matmuls)
# routes tokens as the router's own file declares (``Router.fast_paths``: a function ``(brick, plan) -> what the
# path calls`` preparing a compiled router), or TORCH: the path routes in torch first (BrickFFN.select, or
# BrickFFN.route for a weighted rule), exactly as the reference path routes, then runs the experts kernels. (A
# per-token budget is scored in torch whatever the router declares, then cut by router mass in one compiled call:
# see _route.)
TORCH = None
PATHS = ("token", "batch", "grouped")


def routing_for(router, weighted: bool, path: str):
    """How ``path`` routes a brick of ``router`` (class or instance) and combine rule: the preparation the router
    declares in its ``fast_paths`` (see :class:`~brickwork.routing.base.Router`), or TORCH: weighted rules and
    grouped matmuls route in torch (BrickFFN.route), as do routers that bring no fast path for ``path``."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if weighted or path == "grouped":
        return TORCH
    return router.fast_paths.get(path, TORCH)


class Plan:
    """What one brick's per-token calls need, prepared once: the packed weight rows, the kernel and its
    arguments. Per call, only a cheap staleness check.

    Decode runs the per-token kernel once per layer and token, so the Python around it (module attribute
    look-ups, re-checking the brick, tensor wrapping) costs as much as the kernel unless it is precomputed. The
    plan keeps the Parameter objects themselves and compares their storage pointer and version counter on every
    call: an in-place change, ``param.data = ...``, ``.to()`` or a new spec (another ``combine`` rule or
    ``accumulate``) makes it stale and it is rebuilt.

    How each path routes comes from the router's ``fast_paths`` (:func:`routing_for`): ``kernel`` routes inside the
    one compiled call (linear and partial routers), or is None and the path routes in torch first (:meth:`BrickFFN.route`), then :func:`cpu._experts_token` or
    :func:`cpu.weighted_experts_token`.
    """

    def __init__(self, brick):
        tensors = (brick.gate, brick.up, brick.down_t, *brick.router.parameters())
        self.tensors = [t for t in tensors if t is not None]
        self.key = self._key()
        self.spec = spec = brick.spec
        self.weighted = spec.combine.weighted
        self.supported = supports_fast_path(brick)
        # the switch points' family: routers that declare no points of their own use the linear ones
        self.family = brick.router.computes
        self.own_points = type(brick.router).switch_points
        # float64 sums rounded once (BrickFFN.accumulate): the kernels are given the inputs widened to float64
        self.exact = spec.accumulate == "float64"
        self.fraction = brick.read_fraction()
        self.adaptive = spec.adaptive  # a per-token budget: routed in torch on every path
        self.kernel, self.args = None, ()
        self.router_batch = None  # the batch path's router, x [T, D] -> chosen [T, k]; None: in torch
        if not self.supported:  # the reference path: as before the table, for bricks the kernels cannot run
            return
        from brickwork.kernels import cpu

        self.weights = tuple(t.detach().numpy() for t in (brick.gate, brick.up))
        rows = cpu.pack_rows(*self.weights, brick.down_t.detach().numpy())
        s, size, e = spec.num_shared, spec.expert_size, spec.num_experts
        keep = spec.computed_neurons if spec.down_keep is None else spec.down_keep
        self.experts_args = (rows, s, size, keep)  # what _experts_token takes besides x, chosen and out
        self.down_sparse = spec.down_keep is not None
        self._transposed = None
        if not self.weighted and spec.active == e and not self.adaptive:  # nothing to choose: every expert
            self.kernel, self.args = cpu._experts_token, (rows, np.arange(e, dtype=np.int64), s, size, keep)
            return
        token, batch = (routing_for(brick.router, self.weighted, path) for path in ("token", "batch"))
        if self.adaptive:
            token = batch = TORCH
        if token is not TORCH:
            self.kernel, self.args = token(brick, self)
        if batch is not TORCH:
            self.router_batch = batch(brick, self)

    def linear_router(self, brick) -> tuple[np.ndarray, np.ndarray]:
        """The router's ``(W [E, D], b [E])`` from its :meth:`~brickwork.routing.base.Router.linear_form`, float32."""
        weight, bias = brick.router.linear_form()
        router_w = weight.detach().float().contiguous().numpy()
        e = brick.spec.num_experts
        router_b = np.zeros(e, dtype=np.float32) if bias is None else bias.detach().float().numpy()
        return router_w, router_b

    def transposed(self) -> tuple[np.ndarray, np.ndarray]:
        """gate and up ``[D, F]`` (contiguous copies), made once per plan."""
        if self._transposed is None:
            self._transposed = tuple(w.T.copy() for w in self.weights)
        return self._transposed

    def _key(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in self.tensors)

    def current(self, brick) -> bool:
        return (brick.spec is self.spec or brick.spec == self.spec) and self._key() == self.key


# Plans by brick, held here rather than on the module; a brick that is freed takes its plan with it.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan(brick) -> Plan:
    cached = _PLANS.get(brick)
    if cached is None or not cached.current(brick):
        cached = Plan(brick)
        _PLANS[brick] = cached
    return cached


def _kernel_inputs(x: torch.Tensor, p: Plan) -> np.ndarray:
    """``x`` as the kernels take it: contiguous float32, or widened to float64 for exact sums."""
    xn = x.detach().numpy()
    return xn.astype(np.float64) if p.exact else np.ascontiguousarray(xn)


def _route(brick, x: torch.Tensor, p: Plan) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]:
    """``(chosen [T, k] int64, weights or None, copy coefficients or None)`` routed as the reference path routes
    (:meth:`BrickFFN.route_tokens`); a per-token budget's cut by router mass compiled (:func:`cpu.cut_by_mass`:
    the same float64 sums in the same order as :func:`~brickwork.bricks.adaptive.kept_counts`)."""
    from brickwork.kernels import cpu

    with torch.no_grad():
        if not p.adaptive or not HAVE_NUMBA:
            selection, weights, copy = brick.route_tokens(x)
            return selection.numpy().astype(np.int64), weights, copy
        values = ranked_values(brick, brick.scores(x)).float()
        budget = brick.spec.token_budget
        cut = cpu.cut_by_mass_serial if len(values) < cpu.SERIAL_CUT_TOKENS else cpu.cut_by_mass
        chosen, dropped = cut(
            np.ascontiguousarray(values.numpy()),
            brick.spec.active,
            budget.threshold,
            budget.min_active,
            budget.zero_mass,
            not p.weighted,
        )
        weights = None
        if p.weighted:
            selection = torch.from_numpy(chosen)
            weights = kept_weights(brick, values.gather(1, selection.clamp_min(0)), selection < 0)
        return chosen, weights, copy_coefficients(budget, torch.from_numpy(dropped))


def tokens_forward(brick, x: torch.Tensor, p: Plan | None = None) -> torch.Tensor:
    """Tokens ``x [T, D]`` one at a time through the fused per-token kernel; returns ``y [T, D]``."""
    from brickwork.kernels import cpu

    p = p or plan(brick)
    xn = _kernel_inputs(x, p)
    out = np.empty(xn.shape, dtype=np.float32)
    copy = None
    if p.weighted or p.kernel is None:  # routed in torch, as the reference path routes
        chosen, weights, copy = _route(brick, x, p)
        rows, s, size, keep = p.experts_args
        if weights is None:
            for t in range(xn.shape[0]):
                cpu._experts_token(xn[t], rows, chosen[t], s, size, keep, out[t])
        else:
            weights = weights.numpy().astype(np.float32)
            for t in range(xn.shape[0]):
                cpu.weighted_experts_token(xn[t], rows, chosen[t], weights[t], s, size, keep, out[t])
    else:
        for t in range(xn.shape[0]):
            p.kernel(xn[t], *p.args, out[t])
    y = torch.from_numpy(out)
    return y if copy is None else add_copy(y, x, copy)


def batch_forward(brick, x: torch.Tensor, p: Plan | None = None) -> torch.Tensor:
    """Tokens ``x [T, D]`` together: each selected neuron's rows read once for all the tokens that selected it
    (:func:`cpu.hidden_batch`), then the down projection over each token's rows (:func:`cpu.down_batch`) or, from
    ``dense_down_min`` tokens, one dense matmul over the zero-filled h; returns ``y [T, D]``."""
    from brickwork.kernels import cpu

    p = p or plan(brick)
    xn = _kernel_inputs(x, p)
    rows, s, size, keep = p.experts_args
    size = max(size, 1)  # no routed experts: nothing is listed per expert
    weights = copy = None
    if p.weighted or p.adaptive:
        chosen, weights, copy = _route(brick, x, p)
    elif brick.spec.active == brick.spec.num_experts:  # nothing to choose
        e = brick.spec.num_experts
        chosen = np.broadcast_to(np.arange(e, dtype=np.int64), (len(xn), e))
        chosen = np.ascontiguousarray(chosen)
    elif p.router_batch is None:  # a router scored in torch, as the reference path scores it
        with torch.no_grad():
            chosen = brick.select(x).numpy().astype(np.int64)
    else:
        chosen = p.router_batch(xn)
    h = cpu.hidden_batch(xn, chosen, rows, s, size)
    if weights is not None:  # each expert's h times its weight, in float32 as the reference path multiplies
        e = brick.spec.num_experts
        scale = np.zeros((len(xn), e + 1), dtype=np.float32)  # a dropped slot (-1) lands in the last column
        np.put_along_axis(scale, np.where(chosen < 0, e, chosen), weights.numpy().astype(np.float32), axis=1)
        h[:, s:] *= np.repeat(scale[:, :e], size, axis=1)
    dense_down = not p.down_sparse and not p.exact  # a float32 matmul cannot give the exact sums
    if dense_down and len(xn) >= switch_point("dense_down_min", p.family, p.fraction, p.own_points):
        with torch.no_grad():
            y = torch.from_numpy(h) @ brick.down_t.detach()
    else:
        out = np.empty(xn.shape, dtype=np.float32)
        cpu.down_batch(h, chosen, rows, s, size, keep, out, xn)
        y = torch.from_numpy(out)
    return y if copy is None else add_copy(y, x, copy)


def grouped_forward(brick, x: torch.Tensor) -> torch.Tensor:
    """Tokens ``x [T, D]`` grouped by routed expert: one gate/up/down matmul per expert with tokens."""
    s, size, e = brick.spec.num_shared, brick.spec.expert_size, brick.spec.num_experts
    act = brick.act
    y = torch.zeros(x.shape[0], brick.d_model, dtype=x.dtype)
    if s:
        h = act(x @ brick.gate[:s].t()) * (x @ brick.up[:s].t())
        y = h @ brick.down_t[:s]
    chosen, weights, copy = _route(brick, x, plan(brick))  # [T, k] each, and the copy coefficients or None
    selection = torch.from_numpy(chosen)
    flat = selection.flatten()
    tokens = torch.arange(x.shape[0]).repeat_interleave(selection.shape[1])
    if weights is not None:
        weights = weights.flatten()
    if brick.spec.adaptive:  # the slots a per-token budget dropped (-1) run nothing
        kept = flat >= 0
        flat, tokens = flat[kept], tokens[kept]
        weights = None if weights is None else weights[kept]
    order = torch.argsort(flat, stable=True)
    if weights is not None:
        weights = weights[order]
    tokens = tokens[order]
    counts = torch.bincount(flat, minlength=e).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        rows = slice(s + expert * size, s + (expert + 1) * size)
        tok = tokens[start : start + count]
        xe = x.index_select(0, tok)
        h = act(xe @ brick.gate[rows].t()) * (xe @ brick.up[rows].t())
        if weights is not None:
            h = h * weights[start : start + count, None]
        y.index_add_(0, tok, h @ brick.down_t[rows])
        start += count
    return y if copy is None else add_copy(y, x, copy)


def fast_forward(brick, x: torch.Tensor) -> torch.Tensor | None:
    """``brick``'s output for ``x [T, D]`` on the fastest measured path, or None for the reference path (training,
    unsupported bricks)."""
    if brick.needs_grad(x):
        return None  # training: the reference path is the differentiable one
    p = plan(brick)
    if not p.supported:  # no kernel runs this brick (not CPU fp32 SwiGLU, or no numba): the reference path
        return None
    tokens = x.shape[0]
    if tokens <= switch_point("token_max", p.family, p.fraction, p.own_points):
        return tokens_forward(brick, x, p)  # numpy in, numpy out: no autograd graph whatever the grad mode
    grouped = p.spec.down_keep is None and p.spec.expert_size > 1 and not p.exact  # grouped: float32 matmuls
    if grouped and tokens >= switch_point("grouped_min", p.family, p.fraction, p.own_points):
        with torch.no_grad():
            return grouped_forward(brick, x)
    return batch_forward(brick, x, p)
