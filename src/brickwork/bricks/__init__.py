"""BrickFFN and its BrickSpec, CarveConfig, plan_carve/execute_plan, and carve_/uncarve_."""

from brickwork.bricks.adaptive import TokenBudget
from brickwork.bricks.budget import allocate_budgets, set_budget
from brickwork.bricks.carve import (
    Calibration,
    CarvePlan,
    CarveReport,
    LayerPlan,
    calibrate,
    carve_,
    carved_layers,
    execute_plan,
    plan_carve,
    uncarve_,
)
from brickwork.bricks.config import CarveConfig
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.spec import BrickSpec
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
    "Calibration",
    "calibrate",
    "CarveConfig",
    "CarvePlan",
    "CarveReport",
    "carve_",
    "carved_layers",
    "execute_plan",
    "LayerPlan",
    "plan_carve",
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
