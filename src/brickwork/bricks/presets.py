"""The measured default configuration for a requested active fraction (``brickwork carve --active-fraction``).

Measured on SmolLM2-135M (bench/results/carving-quality): at equal FFN weight reads, neuron-level experts
routed by the ``partial`` router (TEAL-style partial-input activation estimates) beat every expert-level
configuration by a wide margin, and cheaper partial estimates (fewer inputs) pay off at low fractions.
"""

from __future__ import annotations

import math

from brickwork.bricks.config import CarveConfig


def partial_input_fraction(active_fraction: float) -> float:
    """Inputs the partial router reads: 1/4 from 40% active upward, 1/8 below (measured on SmolLM2)."""
    return 0.25 if active_fraction >= 0.4 else 0.125


def recommended(active_fraction: float, d_ff: int, gated: bool = True, **overrides) -> CarveConfig:
    """Neuron-level experts with the partial router, with as many active neurons as ``active_fraction`` of the
    FFN weights (router reads included) allows.

    Per token, a selected neuron reads ``(g + 1) D`` weights (g input projections and its down row) and the
    router reads ``q g D`` for each neuron it leaves out, so reads / dense = ``s + q g (1 - s) / (g + 1)``
    for a fraction s of neurons selected; solve for s.
    """
    if not 0 < active_fraction <= 1:
        raise ValueError(f"active_fraction must be in (0, 1], got {active_fraction}")
    q = partial_input_fraction(active_fraction)
    g = 2 if gated else 1
    router_share = q * g / (g + 1)
    selected = (active_fraction - router_share) / (1 - router_share)
    active = max(1, math.floor(selected * d_ff))
    options = {
        "experts": d_ff,
        "shared": 0,
        "active": min(active, d_ff),
        "method": "activation",
        "router": "partial",
        "router_options": {"input_fraction": q},
    }
    options.update({k: v for k, v in overrides.items() if v is not None})
    if options["router"] != "partial":  # another router was asked for: the partial router's option is not its
        options["router_options"] = {}
    return CarveConfig(**options)
