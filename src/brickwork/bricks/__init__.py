"""BrickFFN and its BrickSpec, CarveConfig, and carve_/uncarve_."""

from brickwork.bricks.carve import Calibration, CarveReport, calibrate, carve_, carved_layers, uncarve_
from brickwork.bricks.config import CarveConfig
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.spec import BrickSpec

__all__ = [
    "BrickFFN",
    "BrickSpec",
    "Calibration",
    "calibrate",
    "CarveConfig",
    "CarveReport",
    "carve_",
    "carved_layers",
    "uncarve_",
]
