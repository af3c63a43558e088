"""Quality of a model against held-out text and against its dense parent."""

from brickwork.evaluation.perplexity import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
