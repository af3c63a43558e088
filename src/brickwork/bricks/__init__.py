"""BrickFFN and its BrickSpec, a carved model's state (``model.brickwork``), and what changes a carved model's
reads: budgets per layer (set_budget, allocate_budgets) and per token. Making a carve is :mod:`brickwork.carving`."""

from brickwork.bricks.adaptive import TokenBudget
from brickwork.bricks.budget import allocate_budgets, set_budget
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.spec import BrickSpec
from brickwork.bricks.state import CarveState, LayerState, carve_state, carved_layers, model_reads, uncarve_
from brickwork.bricks.token_budget import (
    ReadCounter,
    TokenBudgetFit,
    TokenReads,
    count_reads,
    fit_token_budget,
    set_token_budget,
)

__all__ = [
    "BrickFFN",
    "BrickSpec",
    "CarveState",
    "LayerState",
    "carve_state",
    "carved_layers",
    "model_reads",
    "set_budget",
    "allocate_budgets",
    "TokenBudget",
    "TokenBudgetFit",
    "TokenReads",
    "ReadCounter",
    "count_reads",
    "fit_token_budget",
    "set_token_budget",
    "uncarve_",
]
