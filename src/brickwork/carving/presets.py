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

from brickwork.carving.config import CarveConfig
from brickwork.routing.fitted import FittedRouter
from brickwork.routing.partial import PartialInputRouter, neuron_level_settings

NEURON_ROUTER = PartialInputRouter.kind  # the router of the neuron-level preset (recommended)
STOCK_ROUTER = FittedRouter.kind  # the router of the stock-exportable preset (stock_recommended)


def recommended(reads: float, d_ff: int, d_model: int, gated: bool = True, **overrides) -> CarveConfig:
    """Neuron-level experts, partial router and down-row sparsity, reading at most ``reads`` of the
    FFN weights per token (router included), with the settings measured best at the nearest budget.

    ``overrides`` (CarveConfig fields; None: not given) replace the measured settings; ``router_options`` are
    merged over the measured ones, and ``shared`` neurons are taken from the routed ones per token. The neuron
    counts come from :func:`brickwork.routing.partial.neuron_level_settings`.
    """
    if not 0 < reads <= 1:
        raise ValueError(f"reads must be in (0, 1], got {reads}")
    active, q, down_rows = neuron_level_settings(reads, d_ff, d_model, gated)
    options = {
        "experts": d_ff,
        "shared": 0,
        "active": active,
        "method": "activation",
        "router": NEURON_ROUTER,
        "router_options": {"input_fraction": q},
        "down_fraction": None if down_rows >= active else down_rows / d_ff,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    router_options = given.pop("router_options", None) or {}
    options.update(given)
    if (
        options["router"] != NEURON_ROUTER
    ):  # another router was asked for: the preset router's option is not its
        options["router_options"] = {}
    options["router_options"] = {**options["router_options"], **router_options}  # given options win
    if "shared" in given and "active" not in given:
        # shared neurons run for every token: route that many fewer, so the budget still holds
        options["active"] = max(1, options["active"] - given["shared"])
    return CarveConfig(**options)


# Stock-exportable carves: expert-level, a bias-free linear router and DeepSeek-V3's sigmoid combine rule, which
# glm4_moe (transformers, vLLM) and GGUF's glm4moe (llama.cpp) compute exactly. Sigmoid evaluated better than
# softmax (qwen2_moe) at every measured point, training-free and after distillation (bench/results/combine-smollm2,
# recovery-gpu-stock). Per budget, the number of experts per FFN from the SmolLM2 grid (bench/results/combine-smollm2):
# 64 evaluated better than 16; 192 better still at 50% but read 53.7%, not 50%; 1/8 of them shared.
MEASURED_STOCK = ((0.25, 64), (0.50, 64))


def stock_recommended(reads: float, d_ff: int, **overrides) -> CarveConfig:
    """The best measured stock-exportable configuration reading about ``reads`` of the FFN per token
    (``brickwork carve --reads F --stock``): ``experts`` from :data:`MEASURED_STOCK` at the nearest
    budget (or the divisor of ``d_ff`` nearest to it, in ratio, with at least 4 neurons per expert), 1/8 of them
    shared, method ``activation``, the ``fitted`` router without intercept, ``combine="sigmoid"`` (exports to
    ``glm4_moe`` and GGUF; ``combine="softmax"`` for ``qwen2_moe``).
    ``overrides`` (CarveConfig fields; None: not given) replace them."""
    if not 0 < reads <= 1:
        raise ValueError(f"reads must be in (0, 1], got {reads}")
    _, measured = min(MEASURED_STOCK, key=lambda best: abs(best[0] - reads))
    given = {k: v for k, v in overrides.items() if v is not None}
    divisors = [e for e in range(2, d_ff // 4 + 1) if d_ff % e == 0]
    if not divisors:
        raise ValueError(f"d_ff = {d_ff} has no divisor giving experts of at least 4 neurons")
    experts = given.pop("experts", None) or min(divisors, key=lambda e: abs(math.log(e / measured)))
    shared = given.pop("shared", None)
    shared = max(1, experts // 8) if shared is None else shared
    active = given.pop("active", None) or max(1, round(reads * experts) - shared)
    options = {
        "experts": experts,
        "shared": shared,
        "active": active,
        "method": "activation",
        "router": STOCK_ROUTER,
        "router_options": {"intercept": False},
        "combine": "sigmoid",
    }
    router_options = given.pop("router_options", None) or {}
    options.update(given)
    options["router_options"] = {**options["router_options"], **router_options}
    return CarveConfig(**options)
