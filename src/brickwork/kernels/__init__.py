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

:data:`SWITCH_POINTS` holds, per path family and read fraction, the largest token count for which ``token`` is
used, the smallest for which ``grouped`` is, and the smallest for which ``batch`` does its down projection as
one dense matmul; they come from ``brickwork bench speed`` on the 2-core CPU (bench/results/speed-smollm2) and
can be changed with :func:`set_switch_points`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from brickwork.kernels.cpu import HAVE_NUMBA

# Per router family (``linear``: fitted/centroid and routers scored in torch; ``partial``: the neuron-level
# estimate) and FFN read fraction, the first (fraction, tokens) pair whose fraction is at least the brick's:
# ``token_max``: the per-token kernel up to this many tokens; ``grouped_min``: grouped matmuls from this many
# (expert-level carves without down-row sparsity); ``dense_down_min``: from this many tokens the batch path's
# down projection is one dense matmul (bricks without down-row sparsity). From FFN-only times per token count on
# SmolLM2 with the kernels they were set for (the "Kernel paths" table of bench/results/speed-smollm2): the
# per-token kernel leads up to 3 tokens (4 for the 50% neuron-level carve); the batch path from there; grouped
# matmuls from 128 tokens at 25% and 512 at 50%; the dense down matmul from 24 and 12 tokens.
SWITCH_POINTS = {
    "token_max": {"linear": ((1.0, 3),), "partial": ((0.3, 3), (1.0, 4))},
    "grouped_min": {"linear": ((0.3, 128), (1.0, 512)), "partial": ((1.0, 512),)},
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


def switch_point(name: str, family: str, fraction: float) -> int:
    """``SWITCH_POINTS[name]`` (``token_max``, ``grouped_min``, ``dense_down_min``) for a brick of this router
    family and reads."""
    table = SWITCH_POINTS[name]
    if isinstance(table, int):
        return table
    pairs = table.get(family, table["linear"])
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


class Plan:
    """What one brick's per-token calls need, prepared once: the packed weight rows, the kernel and its
    arguments. Per call, only a cheap staleness check.

    Decode runs the per-token kernel once per layer and token, so the Python around it (module attribute
    look-ups, re-checking the brick, tensor wrapping) costs as much as the kernel unless it is precomputed. The
    plan keeps the Parameter objects themselves and compares their storage pointer and version counter on every
    call: an in-place change, ``param.data = ...``, ``.to()`` or a change of the brick's ``combine`` rule or
    ``accumulate`` makes it stale and it is rebuilt.

    Linear routers (``fitted``, ``centroid``) and the ``partial`` router run inside the one compiled call
    (``kernel``); other routers and weighted combine rules (``kernel`` None) route in torch first
    (:meth:`BrickFFN.route`), then :func:`cpu._experts_token` or :func:`cpu.weighted_experts_token`.
    """

    def __init__(self, brick):
        tensors = (brick.gate, brick.up, brick.down_t, *brick.router.parameters())
        self.tensors = [t for t in tensors if t is not None]
        self.key = self._key()
        self.combine = brick.combine
        self.weighted = brick.combine.weighted
        self.accumulate = brick.accumulate
        self.supported = supports_fast_path(brick)
        self.family = "partial" if brick.router.kind == "partial" else "linear"
        # float64 sums rounded once (BrickFFN.accumulate): the kernels are given the inputs widened to float64
        self.exact = self.accumulate == "float64"
        self.fraction = brick.active_fraction()
        self.kernel, self.args = None, ()
        # The batch path's router; None: brick.select in torch.
        self.router_batch, self.router_args = None, ()
        if not self.supported:
            return
        from brickwork.kernels import cpu

        gate, up, down_t = (t.detach().numpy() for t in (brick.gate, brick.up, brick.down_t))
        rows = cpu.pack_rows(gate, up, down_t)
        s, size, e = brick.num_shared, brick.expert_size, brick.num_experts
        computed = s + brick.active * size
        keep = computed if brick.down_keep is None else min(brick.down_keep, computed)
        self.experts_args = (rows, s, size, keep)  # what _experts_token takes besides x, chosen and out
        self.down_sparse = brick.down_keep is not None
        form = brick.router.linear_form() if e else None
        if self.weighted:  # routed and weighted in torch (BrickFFN.route), as the reference path routes
            return
        if e == 0 or brick.active == e:
            self.kernel, self.args = cpu._experts_token, (rows, np.arange(e, dtype=np.int64), s, size, keep)
        elif form is not None:
            weight, bias = form
            router_w = weight.detach().float().contiguous().numpy()
            router_b = np.zeros(e, dtype=np.float32) if bias is None else bias.detach().float().numpy()
            self.kernel = cpu.linear_router_token
            self.args = (router_w, router_b, brick.active, rows, s, size, keep)
            self.router_batch, self.router_args = cpu.linear_router_batch, (router_w, router_b, brick.active)
        elif brick.router.kind == "partial":
            input_keep = max(1, math.ceil(brick.router.input_fraction * brick.d_model))
            gate_t, up_t = gate.T.copy(), up.T.copy()
            self.kernel = cpu.partial_router_token
            self.args = (input_keep, gate_t, up_t, brick.active, rows, s, size, keep)
            self.router_batch = cpu.partial_router_batch
            self.router_args = (input_keep, gate_t, up_t, brick.active, s, size)

    def _key(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in self.tensors)

    def current(self, brick) -> bool:
        return (
            brick.combine == self.combine and brick.accumulate == self.accumulate and self._key() == self.key
        )


def plan(brick) -> Plan:
    cached = brick.__dict__.get("_plan")
    if cached is None or not cached.current(brick):
        cached = Plan(brick)
        brick.__dict__["_plan"] = cached
    return cached


def _kernel_inputs(x: torch.Tensor, p: Plan) -> np.ndarray:
    """``x`` as the kernels take it: contiguous float32, or widened to float64 for exact sums."""
    xn = x.detach().numpy()
    return xn.astype(np.float64) if p.exact else np.ascontiguousarray(xn)


def tokens_forward(brick, x: torch.Tensor, p: Plan | None = None) -> torch.Tensor:
    """Tokens ``x [T, D]`` one at a time through the fused per-token kernel; returns ``y [T, D]``."""
    from brickwork.kernels import cpu

    p = p or plan(brick)
    xn = _kernel_inputs(x, p)
    out = np.empty(xn.shape, dtype=np.float32)
    if p.weighted:
        with torch.no_grad():
            chosen, weights = brick.route(x)
        chosen, weights = chosen.numpy().astype(np.int64), weights.numpy().astype(np.float32)
        rows, s, size, keep = p.experts_args
        for t in range(xn.shape[0]):
            cpu.weighted_experts_token(xn[t], rows, chosen[t], weights[t], s, size, keep, out[t])
    elif p.kernel is None:  # a router scored in torch, as the reference path scores it
        with torch.no_grad():
            chosen = brick.select(x).numpy().astype(np.int64)
        for t in range(xn.shape[0]):
            cpu._experts_token(xn[t], p.experts_args[0], chosen[t], *p.experts_args[1:], out[t])
    else:
        for t in range(xn.shape[0]):
            p.kernel(xn[t], *p.args, out[t])
    return torch.from_numpy(out)


def batch_forward(brick, x: torch.Tensor, p: Plan | None = None) -> torch.Tensor:
    """Tokens ``x [T, D]`` together: each selected neuron's rows read once for all the tokens that selected it
    (:func:`cpu.hidden_batch`), then the down projection over each token's rows (:func:`cpu.down_batch`) or, from
    ``dense_down_min`` tokens, one dense matmul over the zero-filled h; returns ``y [T, D]``."""
    from brickwork.kernels import cpu

    p = p or plan(brick)
    xn = _kernel_inputs(x, p)
    rows, s, size, keep = p.experts_args
    size = max(size, 1)  # no routed experts: nothing is listed per expert
    weights = None
    if p.weighted:
        with torch.no_grad():
            selection, weights = brick.route(x)
        chosen = selection.numpy().astype(np.int64)
    elif brick.num_experts == 0 or brick.active == brick.num_experts:
        chosen = np.broadcast_to(np.arange(brick.num_experts, dtype=np.int64), (len(xn), brick.num_experts))
        chosen = np.ascontiguousarray(chosen)
    elif p.router_batch is None:  # a router scored in torch, as the reference path scores it
        with torch.no_grad():
            chosen = brick.select(x).numpy().astype(np.int64)
    elif p.family == "partial":
        chosen = p.router_batch(xn, *p.router_args, cpu.numba.get_num_threads())
    else:
        chosen = p.router_batch(xn, *p.router_args)
    h = cpu.hidden_batch(xn, chosen, rows, s, size)
    if weights is not None:  # each expert's h times its weight, in float32 as the reference path multiplies
        scale = np.zeros((len(xn), brick.num_experts), dtype=np.float32)
        np.put_along_axis(scale, chosen, weights.numpy().astype(np.float32), axis=1)
        h[:, s:] *= np.repeat(scale, size, axis=1)
    dense_down = not p.down_sparse and not p.exact  # a float32 matmul cannot give the exact sums
    if dense_down and len(xn) >= switch_point("dense_down_min", p.family, p.fraction):
        with torch.no_grad():
            return torch.from_numpy(h) @ brick.down_t.detach()
    out = np.empty(xn.shape, dtype=np.float32)
    cpu.down_batch(h, chosen, rows, s, size, keep, out, xn)
    return torch.from_numpy(out)


def grouped_forward(brick, x: torch.Tensor) -> torch.Tensor:
    """Tokens ``x [T, D]`` grouped by routed expert: one gate/up/down matmul per expert with tokens."""
    s, size, e = brick.num_shared, brick.expert_size, brick.num_experts
    act = brick.act
    y = torch.zeros(x.shape[0], brick.d_model, dtype=x.dtype)
    if s:
        h = act(x @ brick.gate[:s].t()) * (x @ brick.up[:s].t())
        y = h @ brick.down_t[:s]
    selection, weights = brick.route(x)  # [T, k] each
    flat = selection.flatten()
    order = torch.argsort(flat, stable=True)
    if weights is not None:
        weights = weights.flatten()[order]
    tokens = torch.arange(x.shape[0]).repeat_interleave(selection.shape[1])[order]
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
    return y


def fast_forward(brick, x: torch.Tensor) -> torch.Tensor | None:
    """``brick``'s output for ``x [T, D]`` on the fastest measured path, or None for the reference path (training,
    unsupported bricks)."""
    if torch.is_grad_enabled() and (x.requires_grad or brick.up.requires_grad):
        return None  # training: the reference path is the differentiable one
    p = plan(brick)
    if not p.supported:
        return None
    tokens = x.shape[0]
    if tokens <= switch_point("token_max", p.family, p.fraction):
        return tokens_forward(brick, x, p)  # numpy in, numpy out: no autograd graph whatever the grad mode
    grouped = brick.down_keep is None and brick.expert_size > 1 and not p.exact  # grouped: float32 matmuls
    if grouped and tokens >= switch_point("grouped_min", p.family, p.fraction):
        with torch.no_grad():
            return grouped_forward(brick, x)
    return batch_forward(brick, x, p)
