"""Per-token budgets at run time: set them, fit them to an average read target, and measure the reads.

The rule is :mod:`brickwork.bricks.adaptive` (a token keeps the fewest of its top ``active`` experts whose router
mass reaches a threshold, at least ``min_active``); this module applies it to a carved model, as
:mod:`brickwork.bricks.budget` applies run-time top-k budgets:

- :func:`set_token_budget` sets a threshold for every carved layer (or per layer); None returns to the carve's
  fixed top-k, bit for bit.
- :func:`fit_token_budget` chooses the thresholds so that the mean weights read per token on calibration text
  equal a target fraction: one threshold for every layer (by bisection: layers whose routers concentrate their
  mass read less, the others more) or one per layer (each layer reads the target), and can fit the copy
  expert's gain.
- :class:`ReadCounter` and :func:`count_reads` measure what tokens read: per layer and over the carved layers,
  the mean and the worst case (``BrickFFN.read_fraction``, the cap).

With a per-token budget, ``active`` (and :func:`~brickwork.bricks.budget.set_budget`, which changes it) is the cap
within which tokens choose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from brickwork.bricks.adaptive import TokenBudget, dropped_share, fit_copy_gain, kept_counts
from brickwork.bricks.budget import spread_over_layers
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.state import carve_state, carved_layers, refuse_grown
from brickwork.errors import BrickworkError

logger = logging.getLogger(__name__)

# bisection steps of fit_token_budget (the mean reads are a step function of the threshold: 2^-40 is far finer
# than any step)
BISECTION_STEPS = 40
# the smallest threshold fit_token_budget tries: every token keeps its first expert (or min_active)
LEAST_THRESHOLD = 1e-12


def _check_mass(index: int, brick: BrickFFN) -> None:
    if not brick.combine.weighted and not brick.router.predicts_mass:
        raise BrickworkError(
            f"layer {index}: a per-token budget keeps experts by their share of the router's mass, and the "
            f"'{brick.router.kind}' router's scores do not estimate it (sum combine rule); carve with a router that "
            "predicts activation mass (fitted, oracle, partial, lowrank, representative) or a weighted combine rule "
            "(--combine softmax, softmax_topk or sigmoid)"
        )


def layer_token_budget(
    index: int, brick: BrickFFN, threshold: float | TokenBudget, min_active: int = 1, zero_mass: float = 0.0
) -> TokenBudget:
    """The :class:`TokenBudget` for carved layer ``index`` (``threshold`` with ``min_active`` and ``zero_mass``, or
    a TokenBudget as it is), or a BrickworkError saying what to change."""
    if isinstance(threshold, TokenBudget):
        budget = threshold
    else:
        try:
            budget = TokenBudget(threshold=threshold, min_active=min_active, zero_mass=zero_mass)
        except ValueError as exc:
            raise BrickworkError(str(exc)) from exc
    if budget.min_active > brick.active:
        raise BrickworkError(
            f"min_active {budget.min_active} is above layer {index}'s cap of {brick.active} routed experts; "
            "lower min_active, or raise the cap with set_budget"
        )
    _check_mass(index, brick)
    return budget


def _layers(model: nn.Module, what: str) -> dict[int, BrickFFN]:
    bricks = carved_layers(model)
    if not bricks:
        raise BrickworkError(f"{what} needs a carved model (brickwork.carve_ or brickwork.load)")
    refuse_grown(bricks, what)
    return bricks


def _apply(model: nn.Module, bricks: dict[int, BrickFFN], budgets: dict[int, TokenBudget | None]) -> None:
    for index, budget in budgets.items():
        brick = bricks[index]
        if brick.spec.token_budget != budget:  # a new spec: the kernels prepare their calls again
            brick.spec = replace(brick.spec, token_budget=budget)
    if carve_state(model) is not None:
        model.brickwork.token_budget = {
            i: None if b.spec.token_budget is None else b.spec.token_budget.to_dict()
            for i, b in sorted(bricks.items())
        }


def set_token_budget(
    model: nn.Module,
    threshold: float | dict[int, float | TokenBudget | None] | None,
    min_active: int = 1,
    zero_mass: float = 0.0,
) -> dict[int, TokenBudget | None]:
    """Let each token of the carved layers keep the fewest of its top ``active`` routed experts whose router mass
    reaches ``threshold`` of theirs, and at least ``min_active``; ``zero_mass``: the zero expert's router mass
    (with ``min_active=0``, tokens whose router predicts little mass run no routed expert; see
    :mod:`brickwork.bricks.adaptive`).

    ``threshold``: one value in (0, 1] for every carved layer, a dict ``{layer: threshold, TokenBudget or None}``
    (layers not named keep theirs), or None for the carve's fixed top-k everywhere (its outputs, bit for bit; so
    does a threshold of 1). No copy gain: :func:`fit_token_budget` fits one. Returns each carved layer's budget
    (None: fixed top-k). A refused value leaves the model as it was.
    """
    bricks = _layers(model, "set_token_budget")
    wanted = spread_over_layers(
        threshold,
        bricks,
        (int, float, TokenBudget),
        "a token budget is a threshold in (0, 1], a {layer: threshold} dict or None",
    )
    budgets = {  # every layer's budget first: a refused one leaves the model as it was
        index: None
        if value is None
        else layer_token_budget(index, bricks[index], value, min_active, zero_mass)
        for index, value in wanted.items()
    }
    _apply(model, bricks, budgets)
    return {index: brick.spec.token_budget for index, brick in sorted(bricks.items())}


# --- measuring reads -------------------------------------------------------------------------------------------
@dataclass
class TokenReads:
    """FFN weights read per token, as a fraction of the dense FFN's, measured on given tokens.

    ``layers``: per carved layer, ``mean`` and ``worst`` (the cap: :meth:`BrickFFN.read_fraction`) fractions,
    ``routed_mean`` (routed experts run per token on average), ``tokens`` and ``kept`` (how many tokens kept
    0, 1, ..., ``active`` experts). ``mean`` and ``worst``: over the carved layers, each weighted by its dense FFN
    size (weights read by all carved layers / their dense weights).
    """

    layers: dict[int, dict] = field(default_factory=dict)
    mean: float = 0.0
    worst: float = 0.0
    tokens: int = 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "worst": self.worst, "tokens": self.tokens, "layers": self.layers}


class ReadCounter:
    """Counts, per carved layer, how many routed experts each token keeps in the forward passes run inside it
    (``with ReadCounter(model) as counter: ...; counter.reads()``). A forward hook per brick routes its input
    again (in torch, as the reference path routes) and is removed on exit."""

    def __init__(self, model: nn.Module):
        self.bricks = _layers(model, "ReadCounter")
        self.counts = {i: torch.zeros(b.num_experts + 1, dtype=torch.int64) for i, b in self.bricks.items()}
        self.handles: list = []

    def _hook(self, index: int):
        def record(brick: BrickFFN, args, output) -> None:
            x = args[0].reshape(-1, brick.d_model)
            if brick.spec.adaptive:
                with torch.no_grad():
                    kept = (brick.select(x) >= 0).sum(-1)
            else:
                kept = torch.full((len(x),), brick.active, dtype=torch.int64)
            self.counts[index] += torch.bincount(kept.cpu(), minlength=brick.num_experts + 1)

        return record

    def __enter__(self) -> ReadCounter:
        self.handles = [brick.register_forward_hook(self._hook(i)) for i, brick in self.bricks.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def reads(self) -> TokenReads:
        """The reads of the tokens counted so far, at each layer's current settings."""
        result = TokenReads()
        read = worst = dense = 0.0
        for index, brick in sorted(self.bricks.items()):
            counts = self.counts[index].double()
            tokens = int(counts.sum())
            if not tokens:
                continue
            fractions = torch.tensor(
                [brick.routed_fraction(k) for k in range(len(counts))], dtype=torch.float64
            )
            mean = float((counts * fractions).sum() / tokens)
            size = brick.d_ff * brick.weights_per_neuron
            result.layers[index] = {
                "mean": mean,
                "worst": brick.read_fraction(),
                "routed_mean": float((counts * torch.arange(len(counts))).sum() / tokens),
                "tokens": tokens,
                "kept": [int(c) for c in self.counts[index][: brick.active + 1]],
            }
            read += mean * size
            worst += brick.read_fraction() * size
            dense += size
            result.tokens = max(result.tokens, tokens)
        if dense:
            result.mean, result.worst = read / dense, worst / dense
        return result


@torch.no_grad()
def _forward_windows(model: nn.Module, windows: torch.Tensor, batch: int = 4) -> None:
    device = next(model.parameters()).device
    for part in windows.split(batch):
        model(input_ids=part.to(device))


def count_reads(model: nn.Module, tokenizer, data, tokens: int = 2048, window: int = 512) -> TokenReads:
    """The FFN weights read per token on ``tokens`` tokens of ``data`` (:class:`TokenReads`): one forward pass."""
    from brickwork.data.sources import token_windows

    return count_reads_windows(model, token_windows(tokenizer, data, window, tokens))


# --- fitting ---------------------------------------------------------------------------------------------------
@dataclass
class TokenBudgetFit:
    """What :func:`fit_token_budget` chose and measured: ``budgets`` per carved layer, ``reads`` on the
    calibration tokens after fitting, and per layer the copy expert's fit (``gain``; ``lost``: what dropping
    experts loses, ``||y_cap - y_kept||^2 / ||y_cap||^2``; ``after``: the same with the copy expert's output
    added)."""

    target: float
    per_layer: bool
    budgets: dict[int, TokenBudget]
    reads: TokenReads
    copy: dict[int, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "per_layer": self.per_layer,
            "budgets": {i: b.to_dict() for i, b in self.budgets.items()},
            "reads": self.reads.to_dict(),
            "copy": self.copy,
        }


@torch.no_grad()
def _capture_inputs(model: nn.Module, bricks: dict[int, BrickFFN], windows: torch.Tensor) -> dict:
    """Each carved layer's FFN inputs ``[N, D]`` on ``windows`` (one forward pass, hooks removed after)."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in bricks}

    def hook(index):
        def record(brick, args):
            seen[index].append(args[0].reshape(-1, brick.d_model).detach().float().cpu())

        return record

    handles = [brick.register_forward_pre_hook(hook(i)) for i, brick in bricks.items()]
    try:
        _forward_windows(model, windows)
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(parts) for i, parts in seen.items()}


class _LayerMasses:
    """One layer's router masses at the cap on calibration inputs, and what a threshold makes its tokens read."""

    @torch.no_grad()
    def __init__(self, brick: BrickFFN, x: torch.Tensor, min_active: int, zero_share: float):
        self.mass = brick.cap_mass(x)[1].double()
        self.size = float(brick.d_ff * brick.weights_per_neuron)
        self.min_active = min_active
        self.zero_mass = zero_share * float(self.mass.sum(-1).mean()) if len(self.mass) else 0.0
        self.fractions = torch.tensor(
            [brick.routed_fraction(k) for k in range(brick.active + 1)], dtype=torch.float64
        )

    def budget(self, threshold: float) -> TokenBudget:
        return TokenBudget(threshold=threshold, min_active=self.min_active, zero_mass=self.zero_mass)

    def reads(self, threshold: float) -> float:
        return float(self.fractions[kept_counts(self.mass, self.budget(threshold))].mean())


def _thresholds(layers: dict[int, _LayerMasses], target: float, per_layer: bool) -> dict[int, TokenBudget]:
    """Each layer's budget: its own largest threshold within ``target``, or the largest one threshold whose mean
    reads over the layers (weighted by FFN size) are within it."""
    groups = {i: {i: layer} for i, layer in layers.items()} if per_layer else {None: layers}
    chosen = {}
    for key, group in groups.items():
        weight = sum(layer.size for layer in group.values())

        def reads(threshold: float, group=group, weight=weight) -> float:
            return sum(layer.size * layer.reads(threshold) for layer in group.values()) / weight

        least = reads(LEAST_THRESHOLD)
        if least > target:
            where = "" if key is None else f"layer {key}: "
            some = next(iter(group.values()))
            raise BrickworkError(
                f"{where}a target of {target:.1%} is below the least a per-token budget reads here ({least:.1%}, "
                f"shared neurons and router included: every token keeps min_active = {some.min_active} routed "
                "experts, and one while it has router mass beyond the zero expert's); lower min_active, give a "
                "zero_share, or raise the target"
            )
        threshold = _largest_within(reads, target)
        chosen.update({i: layer.budget(threshold) for i, layer in group.items()})
    return chosen


def _largest_within(reads, target: float) -> float:
    """The largest threshold whose mean reads ``reads(threshold)`` (non-decreasing) are at most ``target``."""
    if reads(1.0) <= target:
        return 1.0
    low, high = LEAST_THRESHOLD, 1.0
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if reads(middle) <= target:
            low = middle
        else:
            high = middle
    return low


# fit_token_budget's options as ``brickwork eval --token-budget`` shows them (the defaults are the signature's;
# min_active is set_token_budget's too).
FIT_TOKEN_BUDGET_HELP = {
    "min_active": "routed experts every token keeps at least (0 lets a token run none)",
    "zero_share": "the zero expert's router mass, as a multiple of a token's mean mass",
    "copy": "fit MoE++'s copy expert (dropped mass replaced by a multiple of the FFN input)",
    "per_layer": {
        "help": "a threshold per layer, each reading the target",
        "default_text": "one threshold for all",
    },
}


def fit_token_budget(
    model: nn.Module,
    tokenizer,
    data,
    target: float,
    min_active: int = 1,
    zero_share: float = 0.0,
    per_layer: bool = False,
    copy: bool = False,
    tokens: int = 2048,
    window: int = 512,
    rounds: int = 2,
    progress: bool = True,
) -> TokenBudgetFit:
    """Per-token budgets whose mean FFN reads per token on ``tokens`` of ``data`` (calibration text, not held-out
    text) are ``target`` (a fraction of the dense FFN, below the carve's cap), and leave them applied.

    Each carved layer's inputs are captured once; for a threshold, a token's kept experts follow from its router
    masses at the cap, so the mean reads of any threshold cost no forward pass. ``per_layer=False``: one threshold
    for every layer, the largest whose mean reads over the carved layers (weighted by FFN size) are at most
    ``target``, by bisection; ``per_layer=True``: each layer's own, so that every layer reads at most ``target``.
    ``zero_share``: each layer's zero-expert mass as a multiple of its tokens' mean router mass at the cap (0: none;
    with ``min_active=0`` tokens of little mass then run no routed expert).
    A layer's inputs depend on the layers before it, so the fit runs ``rounds`` times, the inputs captured again
    with the previous round's budgets. ``copy=True`` then fits each layer's copy-expert gain in closed form
    (:func:`~brickwork.bricks.adaptive.fit_copy_gain`) on the same inputs. The reads are then measured on the
    calibration tokens (:class:`TokenReads`); ``rounds + 1`` forward passes in all. A target at or above what the
    cap reads gives threshold 1 (the fixed top-k); one below what tokens read keeping ``min_active`` experts (and,
    without a zero expert, their first) is refused.
    """
    from tqdm.auto import tqdm

    from brickwork.data.sources import token_windows

    bricks = _layers(model, "fit_token_budget")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise BrickworkError(
            f"a target is a fraction of the dense FFN read per token in (0, 1], got {target!r}"
        )
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise BrickworkError(f"rounds must be an integer >= 1, got {rounds!r}")
    if isinstance(zero_share, bool) or not isinstance(zero_share, (int, float)) or not 0 <= zero_share < 1e6:
        raise BrickworkError(f"zero_share must be a number >= 0, got {zero_share!r}")
    for index, brick in bricks.items():
        layer_token_budget(index, brick, 1.0, min_active)  # the checks, before any pass
    windows = token_windows(tokenizer, data, window, tokens)
    inputs: dict[int, torch.Tensor] = {}
    for _ in tqdm(range(rounds), desc="token budget", unit="round", disable=not progress):
        inputs = _capture_inputs(model, bricks, windows)
        layers = {i: _LayerMasses(b, inputs[i], min_active, zero_share) for i, b in bricks.items()}
        set_token_budget(model, _thresholds(layers, target, per_layer))
    copies = _fit_copy(bricks, inputs) if copy else {}
    reads = count_reads_windows(model, windows)
    fit = TokenBudgetFit(
        target=float(target),
        per_layer=per_layer,
        budgets={i: b.spec.token_budget for i, b in sorted(bricks.items())},
        reads=reads,
        copy=copies,
    )
    if carve_state(model) is not None:
        model.brickwork.token_budget_fit = fit.to_dict()
    logger.info("token budget: mean reads %.1f%% (target %.1f%%)", 100 * reads.mean, 100 * target)
    return fit


def count_reads_windows(model: nn.Module, windows: torch.Tensor) -> TokenReads:
    """:func:`count_reads` on token ``windows [N, window]`` already made."""
    with ReadCounter(model) as counter:
        _forward_windows(model, windows)
    return counter.reads()


@torch.no_grad()
def _fit_copy(bricks: dict[int, BrickFFN], inputs: dict[int, torch.Tensor]) -> dict[int, dict]:
    """Each layer's copy-expert gain, fitted on its captured ``inputs`` to what its dropped experts add (the cap's
    output less the kept experts'), and applied."""
    report = {}
    for index, brick in bricks.items():
        budget = replace(brick.spec.token_budget, copy_gain=0.0)
        x = inputs[index]
        _, mass = brick.cap_mass(x)
        dropped = dropped_share(mass, kept_counts(mass, budget))
        with_budget = replace(brick.spec, token_budget=budget)
        brick.spec = replace(with_budget, token_budget=None)
        y_cap = brick.forward_reference(x)
        brick.spec = with_budget
        lost = y_cap - brick.forward_reference(x)
        gain = fit_copy_gain(x, dropped, lost)
        rest = lost - (gain * dropped)[:, None].float() * x
        scale = float(y_cap.double().pow(2).sum().clamp_min(1e-300))
        report[index] = {
            "gain": gain,
            "lost": float(lost.double().pow(2).sum()) / scale,
            "after": float(rest.double().pow(2).sum()) / scale,
        }
        brick.spec = replace(with_budget, token_budget=replace(budget, copy_gain=gain))
    return report
