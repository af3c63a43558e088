"""Update a carved model for a domain: train only the bricks the domain's text uses, everything else frozen.

Configurable Foundation Models (Xiao et al. 2024) name updating as one of the operations bricks allow: new
knowledge goes into the bricks that hold it, and the rest of the model, with what it does for other domains, stays
as it was. Two results make this work: S2FT (Yang et al. 2024, "S2FT: Efficient, Scalable and Generalizable LLM
Fine-tuning by Structured Sparse Fine-Tuning") trains a few structured rows and columns of the FFNs and attention,
selected as coupled blocks so that the dense computation stays dense; EMoE (Qiu et al. 2023, "Emergent
Mixture-of-Experts: Can Dense Pre-trained Transformers Benefit from Emergent Modular Structures?") carves a
dense model's FFNs into experts and shows that tuning them as experts generalises better than tuning the dense
FFN. Here the rows are a brick's: a routed expert's neurons are one contiguous block of the up, gate and down
rows, so training expert e trains stored rows ``num_shared + e * expert_size`` to ``num_shared + (e + 1) *
expert_size`` of ``up``, ``gate``, ``down_t`` (and the per-neuron biases), through the row masks of
:func:`brickwork.ops.train.train_lm_`.

Which experts: :func:`choose_bricks` takes, per layer, those covering a share of the layer's selections on the
domain's text (:func:`brickwork.ops.usage.expert_usage`), or a fixed number of the most used. Shared neurons,
other experts, attention, embeddings and norms stay bit for bit as they were; so do the routers, unless
``train_router`` trains the chosen experts' router rows too (for weighted combine rules, whose weights pass a
gradient to the router).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError
from brickwork.ops.train import TrainConfig, train_lm_
from brickwork.ops.usage import ExpertUsage
from brickwork.routing import ROUTERS

DEFAULT_COVERAGE = 0.5


# choose_bricks' and update_'s options as ``brickwork update`` shows them (the defaults are the signatures').
CHOOSE_BRICKS_HELP = {
    "coverage": {
        "help": "with --bricks auto: share of each layer's selections",
        "default_text": str(DEFAULT_COVERAGE),
    }
}
UPDATE_HELP = {"train_router": "also train the chosen experts' router rows (weighted rules)"}


def choose_bricks(
    usage: ExpertUsage, coverage: float | None = None, experts: int | None = None
) -> dict[int, torch.Tensor]:
    """Per carved layer of ``usage``, the routed experts to train (ascending indices): the fewest covering
    ``coverage`` of the layer's selections (default :data:`DEFAULT_COVERAGE`), or the ``experts`` most used ones
    (ties: the lower index first). Give one of the two."""
    if coverage is not None and experts is not None:
        raise ValueError(
            "give coverage (the experts covering a share of selections) or experts (a number), not both"
        )
    if experts is not None:
        if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
            raise ValueError(f"experts must be an integer >= 1 (experts trained per layer), got {experts!r}")
        chosen = {}
        for layer, counts in usage.counts.items():
            if experts > len(counts):
                raise ValueError(
                    f"experts {experts} is more than layer {layer}'s {len(counts)} routed experts"
                )
            chosen[layer] = torch.sort(counts, descending=True, stable=True).indices[:experts]
    else:
        coverage = DEFAULT_COVERAGE if coverage is None else coverage
        if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
            raise ValueError(f"coverage must be a share of the selections in (0, 1], got {coverage!r}")
        chosen = {layer: usage.covering(layer, coverage) for layer in usage.counts}
    return {layer: experts.sort().values for layer, experts in sorted(chosen.items())}


@dataclass
class UpdateReport:
    """What :func:`update_` trained: per layer the experts, the trainable weights, and the training's steps,
    tokens, losses and seconds."""

    experts: dict[int, list[int]]
    trainable: int
    steps: int
    tokens: int
    losses: list[float]
    seconds: float
    train_router: bool

    def to_dict(self) -> dict:
        return {
            "experts": {str(k): v for k, v in sorted(self.experts.items())},
            "trainable": self.trainable,
            "steps": self.steps,
            "tokens": self.tokens,
            "losses": list(self.losses),
            "seconds": self.seconds,
            "train_router": self.train_router,
        }

    def summary(self) -> str:
        lines = [f"layer {layer:>3}: experts {experts}" for layer, experts in sorted(self.experts.items())]
        loss = f"; loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}" if self.losses else ""
        lines.append(
            f"trained {self.trainable:,} weights for {self.steps} steps ({self.tokens} tokens) in "
            f"{self.seconds:.1f} s{loss}"
        )
        return "\n".join(lines)


def _expert_rows(count: int, experts: torch.Tensor, size: int, offset: int = 0) -> torch.Tensor:
    """A bool mask over ``count`` rows: the ``size`` rows of each of ``experts``, from ``offset``."""
    mask = torch.zeros(count, dtype=torch.bool)
    for e in experts.tolist():
        mask[offset + e * size : offset + (e + 1) * size] = True
    return mask


def update_(
    model,
    tokenizer,
    data,
    bricks: dict[int, torch.Tensor],
    config: TrainConfig | None = None,
    train_router: bool = False,
    progress: bool = True,
) -> UpdateReport:
    """Train, in place on ``data``'s next-token loss, the routed experts ``bricks`` names (layer -> expert indices,
    e.g. from :func:`choose_bricks`) and nothing else (see the module docstring). ``train_router`` also trains
    the chosen experts' rows of the routers (weighted combine rules only). Returns an :class:`UpdateReport`."""
    config = config or TrainConfig()
    carved = carved_layers(model)
    if not carved:
        raise BrickworkError("the model has no carved layer: carve it first (brickwork carve)")
    if not isinstance(bricks, dict) or not bricks:
        raise BrickworkError("no bricks to train: give {layer: expert indices} (choose_bricks picks them)")
    unknown = sorted(set(bricks) - set(carved))
    if unknown:
        raise BrickworkError(f"layers {unknown} are not carved; carved layers are {sorted(carved)}")
    params, masks, chosen = [], {}, {}
    for layer, experts in sorted(bricks.items()):
        brick = carved[layer]
        experts = torch.as_tensor(experts, dtype=torch.long).flatten()
        if len(experts) == 0:
            continue
        if experts.min() < 0 or experts.max() >= brick.num_experts or len(experts.unique()) != len(experts):
            raise BrickworkError(
                f"layer {layer}: experts {experts.tolist()} are not distinct experts of its {brick.num_experts}"
            )
        chosen[layer] = experts.sort().values.tolist()
        rows = _expert_rows(brick.d_ff, experts, brick.expert_size, brick.num_shared)
        for name in ("up", "gate", "down_t", "up_bias", "gate_bias"):
            param = getattr(brick, name)
            if param is not None:
                params.append(param)
                masks[param] = rows
        if train_router:
            if not brick.combine.weighted:
                raise BrickworkError(
                    f"layer {layer} combines its experts by the unweighted sum: its router gets no gradient "
                    "(selection is not differentiable); train the router only with a weighted rule "
                    "(carve --combine sigmoid), or leave train_router off"
                )
            layout = type(brick.router).param_layout
            if not layout:
                trainable = (k for k, cls in sorted(ROUTERS.items()) if cls.param_layout)
                raise BrickworkError(
                    f"the {brick.router.kind!r} router's rows per expert are unknown (it declares no "
                    f"param_layout with parameters); routers that can train per expert: {', '.join(trainable)}"
                )
            for name, param in brick.router.named_parameters(recurse=False):
                if name in type(brick.router).frozen:  # e.g. a low-bit copy of the FFN's rows
                    continue
                if layout.get(name) == "expert":
                    mask = _expert_rows(param.shape[0], experts, 1)
                elif layout.get(name) == "neuron":
                    mask = _expert_rows(param.shape[0], experts, brick.expert_size)
                else:  # shared by every expert: training it would change the others' scores
                    continue
                params.append(param)
                masks[param] = mask
    if not chosen:
        raise BrickworkError("no expert chosen in any layer: nothing to train")
    result = train_lm_(model, params, tokenizer, data, config, masks=masks, progress=progress, desc="update")
    return UpdateReport(
        experts=chosen,
        trainable=result["trainable"],
        steps=result["steps"],
        tokens=result["tokens"],
        losses=result["losses"],
        seconds=result["seconds"],
        train_router=train_router,
    )
