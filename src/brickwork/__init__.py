"""brickwork: carve the dense FFN layers of pretrained transformers into routed experts (bricks).

The whole job in a few lines::

    import brickwork as bw
    model, tokenizer = bw.load_model("smollm2-135m")
    bw.carve_(model, bw.CarveConfig(experts=16, shared=2, active=2), calib="wiki", tokenizer=tokenizer)
    print(bw.evaluate(model, tokenizer, data="botchan").perplexity)
    bw.save(model, "carved/", tokenizer)
    model = bw.load("carved/")
"""

from brickwork.bricks import (
    BrickFFN,
    TokenBudget,
    carved_layers,
    count_reads,
    fit_token_budget,
    set_budget,
    set_token_budget,
    uncarve_,
)
from brickwork.carving import CarveConfig, CarveReport, calibrate, carve_, carve_sequential
from brickwork.errors import BrickworkError
from brickwork.evaluation import EvalResult, evaluate
from brickwork.io import load, save
from brickwork.models.loading import load_model
from brickwork.models.specs import FFN, FFNWeights, find_ffns
from brickwork.profiling import Profile, ProfileConfig, profile
from brickwork.version import __version__

__all__ = [
    "FFN",
    "BrickFFN",
    "BrickworkError",
    "CarveConfig",
    "CarveReport",
    "EvalResult",
    "FFNWeights",
    "Profile",
    "ProfileConfig",
    "TokenBudget",
    "__version__",
    "calibrate",
    "carve_",
    "carve_sequential",
    "carved_layers",
    "count_reads",
    "evaluate",
    "find_ffns",
    "fit_token_budget",
    "load",
    "load_model",
    "profile",
    "save",
    "set_budget",
    "set_token_budget",
    "uncarve_",
]
