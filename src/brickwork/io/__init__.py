"""Saving and loading carved models."""

from brickwork.io.saving import load, save

__all__ = ["load", "save"]
