"""Routers: each kind is one file registering a Router subclass with a ``build(RouterInputs)`` classmethod."""

from brickwork.routing import centroid, fitted, lowrank, oracle, partial, representative, trained  # noqa: F401  (registration)
from brickwork.routing.base import ROUTERS, Router, RouterInputs, register_router

__all__ = ["ROUTERS", "Router", "RouterInputs", "register_router"]
