"""carve_ and uncarve_: swap a model's dense FFNs for BrickFFNs in place, and back.

Plan first, then execute: :func:`plan_carve` profiles the calibration text once (statistics plus a sample of
FFN inputs and activations) and builds each layer's grouping, router and brick spec into a :class:`CarvePlan`
without changing the model; :func:`execute_plan` builds the bricks and only then swaps modules. :func:`carve_`
does both.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from brickwork.bricks.combine import fit_combine
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.spec import BrickSpec
from brickwork.bricks.state import _swap_in, _weights_per_neuron, carve_state, carved_layers, model_reads
from brickwork.carving.config import CarveConfig
from brickwork.data.sources import describe_source
from brickwork.errors import BrickworkError
from brickwork.grouping import GROUPING_METHODS, GroupingInputs
from brickwork.grouping.base import Grouping
from brickwork.models.specs import FFN, FFNWeights, find_ffns
from brickwork.profiling.profile import Profile, ProfileConfig, TokenSampler, profile
from brickwork.routing import ROUTERS, Router, RouterInputs
from brickwork.routing.base import topk_by_position

logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """One calibration pass: the profile, and (x, h) samples per layer for fitting routers."""

    profile: Profile
    sampler: TokenSampler | None  # None when no (x, h) pairs were kept
    source: str


def calibrate(
    model: nn.Module,
    tokenizer,
    calib: str | Path,
    config: CarveConfig,
    progress: bool = True,
    samples: bool = True,
) -> Calibration:
    """Profile ``config.calib_tokens`` of ``calib`` and, with ``samples``, keep ``config.router_samples`` (x, h)
    pairs per layer for routers that fit on them (memory: router_samples x (D + F) x 4 bytes per layer).

    Pass the result to several :func:`carve_` calls to carve the same model many ways from one pass.
    """
    prof_config, sampler = calibration_settings(config, samples)
    prof = profile(model, tokenizer, calib, prof_config, progress=progress, sampler=sampler)
    return Calibration(profile=prof, sampler=sampler, source=describe_source(calib))


def calibration_settings(config: CarveConfig, samples: bool) -> tuple[ProfileConfig, TokenSampler | None]:
    """The profile settings and (with ``samples``) the empty (x, h) sampler of :func:`calibrate` for ``config``."""
    tokens = (config.calib_tokens // config.window) * config.window
    sampler = None
    if samples:
        sampler = TokenSampler(stride=max(1, tokens // config.router_samples), limit=config.router_samples)
    return ProfileConfig(tokens=tokens, window=config.window, seed=config.seed), sampler


@dataclass
class CarveReport:
    """What carving did: per layer, the shapes and the fraction of FFN weights read per token."""

    config: CarveConfig
    layers: list[int]
    reads: (
        float  # FFN weights read per token / dense, over every FFN (layers left dense at 1), router included
    )
    layer_fractions: list[float]
    seconds: float
    calibration: str | None
    # weighted combine rules: per carved layer, fit_combine's figures (temperature, scale, relative errors)
    combine_fits: dict[int, dict] | None = None


def plan_layers(model: nn.Module, config: CarveConfig) -> list[FFN]:
    """The FFNs ``config`` carves, after checking that it fits each of them."""
    ffns = find_ffns(model)
    if carved_layers(model):
        raise BrickworkError("this model is already carved; uncarve_ it first or load the dense parent")
    indices = range(len(ffns)) if config.layers is None else config.layers
    if max(indices) >= len(ffns):
        raise ValueError(f"layers must be in [0, {len(ffns) - 1}], got {max(indices)}")
    chosen = [ffns[i] for i in indices]
    for ffn in chosen:
        if ffn.d_ff % config.experts:
            divisors = [d for d in range(1, min(ffn.d_ff, 4096) + 1) if ffn.d_ff % d == 0]
            raise ValueError(
                f"layer {ffn.index}: d_ff = {ffn.d_ff} is not divisible by experts = {config.experts}; "
                f"choose one of {divisors[-12:]} (or any divisor of {ffn.d_ff})"
            )
    return chosen


@dataclass(frozen=True)
class LayerPlan:
    """What carving does to one FFN: its brick's spec, the grouping (``grouping.neuron_order``: the dense
    neurons in stored order) and the built router; ``combine_fit``: :func:`fit_combine`'s figures for a weighted
    rule, else None."""

    ffn: FFN
    spec: BrickSpec
    grouping: Grouping
    router: Router
    combine_fit: dict | None = None

    @property
    def index(self) -> int:
        return self.ffn.index


@dataclass
class CarvePlan:
    """Every carved layer's plan, made from the calibration before any weight changes (:func:`plan_carve`);
    :func:`execute_plan` applies it."""

    config: CarveConfig
    layers: list[LayerPlan]
    calibration: Calibration
    # With layer_budgets="sensitivity": the calibration text and tokenizer allocate_budgets measures on, after the
    # bricks are built (the per-layer budgets depend on the carved model's losses, so they are a step of the plan,
    # not figures in it).
    calib: str | Path | None = None
    tokenizer: object = None

    def summary(self) -> str:
        """A line per carved layer: its spec, and the fitted rule's figures; then the per-layer budget step, when
        the config asks for one."""
        lines = [
            f"carve plan: {len(self.layers)} layers, method {self.config.method}, router {self.config.router}, "
            f"calibration {self.calibration.source} ({self.calibration.profile.tokens} tokens)"
        ]
        for layer in self.layers:
            fit = layer.combine_fit
            extra = ""
            if fit is not None:
                extra = f"; fitted temperature {fit['temperature']:g}, error {fit['relative_error']:.3g}"
            lines.append(f"  layer {layer.index}: {layer.spec.describe()}{extra}")
        if self.config.layer_budgets == "sensitivity":
            lines.append(
                f"  then per-layer budgets by sensitivity (allocate_budgets, step {self.config.layer_step:g}): "
                "reads move between layers at the same average, measured on the calibration text"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _cpu_weights(weights: FFNWeights) -> FFNWeights:
    return FFNWeights(**{k: None if v is None else v.cpu() for k, v in vars(weights).items()})


@torch.no_grad()
def plan_carve(
    model: nn.Module,
    config: CarveConfig,
    calib: str | Path | None = None,
    tokenizer=None,
    calibration: Calibration | None = None,
    progress: bool = True,
) -> CarvePlan:
    """Plan :func:`carve_` (same arguments): each layer's grouping, router and brick spec, with the weighted rule
    fitted, from one calibration pass. The model's weights are not changed; inspect the plan (``print(plan)``),
    then :func:`execute_plan` it."""
    ffns = plan_layers(model, config)
    if calibration is None:
        if calib is None or tokenizer is None:
            raise BrickworkError(
                "carve_ needs calibration text and a tokenizer: carve_(model, config, "
                "calib=..., tokenizer=...)"
            )
        needs_samples = ROUTERS[config.router].needs_samples or config.combine != "sum"
        calibration = calibrate(model, tokenizer, calib, config, progress=progress, samples=needs_samples)
    if config.layer_budgets != "uniform" and (calib is None or tokenizer is None):
        raise BrickworkError(
            "layer_budgets='sensitivity' measures each layer's loss on the calibration text: pass calib= and "
            "tokenizer="
        )
    prof, sampler = calibration.profile, calibration.sampler
    if config.combine != "sum" and sampler is None:
        raise BrickworkError(
            f"combine={config.combine} is fitted on calibration samples: calibrate(..., samples=True)"
        )
    layers = [
        plan_layer(ffn, config, prof.layers[ffn.index], prof.coactivation(ffn.index), sampler)
        for ffn in tqdm(ffns, desc="carving", unit="layer", disable=not progress)
    ]
    return CarvePlan(config, layers, calibration, calib, tokenizer)


def plan_layer(
    ffn: FFN,
    config: CarveConfig,
    stats: dict[str, torch.Tensor],
    coactivation: torch.Tensor | None,
    sampler: TokenSampler | None,
) -> LayerPlan:
    """One layer of :func:`plan_carve`: its grouping, router and brick spec (the weighted rule fitted), from the
    layer's profile ``stats`` and ``coactivation`` and the ``sampler``'s (x, h) pairs. The seed is
    ``config.seed`` and the layer index, so a layer plans the same alone (:mod:`brickwork.carving.sequential`)."""
    # Grouping and router fits run on the CPU whatever the model's device (the calibration statistics and
    # samples live there too), so a carve does not depend on where the model sits.
    weights = _cpu_weights(ffn.read())
    expert_size = ffn.d_ff // config.experts
    generator = torch.Generator().manual_seed(config.seed * 100_003 + ffn.index)
    grouping = GROUPING_METHODS[config.method](
        GroupingInputs(
            weights=weights,
            stats=stats,
            coactivation=coactivation,
            num_shared=config.shared * expert_size,
            num_experts=config.experts - config.shared,
            expert_size=expert_size,
            generator=generator,
        )
    )
    grouping.validate(ffn.d_ff)
    x, h = sampler.samples(ffn.index) if sampler is not None else (None, None)
    router = ROUTERS[config.router].build(
        RouterInputs(
            weights=weights,
            grouping=grouping,
            stats=stats,
            coactivation=coactivation,
            inputs=x,
            hidden=h,
            active=config.active,
        ),
        **config.router_options,
    )
    down_keep = None if config.down_fraction is None else max(1, round(config.down_fraction * ffn.d_ff))
    spec = BrickFFN.dense_spec(
        weights, grouping, config.active, router, down_keep, config.resolved_accumulate()
    )
    fit = None
    if config.combine != "sum":  # fitted on a brick of this spec; the plan keeps the rule, not the brick
        brick = BrickFFN.from_dense(weights, grouping, spec.active, ffn.activation, router, spec=spec)
        ks = sorted({spec.active} | {_top_k_within(brick, budget) for budget in config.combine_budgets})
        fits = _fit_combines(brick, config.combine, x, ks)
        combine, fit = fits[spec.active]
        others = tuple((k, c) for k, (c, _) in fits.items()) if config.combine_budgets else ()
        spec = replace(spec, combine=combine, combine_fits=others)
    return LayerPlan(ffn, spec, grouping, router, fit)


def carve_layer(
    ffn: FFN,
    config: CarveConfig,
    stats: dict[str, torch.Tensor],
    coactivation: torch.Tensor | None,
    sampler: TokenSampler | None,
) -> tuple[BrickFFN, dict | None]:
    """One layer planned (:func:`plan_layer`) and built: the BrickFFN (on the CPU) and, with a weighted combine
    rule, the fit's figures; what :func:`carve_` gives that layer."""
    layer = plan_layer(ffn, config, stats, coactivation, sampler)
    brick = BrickFFN.from_dense(
        _cpu_weights(ffn.read()),
        layer.grouping,
        layer.spec.active,
        ffn.activation,
        layer.router,
        spec=layer.spec,
    )
    return brick, layer.combine_fit


@torch.no_grad()
def execute_plan(
    model: nn.Module, plan: CarvePlan, started: float | None = None, progress: bool = True
) -> CarveReport:
    """Carve ``model`` in place as ``plan`` (from :func:`plan_carve` of this model) says, per-layer budgets
    included; return the report (``started``: the ``time.perf_counter()`` its seconds count from, by default
    now)."""
    started = time.perf_counter() if started is None else started
    if carved_layers(model):
        raise BrickworkError("this model is already carved; uncarve_ it first or load the dense parent")
    ffns = find_ffns(model)
    for layer in plan.layers:
        if layer.index >= len(ffns) or ffns[layer.index].block is not layer.ffn.block:
            raise BrickworkError("this carve plan was made for another model: plan_carve this one")
    bricks = []
    for layer in plan.layers:
        ffn, spec = layer.ffn, layer.spec
        weights = ffn.read()
        device = weights.up.device
        router = copy.deepcopy(layer.router)  # the plan keeps its own: it may be executed again
        brick = BrickFFN.from_dense(
            _cpu_weights(weights), layer.grouping, spec.active, ffn.activation, router, spec=spec
        )
        bricks.append((ffn, brick.to(device)))
    # Weights per token of every FFN of the model, before swapping: carved ones at their fraction, the rest dense.
    dense_sizes = {ffn.index: ffn.d_ff * _weights_per_neuron(ffn) for ffn in ffns}
    for ffn, brick in bricks:  # swap only once every brick is built: a failure leaves the model untouched
        _swap_in(model, ffn, brick)

    fits = {layer.index: layer.combine_fit for layer in plan.layers if layer.combine_fit is not None}
    fractions = {ffn.index: brick.read_fraction() for ffn, brick in bricks}
    overall = sum(size * fractions.get(i, 1.0) for i, size in dense_sizes.items()) / sum(dense_sizes.values())
    report = CarveReport(
        config=plan.config,
        layers=list(fractions),
        reads=overall,
        layer_fractions=list(fractions.values()),
        seconds=time.perf_counter() - started,
        calibration=plan.calibration.source,
        combine_fits=fits or None,
    )
    state = carve_state(model, create=True)
    state.config = plan.config.to_dict()
    state.calibration = report.calibration
    state.calibration_tokens = plan.calibration.profile.tokens
    if plan.config.layer_budgets == "sensitivity":
        from brickwork.bricks.budget import allocate_budgets

        mean = sum(report.layer_fractions) / len(report.layer_fractions)
        allocate_budgets(
            model, plan.tokenizer, plan.calib, mean, step=plan.config.layer_step, progress=progress
        )
        bricks = carved_layers(model)
        report.layer_fractions = [bricks[i].read_fraction() for i in report.layers]
        report.reads = model_reads(model)
        report.seconds = time.perf_counter() - started
    return report


@torch.no_grad()
def carve_(
    model: nn.Module,
    config: CarveConfig,
    calib: str | Path | None = None,
    tokenizer=None,
    calibration: Calibration | None = None,
    progress: bool = True,
) -> CarveReport:
    """Carve ``model``'s FFNs into BrickFFNs in place, as ``config`` says; return a :class:`CarveReport`.

    ``calib`` (with ``tokenizer``) is the calibration text (any source brickwork.data accepts); a profile
    and router samples are computed from ``config.calib_tokens`` of it in one pass. Or pass a
    ``calibration`` from :func:`calibrate` of the same (dense) model. The same as :func:`plan_carve` then
    :func:`execute_plan`.
    """
    started = time.perf_counter()
    plan = plan_carve(model, config, calib, tokenizer, calibration, progress)
    return execute_plan(model, plan, started, progress)


def _top_k_within(brick: BrickFFN, budget: float) -> int:
    """The top-k :func:`~brickwork.bricks.budget.set_budget` gives ``brick`` at ``budget`` (CarveConfig's
    ``combine_budgets``)."""
    from brickwork.bricks.budget import layer_settings

    try:
        return layer_settings(brick, budget)["active"]
    except BrickworkError as exc:
        raise BrickworkError(f"combine_budgets: {exc}") from None


def _fit_combine(brick: BrickFFN, rule: str, x: torch.Tensor) -> tuple:
    """The weighted ``rule``'s temperature and scale for ``brick``'s own top-k: :func:`_fit_combines`'s."""
    return _fit_combines(brick, rule, x, [brick.active])[brick.active]


def refit_combine_(brick: BrickFFN, x: torch.Tensor) -> None:
    """Fit ``brick``'s weighted rule again on inputs ``x`` (its experts or router changed), for its own top-k and
    for every top-k it has a fit for (``combine_fits``, and the carved top-k after :func:`set_budget`)."""
    carved = brick.spec.carved
    ks = {brick.active} | {k for k, _ in brick.spec.combine_fits}
    if carved is not None:
        ks.add(carved.active)
    fits = _fit_combines(brick, brick.combine.rule, x, sorted(ks))
    others = tuple((k, fits[k][0]) for k in sorted(ks)) if brick.spec.combine_fits else ()
    if carved is not None:
        carved = replace(carved, combine=fits[carved.active][0])
    brick.spec = replace(brick.spec, combine=fits[brick.active][0], combine_fits=others, carved=carved)


def _fit_combines(brick: BrickFFN, rule: str, x: torch.Tensor, ks: list[int], chunk: int = 1024) -> dict:
    """``{k: (Combine, figures)}``: the weighted ``rule``'s temperature and scale for ``brick`` at each top-k in
    ``ks``, fitted on calibration inputs ``x`` so that the weighted sum of the selected experts best reproduces the
    dense FFN's routed part (:func:`fit_combine`). The experts' outputs are computed once, for the largest k:
    selections are nested, a smaller k's experts are the first of its."""
    s, e, size, k = brick.num_shared, brick.num_experts, brick.expert_size, max(ks)
    if e == 0 or size == 0:
        raise BrickworkError(f"combine={rule} needs routed experts to weight; this carve has none")
    x = x.float()
    scores = brick.router(x, brick).float()
    selection = topk_by_position(scores, k)
    outputs = torch.empty(len(x), k, brick.d_model, device=x.device)  # the brick's device (GPU recovery)
    target = torch.empty(len(x), brick.d_model, device=x.device)
    for start in range(0, len(x), chunk):
        rows = slice(start, start + chunk)
        h = brick.hidden(x[rows], s, brick.d_ff)  # [n, E * size]
        target[rows] = h @ brick.down_t[s:]
        chosen = selection[rows]
        for expert in range(e):  # each expert's output for the tokens that selected it, grouped
            tokens, slots = (chosen == expert).nonzero(as_tuple=True)
            if len(tokens):
                neurons = slice(expert * size, (expert + 1) * size)
                part = h[tokens, neurons] @ brick.down_t[s + expert * size : s + (expert + 1) * size]
                outputs[start + tokens, slots] = part
    scores, outputs, target = scores.cpu(), outputs.cpu(), target.cpu()  # fitted on the CPU, any device
    return {j: fit_combine(rule, scores, outputs[:, :j], target, j) for j in ks}
