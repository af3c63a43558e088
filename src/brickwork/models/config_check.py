"""Checking a model's ``config.json`` before anything is built from it, and the settings a carve records of it.

transformers builds a model from whatever ``config.json`` says: a negative ``intermediate_size`` fails deep inside
torch, an unknown ``hidden_act`` with a bare KeyError, and ``rms_norm_eps: NaN`` or an activation changed from
silu to relu load without a word and compute something else. :func:`check_config_fields` refuses the first kind
with the field's name; :func:`recorded_settings` is what a carve writes of its base config (activation, norm
epsilon) so that :func:`check_recorded_settings` can refuse the second kind on load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from brickwork.errors import BrickworkError

# Sizes: a positive integer (or null, where transformers derives the value).
SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "n_embd",
    "n_inner",
    "n_layer",
    "n_head",
    "n_positions",
)
# Norm epsilons: a finite number > 0.
EPS_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")
# Activations: a name transformers knows.
ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config_fields(config: Mapping, where: str) -> None:
    """Refuse (BrickworkError naming the field) a config whose sizes, norm epsilons or activations no model can
    be built from; ``where`` names the file in the message."""
    from transformers.activations import ACT2CLS

    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise BrickworkError(f"{where}: {key} is {value!r}, not a positive integer; restore the config")
    for key in EPS_KEYS:
        value = config.get(key)
        if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
            raise BrickworkError(f"{where}: {key} is {value!r}, not a finite number > 0; restore the config")
    for key in ACTIVATION_KEYS:
        value = config.get(key)
        if value is not None and (not isinstance(value, str) or value not in ACT2CLS):
            raise BrickworkError(
                f"{where}: {key} is {value!r}, not an activation transformers knows ({', '.join(sorted(ACT2CLS))})"
            )


def recorded_settings(config) -> dict:
    """The activation and norm settings of ``config`` (a transformers config) that a carve was made with."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: values[key] for key in (*ACTIVATION_KEYS, *EPS_KEYS) if values.get(key) is not None}


def check_recorded_settings(recorded, config, where: str) -> None:
    """Refuse a ``config`` whose activation or norm settings differ from the ``recorded`` ones (BrickworkError)."""
    if not isinstance(recorded, dict) or not all(isinstance(k, str) for k in recorded):
        raise BrickworkError(f"{where}: base_settings is {recorded!r}, not an object; save the model again")
    current = recorded_settings(config)
    for key, value in recorded.items():
        if current.get(key) != value:
            raise BrickworkError(
                f"{where}: config.json's {key} is {current.get(key)!r}, the carve was made with {value!r}; restore "
                "config.json (the carved weights compute the recorded setting)"
            )
