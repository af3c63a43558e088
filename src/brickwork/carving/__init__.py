"""Making a carve: CarveConfig and its presets, plan_carve/execute_plan and carve_ (the whole model in memory), and
carve_sequential (layer by layer from the checkpoint, writing the saved format as it goes)."""

from brickwork.carving.carve import (
    Calibration,
    CarvePlan,
    CarveReport,
    LayerPlan,
    calibrate,
    carve_,
    execute_plan,
    plan_carve,
)
from brickwork.carving.config import CarveConfig
from brickwork.carving.presets import recommended, stock_recommended
from brickwork.carving.sequential import SequentialReport, carve_sequential

__all__ = [
    "Calibration",
    "calibrate",
    "CarveConfig",
    "CarvePlan",
    "CarveReport",
    "carve_",
    "carve_sequential",
    "execute_plan",
    "LayerPlan",
    "plan_carve",
    "recommended",
    "SequentialReport",
    "stock_recommended",
]
