"""Grow: new routed bricks for new data, every existing brick frozen.

"Configurable Foundation Models: Building LLMs from a Modular Perspective" (Xiao et al. 2024) names *growing* among
the brick operations: a model learns a new domain by adding bricks, not by rewriting the ones it has. Here each
chosen carved layer gets a bank of ``experts`` new routed experts beside its BrickFFN, with a router of its own:

- the adapters of MixDA ("Mixture-of-Domain-Adapters", Diao et al. 2023) sit beside a frozen FFN and a gate decides
  how much of them each token takes; here the gate is a sigmoid of the bank's router score for each selected expert;
- LoRA-Mixer (Li et al. 2025) routes each token to a few low-rank experts; ``kind="lora"`` experts are that
  (rank ``r``: ``y = B A x``), ``kind="ffn"`` experts are fresh FFN neurons gated like the base FFN.

The bank's output is *added* to the brick's (``BrickFFN.grown``): the base bricks, their router and their kernels
compute exactly what they did. The bank starts as the identity of the model (its output rows are zero, so the grown
model computes the original bit for bit) and only its weights train (:func:`brickwork.ops.train.train_lm_`). With
``replay`` (text of the original domain), every step also runs a replay batch and adds the mean gate the banks open
on it to the loss, so that the new bricks learn to stay closed on the old domain. :func:`remove_grown_` drops every
bank: the model is then the original bit for bit.

The bank computes every new expert and masks the unselected ones (a reference path; banks are small beside the
FFN). Saved models keep their banks (``brickwork.save`` / ``brickwork.load``); export to stock MoE formats refuses
them.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from brickwork.bricks.grown import DEFAULT_RANK, KINDS, GrownExperts, GrownSpec, _positive_int
from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError
from brickwork.ops.train import TrainConfig, batches, train_lm_

GATE_TOKENS = 4096  # tokens the report's mean gates are measured on, per text


def grown_layers(model: nn.Module) -> dict[int, GrownExperts]:
    """The banks of a carved model, by layer index."""
    return {i: b.grown for i, b in carved_layers(model).items() if b.grown is not None}


def remove_grown_(model: nn.Module) -> list[int]:
    """Drop every grown bank: the model is then the one :func:`grow_` started from, bit for bit. Returns the layers
    that had one."""
    bricks = carved_layers(model)
    if not bricks:
        raise BrickworkError("the model has no carved layer: nothing was grown on it")
    removed = sorted(grown_layers(model))
    for index in removed:
        bricks[index].grown = None
    return removed


@contextmanager
def recording_gates(banks: dict[int, GrownExperts]):
    """While open, each bank's forward appends ``(layer, mean selected gate)`` to the yielded list (a tensor that
    carries gradients when they are on); the hooks are removed on exit."""
    seen: list[tuple[int, torch.Tensor]] = []

    def hook(index):
        def record(bank, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            seen.append((index, bank.gates(x)[1].mean()))

        return record

    handles = [bank.register_forward_pre_hook(hook(i)) for i, bank in banks.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def mean_gates(
    model, banks: dict[int, GrownExperts], windows: torch.Tensor, batch_size: int
) -> dict[int, float]:
    """Each bank's mean selected gate over ``windows`` (token-weighted: equal batches but the last)."""
    device = next(model.parameters()).device
    sums = dict.fromkeys(banks, 0.0)
    tokens = 0
    with recording_gates(banks) as seen:
        for batch in windows.split(batch_size):
            seen.clear()
            model(input_ids=batch.to(device))
            for index, gate in seen:
                sums[index] += gate.item() * batch.numel()
            tokens += batch.numel()
    return {i: s / tokens for i, s in sums.items()}


@dataclass
class GrowReport:
    """What :func:`grow_` did: the banks per layer, the training and the gates each text opens."""

    layers: dict[int, dict]  # layer -> its bank's record (GrownSpec.to_dict)
    trainable: int
    steps: int
    tokens: int
    losses: list[float]
    seconds: float
    gate_new: dict[int, float]  # mean selected gate on the new text, per layer
    gate_replay: dict[int, float] | None = None  # and on the replay text, when given
    replay_losses: list[float] | None = field(default=None)  # each step's gate term on replay

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("layers", "gate_new", "gate_replay"):
            if out[key] is not None:
                out[key] = {str(k): v for k, v in out[key].items()}
        return out


def _chosen_layers(bricks: dict, layers) -> list[int]:
    if layers is None:
        return sorted(bricks)
    if isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"layers must be a list of carved layer indices, got {layers!r}")
    chosen = list(layers)
    if not chosen:
        raise ValueError("layers is empty: name at least one carved layer (or None for all)")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers {chosen} names a layer twice")
    uncarved = [i for i in chosen if i not in bricks]
    if uncarved:
        raise ValueError(f"layers {uncarved} are not carved; the carved layers are {sorted(bricks)}")
    return sorted(chosen)


def plan_grow(
    model, experts: int = 4, kind: str = "ffn", expert_size=None, rank=None, active: int = 1, layers=None
) -> dict[int, GrownSpec]:
    """Each chosen layer's bank spec, every argument checked (ValueError / BrickworkError saying what to change)
    before anything is attached."""
    bricks = carved_layers(model)
    if not bricks:
        raise BrickworkError("the model has no carved layer: carve it first (brickwork carve)")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "ffn" and rank is not None:
        raise ValueError(
            "rank is the size of a low-rank expert (kind='lora'); fresh FFN experts take expert_size"
        )
    if kind == "lora" and expert_size is not None:
        raise ValueError(
            "expert_size is the neurons of a fresh FFN expert (kind='ffn'); low-rank experts take rank"
        )
    chosen = _chosen_layers(bricks, layers)
    already = [i for i in chosen if bricks[i].grown is not None]
    if already:
        raise BrickworkError(f"layers {already} already have grown bricks; remove_grown_(model) first")
    specs = {}
    for index in chosen:
        if kind == "lora":
            size = DEFAULT_RANK if rank is None else rank
        elif expert_size is not None:
            size = expert_size
        else:
            size = bricks[index].expert_size
            if size == 0:
                raise ValueError(f"layer {index} has no routed experts to take the size of: give expert_size")
        specs[index] = GrownSpec(kind, experts, size, active)
    return specs


# grow_'s options as ``brickwork grow`` shows them (the defaults are the signature's).
GROW_HELP = {
    "experts": "new experts per layer",
    "kind": "fresh FFN neurons or low-rank experts",
    "expert_size": {"help": "--kind ffn: neurons per new expert", "default_text": "the carved expert size"},
    "rank": {"help": "--kind lora: rank", "default_text": str(DEFAULT_RANK)},
    "active": "new experts each token selects",
    "layers": {"help": "carved layers to grow", "default_text": "all"},
    "replay_tokens": "replay tokens",
    "replay_weight": "weight of the replay gate term",
}
# config.seed seeds the new experts as well as the batch order.
GROW_SEED_HELP = "seed of the new experts and of the batch order"


def grow_(
    model,
    tokenizer,
    data,
    experts: int = 4,
    kind: str = "ffn",
    expert_size: int | None = None,
    rank: int | None = None,
    active: int = 1,
    layers: list[int] | None = None,
    config: TrainConfig | None = None,
    replay=None,
    replay_tokens: int = 16384,
    replay_weight: float = 1.0,
    progress: bool = True,
) -> GrowReport:
    """Grow ``experts`` new routed experts in each chosen carved layer of ``model`` (all by default) and train
    them, and only them, on ``data``'s next-token loss (a corpus name, text file or ``hf:`` dataset).

    ``kind="ffn"``: fresh neurons, ``expert_size`` per expert (default: the layer's carved expert size), gated like
    the base FFN; ``kind="lora"``: low-rank experts of ``rank`` (default :data:`DEFAULT_RANK`). Each token selects
    its top ``active`` new experts by the bank's router and takes each as much as its sigmoid gate says. The banks
    are drawn from ``config.seed`` and start adding exactly zero. With ``replay`` (text of the original domain,
    e.g. the calibration corpus), each step adds ``replay_weight`` x the mean gate on a replay batch (from its first
    ``replay_tokens`` tokens) to the loss. On failure the banks are removed again: the model is left as it was.
    """
    config = config or TrainConfig()
    if not isinstance(replay_weight, (int, float)) or not math.isfinite(replay_weight) or replay_weight < 0:
        raise ValueError(f"replay_weight must be a finite number >= 0, got {replay_weight!r}")
    _positive_int("replay_tokens", replay_tokens, config.window)
    specs = plan_grow(model, experts, kind, expert_size, rank, active, layers)
    from brickwork.data.sources import token_windows

    started = time.perf_counter()
    bricks = carved_layers(model)
    replay_windows = (
        None if replay is None else token_windows(tokenizer, replay, config.window, replay_tokens)
    )
    generator = torch.Generator().manual_seed(config.seed)
    banks = {i: GrownExperts.for_brick(bricks[i], spec).initialise_(generator) for i, spec in specs.items()}
    for index, bank in banks.items():
        bricks[index].grown = bank
    try:
        extra_loss = None
        if replay_windows is not None:
            replay_batches = batches(replay_windows, config)
            device = bricks[min(banks)].up.device

            def extra_loss(step: int) -> torch.Tensor:
                with recording_gates(banks) as seen:
                    model(input_ids=replay_batches[step].to(device))
                return replay_weight * torch.stack([gate for _, gate in seen]).mean()

        params = [p for bank in banks.values() for p in bank.parameters()]
        trained = train_lm_(
            model, params, tokenizer, data, config, progress=progress, desc="grow", extra_loss=extra_loss
        )
        gate_tokens = max(config.window, min(config.tokens, GATE_TOKENS))
        new_windows = token_windows(tokenizer, data, config.window, gate_tokens)
        gate_new = mean_gates(model, banks, new_windows, config.batch_size)
        gate_replay = None
        if replay_windows is not None:
            gate_replay = mean_gates(model, banks, replay_windows[: len(new_windows)], config.batch_size)
    except BaseException:
        for index in banks:
            bricks[index].grown = None
        raise
    return GrowReport(
        layers={i: spec.to_dict() for i, spec in specs.items()},
        trainable=trained["trainable"],
        steps=trained["steps"],
        tokens=trained["tokens"],
        losses=trained["losses"],
        seconds=time.perf_counter() - started,
        gate_new=gate_new,
        gate_replay=gate_replay,
        replay_losses=trained.get("extra_losses"),
    )
