"""BrickFFN and its BrickSpec, CarveConfig, plan_carve/execute_plan, and carve_/uncarve_."""

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
    "uncarve_",
]
