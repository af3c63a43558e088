"""Streaming statistics of FFN neurons on calibration text."""

from brickwork.profiling.hooks import FFNCapture
from brickwork.profiling.profile import Profile, ProfileConfig, profile
from brickwork.profiling.stats import NeuronStats

__all__ = ["FFNCapture", "NeuronStats", "Profile", "ProfileConfig", "profile"]
