"""Brick operations on a carved model ("Configurable Foundation Models", Xiao et al. 2024): grow new bricks, update
the bricks a domain uses, merge bricks of several children, prune the bricks a domain never uses.

Each operation is one module and works on a carved model in memory; the result saves like any carve
(:func:`brickwork.save`). :mod:`brickwork.ops.usage` measures which bricks a text routes to, and
:mod:`brickwork.ops.train` is the next-token training loop grow and update share.
"""

from brickwork.ops.grow import GrowReport, grow_, remove_grown_
from brickwork.ops.merge import MergeReport, average_children, merge_children
from brickwork.ops.prune import PruneReport, prune_for_domain_
from brickwork.ops.update import UpdateReport, choose_bricks, update_
from brickwork.ops.usage import ExpertUsage, expert_usage

__all__ = [
    "ExpertUsage",
    "GrowReport",
    "MergeReport",
    "PruneReport",
    "UpdateReport",
    "average_children",
    "choose_bricks",
    "expert_usage",
    "grow_",
    "merge_children",
    "prune_for_domain_",
    "remove_grown_",
    "update_",
]
