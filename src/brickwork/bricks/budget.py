"""Run-time budgets: set how much of each carved FFN a token reads, without carving again.

One carved model serves many budgets (MatFormer, Devvrit et al. 2023; Flextron, Cai et al. 2024; SortedNet,
Valipour et al. 2023 train nested sub-models for this; brickwork's bricks are nested without training, because a
router's top-k of a smaller budget is inside its top-k of a larger one). A layer's budget is the fraction of its
dense FFN weights a token reads, router included (:meth:`BrickFFN.read_fraction`), as at carve time:

- by default (routers that score experts on their own: ``fitted``, ``trained``, ``centroid``,
  ``representative``, ``lowrank``, ``oracle``): the number of routed experts per token (top-k) changes. Selections are nested: the
  experts a token runs at a smaller budget are among those it runs at a larger one. Down-row sparsity, where the
  carve has it, keeps its share of the computed neurons.
- a router with a re-budgeting of its own (:meth:`Router.rebudget`) sets what it says; the ``partial`` router
  (the neuron-level defaults of :func:`brickwork.carving.presets.recommended`) sets the number
  of neurons computed, the down rows read and the router's input fraction are set as that preset sets them for
  the budget, giving exactly the carve the preset makes for that budget from the same calibration (same neuron
  order, same neuron count). Selections are nested only while the input fraction stays the same.

Weighted combine rules (``softmax``, ``sigmoid``) take the temperature and scale fitted for the new top-k where the
carve fitted one (``CarveConfig.combine_budgets``: the budget range a carve is calibrated for, kept in each spec's
``combine_fits``); elsewhere they keep the ones fitted for the carve's own top-k, and the weights are no longer
least-squares fitted there (``softmax_topk`` renormalises, so its total weight does not depend on k). Every layer
records the settings it was carved with, and a budget equal to a layer's carved one restores them exactly:
``set_budget(model, None)`` returns to the carved budgets, bit for bit.

A per-token budget (:mod:`brickwork.bricks.token_budget`) stays as it is: tokens choose within the new top-k.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from brickwork.bricks.combine import Combine
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.spec import CarvedSettings
from brickwork.bricks.state import carve_state, carved_layers, refuse_grown
from brickwork.errors import BrickworkError

# relative slack when comparing a requested budget with a layer's fraction (floating-point noise only)
_TOLERANCE = 1e-9


def _settings(brick: BrickFFN) -> dict:
    spec = brick.spec
    return {
        "active": spec.active,
        "down_keep": spec.down_keep,
        "router_config": dict(spec.router_config),
        "combine": spec.combine.to_dict(),
    }


def _apply(brick: BrickFFN, settings: dict) -> None:
    """A new spec with ``settings`` (the kernels see the new spec and prepare their calls again)."""
    combine = Combine.from_dict(settings["combine"])  # every settings record carries its rule (_settings)
    brick.spec = replace(
        brick.spec,
        active=settings["active"],
        down_keep=settings["down_keep"],
        router_config=dict(settings["router_config"]),
        combine=combine,
    )
    brick.router.set_config(settings["router_config"])


def spread_over_layers(value, bricks: dict, scalars: tuple, usage: str) -> dict:
    """``value`` spread over the carved ``bricks``: a dict names layers (each must be carved), None means None
    everywhere, and a value of the ``scalars`` types applies to every layer; anything else is refused with
    ``usage``."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(bricks))
        if unknown:
            raise BrickworkError(f"layers {unknown} are not carved; carved layers are {sorted(bricks)}")
        return dict(value)
    if value is None:
        return dict.fromkeys(bricks)
    if isinstance(value, scalars) and not isinstance(value, bool):
        return dict.fromkeys(bricks, float(value) if isinstance(value, int) else value)
    raise BrickworkError(f"{usage}; got {value!r}")


def calibrated(brick: BrickFFN) -> dict:
    """The settings ``brick`` was carved with (``spec.carved``, kept on its first re-budgeting), as a dict."""
    return brick.spec.carved_settings.to_dict()


def restore_calibrated(brick: BrickFFN, record) -> None:
    """Record (from a saved file) the settings ``brick`` was carved with; ValueError/TypeError when they do not fit
    its spec. Records written before ``combine`` was kept in them take the brick's own rule (no carve then fitted
    it for more than one top-k)."""
    carved = CarvedSettings.from_dict(record, brick.spec.combine)
    brick.spec = replace(brick.spec, carved=carved)  # BrickSpec's own checks


def _fraction_with(brick: BrickFFN, settings: dict) -> float:
    current, spec = _settings(brick), brick.spec
    brick.spec = replace(spec, token_budget=None)  # the cap's reads (and no min_active above a trial top-k)
    _apply(brick, settings)
    try:
        return brick.read_fraction()
    finally:
        _apply(brick, current)
        brick.spec = spec


def layer_settings(brick: BrickFFN, budget: float) -> dict:
    """The settings that make ``brick`` read at most ``budget`` of its dense FFN per token: the router's own
    (:meth:`~brickwork.routing.base.Router.rebudget`: the neuron-level preset's settings for the ``partial``
    router), otherwise the most it can read within it; its carved settings when ``budget`` is its carved
    fraction."""
    if not 0 < budget <= 1:
        raise BrickworkError(f"a budget is a fraction of the dense FFN in (0, 1], got {budget}")
    carved = calibrated(brick)
    if abs(_fraction_with(brick, carved) - budget) <= _TOLERANCE * budget:
        return carved
    if brick.num_experts == 0:
        raise BrickworkError("this layer has only shared neurons: it has no budget to set")
    own = brick.router.rebudget(brick, budget, carved)
    if own is not None:  # the router's own settings per top-k, and the top-k to try first
        settings_for, first = own
        if first is not None:
            chosen = settings_for(first)
            if _fraction_with(brick, chosen) <= budget * (1 + _TOLERANCE):
                return chosen
    else:
        computed0 = brick.num_shared + carved["active"] * brick.expert_size
        share = None if carved["down_keep"] is None else carved["down_keep"] / computed0

        def settings_for(k: int) -> dict:
            computed = brick.num_shared + k * brick.expert_size
            keep = None if share is None else max(1, round(share * computed))
            fitted = brick.spec.fitted_combine(k)  # a weighted rule fitted for this top-k at carve time
            return {
                "active": k,
                "down_keep": None if keep is None or keep >= computed else keep,
                "router_config": carved["router_config"],
                "combine": carved["combine"] if fitted is None else fitted.to_dict(),
            }

    # the fraction grows with k: the largest k within the budget, by bisection
    low, high = 1, brick.num_experts
    least = _fraction_with(brick, settings_for(low))
    if least > budget * (1 + _TOLERANCE):
        raise BrickworkError(
            f"a budget of {budget:.1%} is below what this layer reads with one routed expert ({least:.1%}: "
            "shared neurons and the router included); choose a larger budget"
        )
    while low < high:
        middle = (low + high + 1) // 2
        if _fraction_with(brick, settings_for(middle)) <= budget * (1 + _TOLERANCE):
            low = middle
        else:
            high = middle - 1
    return settings_for(low)


def set_budget(model: nn.Module, budget: float | dict[int, float] | None) -> dict[int, float]:
    """Set the fraction of each carved FFN a token reads: one ``budget`` for every carved layer, a dict
    ``{layer: budget}`` (layers not named keep theirs), or None for the budgets the model was carved with
    (restored exactly). Returns each carved layer's fraction after the change. See the module docstring."""
    bricks = carved_layers(model)
    if not bricks:
        raise BrickworkError("set_budget needs a carved model (brickwork.carve_ or brickwork.load)")
    refuse_grown(bricks, "set_budget")
    wanted = spread_over_layers(
        budget, bricks, (int, float), "a budget is a fraction, a {layer: fraction} dict or None"
    )
    # every layer's new settings first: a refused budget leaves the model as it was
    plans = {
        index: calibrated(bricks[index]) if value is None else layer_settings(bricks[index], value)
        for index, value in wanted.items()
    }
    for index, settings in plans.items():
        token_budget = bricks[index].spec.token_budget
        if token_budget is not None and token_budget.min_active > settings["active"]:
            raise BrickworkError(
                f"layer {index}'s per-token budget keeps at least {token_budget.min_active} routed experts, more "
                f"than this budget's {settings['active']}; lower min_active (set_token_budget) or raise the budget"
            )
    for index, settings in plans.items():
        brick = bricks[index]
        if brick.spec.carved is None:  # the carved settings, kept before a budget first changes them
            brick.spec = replace(brick.spec, carved=brick.spec.settings)
        _apply(brick, settings)
    fractions = {index: brick.read_fraction() for index, brick in sorted(bricks.items())}
    state = carve_state(model)
    if state is not None:
        state.budget = fractions
    return fractions


def _finite(values: dict[int, float]) -> dict[int, float | None]:
    """``values`` for JSON: an impossible move's infinite cost or gain becomes None."""
    return {i: (v if math.isfinite(v) else None) for i, v in values.items()}


def _balanced(moved_reads: dict[int, dict[int, float]], up: int, down: int, step: float) -> bool:
    """Whether raising ``up`` and lowering ``down`` by one step keeps the average: equal reads (within a quarter
    step) added to one and taken from the other."""
    added, removed = moved_reads[1].get(up), moved_reads[-1].get(down)
    return added is not None and removed is not None and added > 0 and abs(added - removed) <= step / 4


@torch.no_grad()
def allocate_budgets(
    model: nn.Module,
    tokenizer,
    data,
    budget: float,
    step: float = 0.1,
    tokens: int = 2048,
    window: int = 512,
    progress: bool = True,
    rounds: int = 1,
) -> dict[int, float]:
    """Per-layer budgets averaging ``budget`` (weighted by each layer's FFN size), moved from the layers that lose
    least to the ones that gain most, by measured sensitivity on ``tokens`` of ``data`` (calibration text, not
    held-out text).

    Layer-wise allocation of one total, as in HMoE and Mix'n'Match (budgets that differ by layer), measured
    rather than assumed: with every carved layer at ``budget``, each layer in turn is set to ``budget - step``
    and to ``budget + step`` alone and the mean next-token loss is measured, giving its cost of a smaller
    budget and its gain from a larger one. Layers are then paired greedily, the pair whose raised layer gains most
    over what its lowered layer costs first, while that is positive (the effects are taken as additive across
    layers) and the reads it adds to one layer equal, within a quarter step, the reads it takes from the other
    (a step moves whole experts, so on expert-level carves the same step can move two layers by different
    numbers of experts: such pairs are not made); equal FFN sizes keep the average. A step below one routed
    expert's share is refused. Each further round (``rounds``) measures again from the
    allocation so far and moves layers by one more step, so a sensitive layer can climb several steps; it stops
    early when no pair gains. Returns ``{layer: budget}`` for :func:`set_budget`, which this leaves applied.
    ``2 L + 1`` forward passes over ``tokens`` per round for L carved layers.
    """
    from tqdm.auto import tqdm

    from brickwork.data.sources import token_windows
    from brickwork.evaluation.perplexity import mean_nll

    bricks = carved_layers(model)
    if not bricks:
        raise BrickworkError("allocate_budgets needs a carved model")
    if not (0 < step < budget and budget + step <= 1):
        raise BrickworkError(f"step {step} must leave budget {budget} -/+ step inside (0, 1]")
    if not isinstance(rounds, int) or rounds < 1:
        raise BrickworkError(f"rounds must be a positive integer, got {rounds!r}")
    sizes = {i: b.d_ff * b.weights_per_neuron for i, b in bricks.items()}
    if len(set(sizes.values())) > 1:
        raise BrickworkError(
            "allocate_budgets moves equal steps between layers: carved FFNs must be one size"
        )
    unit = min(b.routed_fraction(b.active + 1) - b.routed_fraction(b.active) for b in bricks.values())
    if step < unit:
        raise BrickworkError(
            f"step {step} is less than one routed expert's share of an FFN ({unit:.4f}): a step must move whole "
            f"experts; give a step of at least {math.ceil(unit * 1000) / 1000}"
        )
    windows = token_windows(tokenizer, data, window, tokens)
    chosen = dict.fromkeys(bricks, budget)
    history = []
    for round_ in range(rounds):
        reads = set_budget(model, chosen)
        base = mean_nll(model, windows)
        cost, gain = {}, {}
        # by how much lowering (-1) and raising (1) each layer changes its reads
        moved_reads: dict[int, dict[int, float]] = {-1: {}, 1: {}}
        desc = "layer sensitivity" + (f" (round {round_ + 1}/{rounds})" if rounds > 1 else "")
        for index in tqdm(sorted(bricks), desc=desc, unit="layer", disable=not progress):
            for sign, into in ((-1, cost), (1, gain)):
                moved = round(chosen[index] + sign * step, 12)
                try:
                    after = set_budget(model, chosen | {index: moved})
                except BrickworkError:  # below one routed expert, or above the dense FFN: not a move
                    into[index] = math.inf if sign < 0 else -math.inf
                    continue
                moved_reads[sign][index] = abs(after[index] - reads[index])
                change = mean_nll(model, windows) - base
                into[index] = change if sign < 0 else -change
            set_budget(model, chosen)
        moves, free = [], set(bricks)

        while len(free) >= 2:  # the best balanced (raise, lower) pair not yet moved, while it is a net gain
            pairs = [
                (gain[u] - cost[d], u, d)
                for u in free
                for d in free
                if u != d and _balanced(moved_reads, u, d, step)
            ]
            if not pairs:
                break
            net, up, down = max(pairs)
            if net <= 0:
                break
            chosen[up], chosen[down] = round(chosen[up] + step, 12), round(chosen[down] - step, 12)
            moves.append((up, down))
            free -= {up, down}
        history.append({"cost": _finite(cost), "gain": _finite(gain), "moves": moves})
        if not moves:
            break
    set_budget(model, chosen)
    if carve_state(model) is not None:
        model.brickwork.budget_allocation = {
            "budget": budget,
            "step": step,
            "cost": history[0]["cost"],  # the first round's, from the uniform budget
            "gain": history[0]["gain"],
            "rounds": history,
            "layers": chosen,
        }
    return chosen
