"""Prune a carved model for a domain: keep, per layer, only the routed experts the domain's text selects.

Configurable Foundation Models (Xiao et al. 2024) name pruning as one of the operations bricks allow: a model
meant for one domain needs only the bricks that domain's tokens route to. From :func:`brickwork.ops.usage.
expert_usage` on the domain's text, each carved layer keeps the fewest routed experts that make up ``coverage``
of its selections (at ``coverage=1``: every expert selected at least once), never fewer than ``min_experts``
(default: the brick's ``active``; the most used experts fill up), and its BrickFFN is replaced by a smaller one
holding the shared neurons and the kept experts, in their original relative order, with the router's per-expert
parameters sliced to match.

Exactness: at ``coverage=1`` every expert a token of the measured text selected is kept, so those tokens select
the same experts among the kept ones (ties broken by the same relative position). Whether their outputs stay the
same depends on how the combine rule (:mod:`brickwork.bricks.combine`) weighs the selected experts:

- ``sum`` (weight 1) and ``sigmoid`` (each expert's weight is its own sigmoid): independent of the other experts'
  scores, so the output is unchanged: bit for bit with ``accumulate="float64"`` (every sum rounded once), up to
  float32 rounding with float32 sums (a matmul over fewer rows may sum in another order; measured on the tiny
  test models: a few units in the last place of the logits);
- ``softmax_topk`` (renormalised over the selected experts): the same in exact arithmetic, up to rounding in
  float32 (the softmax's denominator runs over fewer experts before renormalisation);
- ``softmax`` (no renormalisation): the weights change, because the pruned experts leave the softmax's
  denominator; the report says so for each such layer.

A pruned brick has fewer neurons than the dense FFN it was carved from: its ``neuron_order`` holds the dense
indices of the neurons it kept, ``pruned_from`` the dense FFN's d_ff, and it can no longer be uncarved (the pruned
neurons' weights are gone). Budgets (:func:`brickwork.set_budget`) are fractions of the pruned FFN.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from brickwork.bricks.module import BrickFFN
from brickwork.bricks.state import carve_state, carved_layers, refuse_grown
from brickwork.errors import BrickworkError
from brickwork.models.specs import find_ffns
from brickwork.ops.usage import ExpertUsage
from brickwork.routing import ROUTERS

# What pruning does to each combine rule's outputs on the measured text at coverage 1 (see the module docstring).
RULE_EXACTNESS = {
    "sum": "unchanged",
    "sigmoid": "unchanged",
    "softmax_topk": "unchanged up to rounding (renormalised over the selected experts)",
    "softmax": "changed: softmax weights over all experts lose the pruned experts' share of the denominator",
}


@dataclass
class LayerPrune:
    """One carved layer: routed experts and FFN parameters (shared and routed neurons, biases, router) before and
    after, the kept experts (indices before pruning, in order), and ``active`` before and after."""

    layer: int
    experts_before: int
    experts_after: int
    kept: list[int]
    active_before: int
    active_after: int
    params_before: int
    params_after: int
    combine: str

    @property
    def pruned(self) -> bool:
        return self.experts_after < self.experts_before


@dataclass
class PruneReport:
    """What :func:`prune_for_domain_` did. ``ffn_params_*``: every FFN of the model (layers left dense count their
    dense weights); ``notes``: what changes beyond the removed experts (weights of a ``softmax`` rule, a lowered
    ``active``)."""

    coverage: float
    source: str
    tokens: int
    layers: list[LayerPrune]
    ffn_params_before: int
    ffn_params_after: int
    notes: list[str] = field(default_factory=list)

    @property
    def reduction(self) -> float:
        """The share of the model's FFN parameters pruning removed."""
        return 1.0 - self.ffn_params_after / max(self.ffn_params_before, 1)

    def to_dict(self) -> dict:
        return {
            "coverage": self.coverage,
            "source": self.source,
            "tokens": self.tokens,
            "ffn_params_before": self.ffn_params_before,
            "ffn_params_after": self.ffn_params_after,
            "reduction": self.reduction,
            "layers": [vars(layer) for layer in self.layers],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """Per layer, experts and FFN parameters before and after; then the model-wide reduction."""
        lines = [
            f"layer {p.layer:>3}: experts {p.experts_before:>4} -> {p.experts_after:<4} active {p.active_before}"
            f"{'' if p.active_after == p.active_before else f' -> {p.active_after}'}  FFN parameters "
            f"{p.params_before:,} -> {p.params_after:,}"
            for p in self.layers
        ]
        lines.append(
            f"FFN parameters {self.ffn_params_before:,} -> {self.ffn_params_after:,} "
            f"({self.reduction:.1%} fewer), kept the experts covering {self.coverage:g} of the selections on "
            f"{self.source} ({self.tokens} tokens)"
        )
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def brick_params(brick: nn.Module) -> int:
    """A brick's FFN parameters: shared and routed neurons' weights and biases, and the router's."""
    return sum(p.numel() for p in brick.parameters())


def _ffn_params(model) -> int:
    """Every FFN's parameters: bricks as :func:`brick_params` counts them, dense FFNs their weights."""
    bricks = carved_layers(model)
    refuse_grown(bricks, "pruning")
    total = sum(brick_params(b) for b in bricks.values())
    for ffn in find_ffns(model):
        if ffn.index not in bricks:
            w = ffn.read()
            total += sum(
                t.numel()
                for t in (w.up, w.gate, w.down, w.up_bias, w.gate_bias, w.down_bias)
                if t is not None
            )
    return total


def kept_experts(usage: ExpertUsage, layer: int, coverage: float, least: int) -> torch.Tensor:
    """The experts layer ``layer`` keeps, ascending: those covering ``coverage`` of its selections, filled up with
    the most used others (ties: the lower index) to at least ``least``."""
    ranked = torch.sort(usage.counts[layer], descending=True, stable=True).indices
    chosen = usage.covering(layer, coverage).tolist()
    for expert in ranked.tolist():
        if len(chosen) >= least:
            break
        if expert not in chosen:
            chosen.append(expert)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def _stored_rows(brick: BrickFFN, experts: torch.Tensor) -> torch.Tensor:
    """Stored rows of the routed neurons of ``experts`` (relative to the first routed row), in order."""
    size = brick.expert_size
    return (experts[:, None] * size + torch.arange(size)).flatten()


def prune_router(router: nn.Module, brick: BrickFFN, experts: torch.Tensor) -> nn.Module:
    """A copy of ``brick``'s router scoring only ``experts``, each parameter sliced as the router's
    ``param_layout`` says; BrickworkError for a router that declares none (or not for every parameter)."""
    rows = type(router).param_layout
    names = dict(router.named_parameters(recurse=False))
    if rows is None or set(names) - set(rows) or any(True for _ in router.children()):
        prunable = ", ".join(k for k, cls in sorted(ROUTERS.items()) if cls.param_layout is not None)
        raise BrickworkError(
            f"the {router.kind!r} router cannot be pruned: pruning slices each expert's router parameters as "
            f"the router's param_layout says, and it declares none for {sorted(set(names) - set(rows or {})) or 'it'}"
            f"; carve with a router that does ({prunable}; --router)"
        )
    index = {"expert": experts, "neuron": _stored_rows(brick, experts)}
    pruned = copy.deepcopy(router)
    for name, param in names.items():
        if rows[name] != "whole":
            value = param.detach()[index[rows[name]].to(param.device)].clone()
            setattr(pruned, name, nn.Parameter(value, requires_grad=param.requires_grad))
    return pruned


@torch.no_grad()
def prune_brick(brick: BrickFFN, experts: torch.Tensor) -> BrickFFN:
    """A new BrickFFN of ``brick``'s shared neurons and the routed ``experts`` (ascending indices), ``active``
    lowered to their number where it was above it; the carved settings (budget.calibrated) follow."""
    kept = len(experts)
    if kept < 1 or len(set(experts.tolist())) != kept or not bool((experts.diff() > 0).all()):
        raise BrickworkError(f"experts to keep must be distinct and ascending, got {experts.tolist()}")
    if int(experts[-1]) >= brick.num_experts:
        raise BrickworkError(f"expert {int(experts[-1])} is not one of the brick's {brick.num_experts}")
    spec = brick.spec
    active = min(spec.active, kept)
    budget = spec.token_budget
    if budget is not None and budget.min_active > active:
        budget = replace(budget, min_active=active)
    carved = spec.carved_settings
    new_spec = replace(
        spec,
        num_experts=kept,
        active=active,
        token_budget=budget,
        carved=replace(carved, active=min(carved.active, kept)),
        pruned_from=spec.pruned_from if spec.pruned_from is not None else spec.d_ff,
    )
    router = prune_router(brick.router, brick, experts)
    new = BrickFFN(new_spec, brick.act, router)
    s = brick.num_shared
    rows = torch.cat([torch.arange(s), s + _stored_rows(brick, experts)]).to(brick.up.device)
    for name in ("up", "gate", "down_t", "up_bias", "gate_bias"):
        param = getattr(brick, name)
        if param is not None:
            setattr(new, name, nn.Parameter(param.detach()[rows].clone(), requires_grad=param.requires_grad))
    if brick.down_bias is not None:
        new.down_bias = nn.Parameter(
            brick.down_bias.detach().clone(), requires_grad=brick.down_bias.requires_grad
        )
    new.neuron_order = brick.neuron_order[rows].clone()
    new.train(brick.training)
    return new


@torch.no_grad()
def check_min_experts(model, min_experts: int | None) -> dict:
    """The model's carved layers, after refusing a ``min_experts`` above a layer's routed experts (a prune cannot
    keep more experts than there are); a BrickworkError before any usage is measured."""
    bricks = carved_layers(model)
    if not bricks:
        raise BrickworkError("the model has no carved layer: carve it first (brickwork carve)")
    fewest = min(brick.num_experts for brick in bricks.values())
    if min_experts is not None and min_experts > fewest:
        raise BrickworkError(
            f"min_experts {min_experts} is more than the {fewest} routed experts a carved layer has; give at most "
            f"{fewest}"
        )
    return bricks


# prune_for_domain_'s options as ``brickwork prune`` shows them (the defaults are the signature's).
PRUNE_HELP = {
    "coverage": {
        "help": "keep the experts making up this share of each layer's selections",
        "default_text": "1: every expert selected",
    },
    "min_experts": {"help": "experts each layer keeps at least", "default_text": "its top-k"},
}


def prune_for_domain_(
    model, usage: ExpertUsage, coverage: float = 1.0, min_experts: int | None = None
) -> PruneReport:
    """Prune ``model``'s carved layers in place to the routed experts ``usage`` (:func:`brickwork.ops.usage.
    expert_usage` of this model on the domain's text) shows the domain using (see the module docstring).

    ``coverage`` in (0, 1]: each layer keeps the fewest experts making up that share of its selections (1: every
    expert selected at least once); ``min_experts``: the fewest a layer keeps (default: its ``active``; below it,
    ``active`` is lowered to what is kept). Returns a :class:`PruneReport`.
    """
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
        raise ValueError(f"coverage must be a share of the selections in (0, 1], got {coverage!r}")
    if min_experts is not None and (
        isinstance(min_experts, bool) or not isinstance(min_experts, int) or min_experts < 1
    ):
        raise ValueError(
            f"min_experts must be an integer >= 1 (or None: each layer's active), got {min_experts!r}"
        )
    bricks = check_min_experts(model, min_experts)
    if set(usage.counts) != set(bricks):
        raise BrickworkError(
            f"the usage counts layers {sorted(usage.counts)}, the model's carved layers are {sorted(bricks)}: "
            "measure expert_usage on this model"
        )
    for index, brick in bricks.items():
        if len(usage.counts[index]) != brick.num_experts:
            raise BrickworkError(
                f"layer {index}: the usage counts {len(usage.counts[index])} experts, the brick has "
                f"{brick.num_experts}: measure expert_usage on this model"
            )
        if type(brick.router).param_layout is None:
            prune_router(brick.router, brick, torch.arange(brick.num_experts))  # raises its clear error
    before = _ffn_params(model)
    plans = {
        index: kept_experts(usage, index, coverage, min(brick.num_experts, min_experts or brick.active))
        for index, brick in bricks.items()
    }
    new = {i: prune_brick(bricks[i], plans[i]) for i in bricks if len(plans[i]) < bricks[i].num_experts}
    state = carve_state(model)
    for index, brick in new.items():  # swapped only once every layer is built
        state.layers[index].put(brick)
    layers, notes = [], []
    for index, brick in sorted(bricks.items()):
        after = new.get(index, brick)
        layers.append(
            LayerPrune(
                layer=index,
                experts_before=brick.num_experts,
                experts_after=after.num_experts,
                kept=plans[index].tolist(),
                active_before=brick.active,
                active_after=after.active,
                params_before=brick_params(brick),
                params_after=brick_params(after),
                combine=brick.combine.rule,
            )
        )
    pruned = [p for p in layers if p.pruned]
    for rule in ("softmax_topk", "softmax"):
        affected = [p.layer for p in pruned if p.combine == rule]
        if affected:
            notes.append(f"layers {affected} combine by {rule}: outputs {RULE_EXACTNESS[rule]}")
    float32 = [p.layer for p in pruned if bricks[p.layer].accumulate == "float32"]
    if float32:
        notes.append(
            f"layers {float32} sum in float32: outputs equal up to float32 rounding (a sum over fewer rows may "
            "round differently); carve with accumulate='float64' for bit-for-bit outputs"
        )
    lowered = [p.layer for p in pruned if p.active_after < p.active_before]
    if lowered:
        notes.append(f"layers {lowered} kept fewer experts than their active: active lowered, outputs change")
    if coverage < 1:
        notes.append(f"coverage {coverage:g} < 1: tokens that selected a pruned expert now select another")
    return PruneReport(
        coverage=float(coverage),
        source=usage.source,
        tokens=usage.tokens,
        layers=layers,
        ffn_params_before=before,
        ffn_params_after=_ffn_params(model),
        notes=notes,
    )
