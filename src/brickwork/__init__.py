"""brickwork: carve the dense FFN layers of pretrained transformers into routed experts (bricks).

The whole job in a few lines::

    import brickwork as bw
    model, tokenizer = bw.load_model("smollm2-135m")
    prof = bw.profile(model, tokenizer, calib="wiki")
    print(bw.evaluate(model, tokenizer, data="botchan").perplexity)
"""

from brickwork.errors import BrickworkError
from brickwork.evaluation import EvalResult, evaluate
from brickwork.models.loading import load_model
from brickwork.models.specs import FFN, FFNWeights, find_ffns
from brickwork.profiling import Profile, ProfileConfig, profile
from brickwork.version import __version__

__all__ = [
    "FFN",
    "BrickworkError",
    "EvalResult",
    "FFNWeights",
    "Profile",
    "ProfileConfig",
    "__version__",
    "evaluate",
    "find_ffns",
    "load_model",
    "profile",
]
