"""Routers: each kind is one file registering a Router subclass with a ``build(RouterInputs)`` classmethod."""

from brickwork.routing import (  # noqa: F401  (registration)
    centroid,
    fitted,
    lowbit,
    lowrank,
    oracle,
    partial,
    representative,
    trained,
)
from brickwork.routing.base import ROUTERS, Router, RouterInputs, register_router

__all__ = ["ROUTERS", "Router", "RouterInputs", "register_router"]
