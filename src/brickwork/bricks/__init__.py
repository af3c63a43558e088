"""BrickFFN, CarveConfig, and carve_/uncarve_."""

from brickwork.bricks.budget import set_budget
from brickwork.bricks.carve import Calibration, CarveReport, calibrate, carve_, carved_layers, uncarve_
from brickwork.bricks.config import CarveConfig
from brickwork.bricks.module import BrickFFN

__all__ = [
    "BrickFFN",
    "Calibration",
    "calibrate",
    "CarveConfig",
    "CarveReport",
    "carve_",
    "carved_layers",
    "set_budget",
    "uncarve_",
]
