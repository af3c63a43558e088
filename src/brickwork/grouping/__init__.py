"""Expert construction: each method is one file registering a function ``GroupingInputs -> Grouping``."""

from brickwork.grouping import activation, coactivation, random, weight_kmeans  # noqa: F401  (registration)
from brickwork.grouping.base import (
    GROUPING_METHODS,
    Grouping,
    GroupingInputs,
    balanced_assign,
    balanced_kmeans,
    register_grouping,
)

__all__ = [
    "GROUPING_METHODS",
    "Grouping",
    "GroupingInputs",
    "balanced_assign",
    "balanced_kmeans",
    "register_grouping",
]
