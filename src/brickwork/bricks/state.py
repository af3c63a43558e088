"""A carved model's carve state: one typed object, ``model.brickwork``.

:class:`CarveState` holds what the carve as a whole was (its configuration and calibration, and what budgets,
per-token budgets and merging later recorded) and, per carved layer, a :class:`LayerState`: where the layer's
brick sits in its block and the emptied dense modules that :func:`~brickwork.bricks.carve.uncarve_` puts back.
Bricks carry nothing of this: a brick is its spec and its weights, and swapping one brick for another (prune,
merge) changes only the module at the layer's place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from brickwork.models.specs import FFN

# The carve-level fields save() writes and load() restores, in brickwork.json's names.
RECORDED = ("config", "calibration", "calibration_tokens")


@dataclass
class LayerState:
    """One carved layer: its dense FFN's place (``ffn``), the path in ``ffn.block`` where its brick (or merged
    bricks) sit, and the dense modules the brick replaced, emptied, with their parameters' shapes."""

    ffn: FFN
    path: str
    dense_modules: dict[str, nn.Module]
    dense_shapes: dict[tuple[str, str], torch.Size]

    def module(self) -> nn.Module:
        """The module at the layer's place now: a BrickFFN, or a MergedBricks."""
        return self.ffn.block.get_submodule(self.path)

    def put(self, module: nn.Module) -> None:
        """Put ``module`` at the layer's place."""
        parent, _, name = self.path.rpartition(".")
        setattr(self.ffn.block.get_submodule(parent) if parent else self.ffn.block, name, module)


@dataclass
class CarveState:
    """``model.brickwork``: the carve's record (``config``: ``CarveConfig.to_dict()``; ``calibration``: the
    calibration source described; ``calibration_tokens``), what later changes recorded (``budget``: each layer's
    fraction after ``set_budget``; ``budget_allocation``; ``token_budget``; ``token_budget_fit``; ``merged``: the
    merge record), and the carved ``layers``. ``config`` is None while a carve is under way."""

    layers: dict[int, LayerState] = field(default_factory=dict)
    config: dict | None = None
    calibration: str | None = None
    calibration_tokens: int | None = None
    budget: dict | None = None
    budget_allocation: dict | None = None
    token_budget: dict | None = None
    token_budget_fit: dict | None = None
    merged: dict | None = None

    @property
    def complete(self) -> bool:
        """Whether the carve finished (it has its configuration)."""
        return self.config is not None

    def record(self) -> dict:
        """The carve-level fields that are set, as a dict (what tests and reports compare; no modules)."""
        names = (*RECORDED, "budget", "budget_allocation", "token_budget", "token_budget_fit", "merged")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def carve_state(model: nn.Module, create: bool = False) -> CarveState | None:
    """``model``'s carve state (None when it has none, unless ``create``: then a new, empty one)."""
    state = model.__dict__.get("brickwork")
    if state is None and create:
        state = CarveState()
        model.brickwork = state
    return state
