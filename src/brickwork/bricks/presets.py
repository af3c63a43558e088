"""The measured default configuration for a requested active fraction (``brickwork carve --active-fraction``).

Measured on SmolLM2-135M (bench/results/carving-quality, 2,048 held-out tokens per corpus): at equal FFN
weight reads, neuron-level experts routed by the ``partial`` router (TEAL-style partial-input activation
estimates) with down-row sparsity on the exact activations beat every expert-level configuration by a wide
margin. The best settings found at each budget:

| reads | input_fraction | neurons computed | down rows | botchan | lee-news |
|---:|---:|---:|---:|---:|---:|
| 25% | 0.125 | 330 / 1536 | 12% | x8.77 | x11.56 |
| 50% | 0.375 | 576 / 1536 | 28% | x1.346 | x1.373 |
| 74% | 0.25 | 1152 / 1536 | 60% | x1.104 | x1.095 |
"""

from __future__ import annotations

import math

from brickwork.bricks.config import CarveConfig

# (active fraction, partial router input_fraction, fraction of neurons computed, fraction reading down rows)
MEASURED_BEST = ((0.25, 0.125, 330 / 1536, 0.12), (0.50, 0.375, 0.375, 0.28), (0.75, 0.25, 0.75, 0.60))


def recommended(
    active_fraction: float, d_ff: int, d_model: int, gated: bool = True, **overrides
) -> CarveConfig:
    """Neuron-level experts, partial router and down-row sparsity, reading at most ``active_fraction`` of the
    FFN weights per token (router included), with the settings measured best at the nearest budget.

    ``overrides`` (CarveConfig fields; None: not given) replace the measured settings; ``router_options`` are
    merged over the measured ones, and ``shared`` neurons are taken from the routed ones per token.

    Per token, with a fraction s of neurons computed and d = r s of them reading down rows, and the router
    reading q of the inputs of the neurons it leaves out: reads / dense = ``(g s + r s + g q (1 - s)) / (g + 1)``
    for g input projections (2 when gated); solve for s.
    """
    if not 0 < active_fraction <= 1:
        raise ValueError(f"active_fraction must be in (0, 1], got {active_fraction}")
    _, q, measured_computed, measured_down = min(
        MEASURED_BEST, key=lambda best: abs(best[0] - active_fraction)
    )
    r = measured_down / measured_computed
    q = math.ceil(q * d_model) / d_model  # the router reads whole input columns
    g = 2 if gated else 1
    computed = ((g + 1) * active_fraction - g * q) / (g + r - g * q)
    if computed >= 1:  # every neuron computed; spend what is left on down rows
        active, down = d_ff, (g + 1) * active_fraction - g
    else:
        active, down = max(1, math.floor(computed * d_ff)), r * computed
    down_rows = max(1, math.floor(down * d_ff))
    options = {
        "experts": d_ff,
        "shared": 0,
        "active": active,
        "method": "activation",
        "router": "partial",
        "router_options": {"input_fraction": q},
        "down_fraction": None if down_rows >= active else down_rows / d_ff,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    router_options = given.pop("router_options", None) or {}
    options.update(given)
    if options["router"] != "partial":  # another router was asked for: the partial router's option is not its
        options["router_options"] = {}
    options["router_options"] = {**options["router_options"], **router_options}  # given options win
    if "shared" in given and "active" not in given:
        # shared neurons run for every token: route that many fewer, so the budget still holds
        options["active"] = max(1, options["active"] - given["shared"])
    return CarveConfig(**options)
