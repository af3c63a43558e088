"""BrickFFN: an FFN cut into shared and routed experts, stored contiguously in expert order."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from brickwork.bricks.adaptive import add_copy, cap_mass, route_within_cap
from brickwork.bricks.capture import balance_capture
from brickwork.bricks.combine import Combine
from brickwork.bricks.spec import BrickSpec
from brickwork.errors import BrickworkError
from brickwork.grouping.base import Grouping
from brickwork.models.specs import FFNWeights
from brickwork.routing.base import Router, topk_by_position


class BrickFFN(nn.Module):
    """Drop-in replacement of a dense FFN: ``y = FFN_shared(x) + sum of the selected experts' outputs``.

    Its shape, router kind, combine rule and accumulation are ``spec`` (a frozen
    :class:`~brickwork.bricks.spec.BrickSpec`, the description saving, loading, export and the kernels read); the
    module holds the weights and the reference maths.

    Neurons are stored in expert order (``neuron_order[j]`` is the dense index of stored neuron j): shared
    neurons first, then expert 0, expert 1, ... so each expert's gate, up and down rows are one contiguous
    block (``down_t`` is the down projection transposed, ``[F, D]``). ``combine`` (:mod:`brickwork.bricks.combine`)
    says how the selected experts' outputs are combined: summed unweighted by default, so that with every expert
    active the module computes what the dense FFN computed (up to the order of floating-point sums), or weighted
    by softmax router probabilities as stock MoE formats weight them.

    With ``down_keep`` set, only the ``down_keep`` largest |h| among the computed neurons (per token) go through
    the down projection: the exact activations pick which down rows are worth reading (TEAL's h-sparsity,
    Liu et al. 2024, applied after routing).

    With a per-token budget (``spec.token_budget``, :mod:`brickwork.bricks.adaptive`) ``active`` is a cap: each
    token keeps the first of its top ``active`` experts by router mass, and the selection's other slots hold -1.

    :meth:`forward_reference` is the reference path (it computes every expert and masks); :meth:`forward` takes
    the fastest measured path for the batch shape (:mod:`brickwork.bricks.paths`), tested against it.

    ``accumulate="float64"`` (the default for neuron-level carves): at inference every sum (router scores,
    gate/up dot products, the down projection) is accumulated in float64 from the float32 weights and inputs and
    rounded to float32 once, and the activation is evaluated in float64. The result then no longer depends on the
    order of the sums, so the kernels and the reference path give the same float32 values (they differ only when
    two float64 sums straddle a float32 rounding boundary, about once in 10^8 values). Choosing a few hundred of
    1,536 neurons by a continuous score leaves near-ties in every token, and with float32 sums a rounding-level
    difference between paths flips some of them (measured on SmolLM2: bench/results/path-agreement). Training
    (gradients on) always runs in float32.
    """

    def __init__(self, spec: BrickSpec, activation: nn.Module, router: Router):
        super().__init__()
        if router.kind != spec.router:
            raise ValueError(f"the spec says router {spec.router!r}, the router given is {router.kind!r}")
        # the shapes, rule and accumulation: read through the properties below, changed only by a new spec
        self.spec = spec
        self.act = activation
        self.router = router
        d_ff, d_model, dtype = spec.d_ff, spec.d_model, getattr(torch, spec.dtype)

        def param(*shape):
            return nn.Parameter(torch.zeros(*shape, dtype=dtype))

        self.up = param(d_ff, d_model)
        self.gate = param(d_ff, d_model) if spec.gated else None
        self.down_t = param(d_ff, d_model)
        self.up_bias = param(d_ff) if spec.up_bias else None
        self.gate_bias = param(d_ff) if spec.gate_bias else None
        self.down_bias = param(d_model) if spec.down_bias else None
        self.register_buffer("neuron_order", torch.arange(d_ff))
        # new routed bricks grown beside these (brickwork.ops.grow.GrownExperts), added to the output; None: none
        self.grown: nn.Module | None = None

    @classmethod
    def from_spec(cls, spec: BrickSpec, activation: nn.Module, router: Router) -> BrickFFN:
        """An empty brick of ``spec``'s shapes (zero weights, identity order), to copy or load weights into."""
        return cls(spec, activation, router)

    # The spec's values, read-only: a brick's shape never changes after it is built.
    d_model = property(lambda self: self.spec.d_model)
    d_ff = property(lambda self: self.spec.d_ff)
    num_shared = property(lambda self: self.spec.num_shared)
    num_experts = property(lambda self: self.spec.num_experts)
    expert_size = property(lambda self: self.spec.expert_size)
    active = property(lambda self: self.spec.active)
    down_keep = property(lambda self: self.spec.down_keep)
    # the dense FFN's d_ff when experts were pruned away (brickwork.ops.prune): no dense FFN to give back
    pruned_from = property(lambda self: self.spec.pruned_from)

    @property
    def combine(self) -> Combine:
        """How the selected experts are combined (``spec.combine``)."""
        return self.spec.combine

    @combine.setter
    def combine(self, value: Combine) -> None:
        if not isinstance(value, Combine):
            raise ValueError(f"combine must be a Combine, got {value!r}")
        if value != self.spec.combine:
            self.spec = replace(self.spec, combine=value)

    @property
    def accumulate(self) -> str:
        """How inference sums (``spec.accumulate``)."""
        return self.spec.accumulate

    @accumulate.setter
    def accumulate(self, value: str) -> None:
        if value != self.spec.accumulate:
            self.spec = replace(self.spec, accumulate=value)  # BrickSpec refuses values outside ACCUMULATE

    @staticmethod
    def dense_spec(
        weights: FFNWeights,
        grouping: Grouping,
        active: int,
        router: Router,
        down_keep: int | None = None,
        accumulate: str = "float32",
        combine: Combine | None = None,
    ) -> BrickSpec:
        """The spec of the brick :meth:`from_dense` builds from these weights, grouping and router."""
        return BrickSpec(
            d_model=weights.d_model,
            num_shared=len(grouping.shared),
            num_experts=grouping.num_experts,
            expert_size=grouping.expert_size,
            active=active,
            router=router.kind,
            router_config=router.extra_config(),
            gated=weights.gate is not None,
            up_bias=weights.up_bias is not None,
            gate_bias=weights.gate_bias is not None,
            down_bias=weights.down_bias is not None,
            down_keep=down_keep,
            accumulate=accumulate,
            combine=combine or Combine(),
            dtype=str(weights.up.dtype).removeprefix("torch."),
        )

    @classmethod
    def from_dense(
        cls,
        weights: FFNWeights,
        grouping: Grouping,
        active: int,
        activation: nn.Module,
        router: Router,
        down_keep: int | None = None,
        accumulate: str = "float32",
        spec: BrickSpec | None = None,
    ) -> BrickFFN:
        """The brick holding the dense FFN ``weights`` in ``grouping``'s order; ``spec`` (from :meth:`dense_spec`
        of the same arguments) when already made, e.g. by a carve plan."""
        grouping.validate(weights.d_ff)
        if spec is None:
            spec = cls.dense_spec(weights, grouping, active, router, down_keep, accumulate)
        brick = cls(spec, activation, router)
        order = grouping.neuron_order
        with torch.no_grad():
            brick.neuron_order.copy_(order)
            brick.up.copy_(weights.up[order])
            brick.down_t.copy_(weights.down.t()[order])
            if brick.gate is not None:
                brick.gate.copy_(weights.gate[order])
            if brick.up_bias is not None:
                brick.up_bias.copy_(weights.up_bias[order])
            if brick.gate_bias is not None:
                brick.gate_bias.copy_(weights.gate_bias[order])
            if brick.down_bias is not None:
                brick.down_bias.copy_(weights.down_bias)
        return brick

    def to_dense_weights(self) -> FFNWeights:
        """The dense FFN's weights in the original neuron order (an exact inverse of :meth:`from_dense`)."""
        if self.pruned_from is not None:
            raise BrickworkError(
                f"this brick was pruned ({self.d_ff} of the dense FFN's {self.pruned_from} neurons kept): the "
                "dense FFN cannot be rebuilt; load the carve from before pruning"
            )
        inverse = torch.argsort(self.neuron_order)

        def back(t):
            return None if t is None else t.detach()[inverse].clone()

        return FFNWeights(
            up=back(self.up),
            down=back(self.down_t).t().contiguous(),
            gate=back(self.gate),
            up_bias=back(self.up_bias),
            gate_bias=back(self.gate_bias),
            down_bias=None if self.down_bias is None else self.down_bias.detach().clone(),
        )

    @property
    def grouping(self) -> Grouping:
        order = self.neuron_order
        return Grouping(
            shared=order[: self.num_shared],
            experts=order[self.num_shared :].view(self.num_experts, self.expert_size),
        )

    @property
    def input_weights_per_neuron(self) -> int:
        return self.spec.input_weights_per_neuron

    @property
    def weights_per_neuron(self) -> int:
        return self.spec.weights_per_neuron

    def read_fraction(self) -> float:
        """FFN weights read per token (shared + selected experts + router) / dense FFN weights: with a per-token
        budget, the worst case (a token that keeps the cap); :func:`brickwork.bricks.token_budget.count_reads`
        measures the mean on given inputs."""
        return self.routed_fraction(self.active)

    def routed_fraction(self, routed: int) -> float:
        """FFN weights read by a token that runs ``routed`` routed experts (its shared neurons, their down rows
        and the router included; with a per-token budget's copy gain, one number more when it drops any) / dense
        FFN weights."""
        neurons = self.num_shared + routed * self.expert_size
        down_rows = neurons if self.down_keep is None else min(self.down_keep, neurons)
        router = (
            self.router.weights_read(self)
            if routed == self.active
            else self.router.weights_read(self, routed)
        )
        budget = self.spec.token_budget
        copy = int(routed < self.active and budget is not None and budget.copy_gain != 0)
        reads = neurons * self.input_weights_per_neuron + down_rows * self.d_model + router + copy
        return reads / (self.d_ff * self.weights_per_neuron)

    def exact(self, x: torch.Tensor) -> bool:
        """Whether this call sums in float64 and rounds once (``accumulate="float64"``, float32 inputs, and no
        gradient wanted: training stays in float32)."""
        return self.accumulate == "float64" and x.dtype == torch.float32 and not self.needs_grad(x)

    def needs_grad(self, x: torch.Tensor) -> bool:
        """Whether this call must build an autograd graph: gradients on, and ``x`` or any of the brick's weights
        (the router's included) wants one. Training takes the differentiable reference path."""
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )

    def hidden(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """h of stored neurons ``start:stop`` for inputs ``x [T, D]`` (float64 sums rounded once when
        :meth:`exact`)."""
        rows = slice(start, stop)
        exact = self.exact(x)

        def part(t):
            return None if t is None else (t[rows].double() if exact else t[rows])

        xs = x.double() if exact else x
        up = nn.functional.linear(xs, part(self.up), part(self.up_bias))
        if self.gate is None:
            h = self.act(up)
        else:
            h = self.act(nn.functional.linear(xs, part(self.gate), part(self.gate_bias))) * up
        return h.float() if exact else h

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` router scores; float64 sums rounded once for linear routers when :meth:`exact`."""
        form = self.router.linear_form() if self.exact(x) else None
        if form is None:
            return self.router(x, self)
        weight, bias = form
        scores = x.double() @ weight.double().t()
        return (scores if bias is None else scores + bias.double()).float()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(selection [T, active], weights [T, active] or None)``: the routed experts each token runs and, for a
        weighted ``combine`` rule, the weight of each (None: weight 1). With a per-token budget, the slots past
        the experts a token keeps hold -1 (weight 0)."""
        if self.spec.adaptive:
            return self.route_tokens(x)[:2]
        if not self.combine.weighted:
            return self.select(x), None
        return self.combine.route(self.scores(x), self.active)

    def route_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`route`, and each token's copy coefficient ``[T]`` (None: no copy term), by which a brick with a
        per-token budget adds ``coefficient * x`` to its output (:mod:`brickwork.bricks.adaptive`)."""
        if not self.spec.adaptive:
            return (*self.route(x), None)
        return route_within_cap(self, self.scores(x))

    def cap_mass(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(selection [T, active], mass [T, active])``: each token's top ``active`` routed experts in router order
        and their router mass, from which a per-token budget keeps the first ones (:func:`adaptive.cap_mass`)."""
        return cap_mass(self, self.scores(x))

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """[T, active] indices of the routed experts each token runs (-1: a slot a per-token budget dropped)."""
        if self.spec.adaptive:
            return self.route_tokens(x)[0]
        if (
            self.active == self.num_experts and not self.combine.weighted
        ):  # nothing to choose: skip the router (the oracle's costs a full FFN)
            return torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        if self.combine.weighted:
            return self.route(x)[0]
        if not self.exact(x):
            return self.router(x, self).topk(self.active, dim=-1, sorted=False).indices
        # Exact: float64 sums for linear routers too, and ties broken by position, as the kernels break them.
        return topk_by_position(self.scores(x), self.active)

    def balance_loss(
        self, scores: torch.Tensor, selection: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Switch Transformer's auxiliary load-balancing loss (Fedus et al. 2022) from the router's ``scores`` and the
        ``selection`` made from them, ``E * sum_e f_e P_e``: ``f_e`` the share of selections that went to expert e,
        ``P_e`` its mean router probability (:meth:`Combine.shares`). It is 1 when the load is uniform and grows as experts starve; its
        gradient reaches the router through ``P``. (DeepSeek-V3's loss-free balancing bias has no place in the stock
        formats' bias-free gates.) Returns the loss and the selections per expert ``[E]`` it counted."""
        probs = self.combine.shares(scores)
        chosen = selection[selection >= 0]  # a per-token budget's dropped slots select nothing
        counts = torch.zeros(self.num_experts, device=scores.device).index_add_(
            0, chosen, torch.ones(chosen.numel(), device=scores.device)
        )
        share = counts / counts.sum()
        return self.num_experts * (share * probs.mean(0)).sum(), counts

    use_kernels = True  # class-wide switch: False forces the reference path everywhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fastest measured path for this shape (:mod:`brickwork.bricks.paths`), else :meth:`forward_reference`."""
        if self.use_kernels:
            from brickwork.bricks.paths import fast_forward

            y = fast_forward(self, x.reshape(-1, self.d_model))
            if y is not None:
                y = y.view(*x.shape[:-1], self.d_model)
                return y if self.grown is None else y + self.grown(x)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert computed, unselected ones masked: the definition the fast paths are tested against."""
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        h, copy = self._masked_hidden(x)
        if self.exact(x):
            y = h.double() @ self.down_t.double()
            y = (y if self.down_bias is None else y + self.down_bias.double()).float()
        else:
            y = h @ self.down_t
            if self.down_bias is not None:
                y = y + self.down_bias
        if copy is not None:
            y = add_copy(y, x, copy)
        if self.grown is not None:
            y = y + self.grown(x)
        return y.view(*shape[:-1], self.d_model)

    def masked_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, F]`` h of each token in stored order, zero where the token does not read the down row (neurons
        of unselected experts, and those ``down_keep`` drops)."""
        return self._masked_hidden(x)[0]

    def _masked_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`masked_hidden`, and the per-token budget's copy coefficients (None: no copy term)."""
        s = self.num_shared
        parts = [self.hidden(x, 0, s)] if s else []
        copy = None
        if self.num_experts:
            # one column past the experts takes the slots a per-token budget dropped (-1), and is cut off
            mask = torch.zeros(x.shape[0], self.num_experts + 1, dtype=x.dtype, device=x.device)
            if not self.combine.weighted and not self.spec.adaptive:
                selection = self.select(x)
                mask.scatter_(1, selection, 1.0)
            else:  # differentiable: training reaches the router through the weights
                scores = self.scores(x)  # once, for the weights and the balance term
                if self.spec.adaptive:
                    selection, weights, copy = route_within_cap(self, scores)
                else:
                    selection, weights = self.combine.route(scores, self.active)
                index = selection.masked_fill(selection < 0, self.num_experts)
                if weights is None:
                    mask.scatter_(1, index, 1.0)
                else:
                    mask = mask.scatter(1, index, weights.to(x.dtype))
                    capture = balance_capture(self) if torch.is_grad_enabled() and self.training else None
                    if capture is not None:  # training a weighted rule (brickwork.bricks.capture)
                        capture.add(self, *self.balance_loss(scores, selection))
            mask = mask[:, : self.num_experts]
            h = (
                self.hidden(x, s, self.d_ff).view(x.shape[0], self.num_experts, self.expert_size)
                * mask[..., None]
            )
            parts.append(h.view(x.shape[0], -1))
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self.down_keep is not None:
            keep = h.abs().topk(self.down_keep, dim=1, sorted=False).indices
            h = torch.zeros_like(h).scatter_(1, keep, h.gather(1, keep))
        return h, copy

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, shared={self.num_shared}, experts={self.num_experts}x"
            f"{self.expert_size}, active={self.active}, router={self.spec.router}, down_keep={self.down_keep}, "
            f"accumulate={self.accumulate}, combine={self.combine.rule}"
            + ("" if self.spec.token_budget is None else f", token_budget={self.spec.token_budget}")
        )
