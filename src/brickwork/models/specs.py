"""Where the FFN lives in each supported architecture, described as data.

Every spec says, relative to the model's ``base_model``, where the list of blocks is and, relative to one
block, where the FFN's projections and activation are. :class:`FFN` turns that into the canonical view
brickwork works with everywhere else::

    h = act(gate @ x + gate_bias) * (up @ x + up_bias)     # gated FFNs (SwiGLU, GeGLU)
    h = act(up @ x + up_bias)                               # plain FFNs
    y = down @ h + down_bias

with ``up``/``gate`` of shape ``[F, D]`` and ``down`` of shape ``[D, F]``. Fused ``gate_up`` projections
(Phi-3) and GPT-2's transposed ``Conv1D`` weights are handled here, once. To support a new architecture, add
one :class:`FFNSpec` to :data:`FFN_SPECS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from brickwork.errors import BrickworkError


@dataclass(frozen=True)
class FFNSpec:
    """Paths (dotted attribute names) of one architecture's FFN pieces."""

    layers: str  # ModuleList of blocks, relative to model.base_model
    down: str  # relative to a block; its input is h
    act: str  # activation module, relative to a block
    up: str | None = None  # separate up projection
    gate: str | None = None  # separate gate projection
    gate_up: str | None = None  # fused [gate; up] projection, gate first (Phi-3)
    module: str | None = None  # the whole FFN as one module (x -> y), when the architecture has one
    layout: Literal["linear", "conv1d"] = "linear"  # conv1d stores weights as [in, out]

    def __post_init__(self) -> None:
        if (self.up is None) == (self.gate_up is None):
            raise ValueError("an FFNSpec names exactly one of `up` and `gate_up`")


_GATED = FFNSpec(
    layers="layers",
    module="mlp",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    act="mlp.act_fn",
)

FFN_SPECS: dict[str, FFNSpec] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,  # GeGLU with gelu_pytorch_tanh, like gemma2
    "phi3": FFNSpec(
        layers="layers",
        module="mlp",
        gate_up="mlp.gate_up_proj",
        down="mlp.down_proj",
        act="mlp.activation_fn",
    ),
    "gpt2": FFNSpec(
        layers="h", module="mlp", up="mlp.c_fc", down="mlp.c_proj", act="mlp.act", layout="conv1d"
    ),
    "opt": FFNSpec(layers="decoder.layers", up="fc1", down="fc2", act="activation_fn"),
    "gpt_neox": FFNSpec(
        layers="layers", module="mlp", up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", act="mlp.act"
    ),
    "bert": FFNSpec(
        layers="encoder.layer",
        up="intermediate.dense",
        down="output.dense",
        act="intermediate.intermediate_act_fn",
    ),
}

# Architectures whose FFNs are already mixtures of experts: carving them again is not what brickwork does.
MOE_MODEL_TYPES = frozenset(
    {
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "qwen3_next",
        "deepseek_v2",
        "deepseek_v3",
        "olmoe",
        "dbrx",
        "jamba",
        "granitemoe",
        "granitemoeshared",
        "granitemoehybrid",
        "phimoe",
        "gpt_oss",
        "llama4",
        "switch_transformers",
        "nllb_moe",
        "jetmoe",
        "minimax",
        "ernie4_5_moe",
        "glm4_moe",
        "dots1",
        "hunyuan_v1_moe",
        "flex_olmo",
    }
)


def _resolve(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def spec_for(model: nn.Module) -> FFNSpec:
    """The FFN spec of ``model``'s architecture, or a clear error saying why there is none."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise BrickworkError(
            "brickwork works on Hugging Face transformers models (no `config.model_type` found)."
        )
    if (
        model_type in MOE_MODEL_TYPES
        or getattr(config, "num_local_experts", 0)
        or getattr(config, "num_experts", 0)
    ):
        raise BrickworkError(
            f"model_type '{model_type}' is already a mixture-of-experts model; brickwork carves dense FFNs."
        )
    if model_type not in FFN_SPECS:
        raise BrickworkError(
            f"model_type '{model_type}' is not supported. Supported: {', '.join(sorted(FFN_SPECS))}. "
            "To add it, put an FFNSpec naming where its FFN projections live into "
            "brickwork.models.specs.FFN_SPECS."
        )
    return FFN_SPECS[model_type]


@dataclass
class FFNWeights:
    """An FFN's weights in canonical orientation (detached copies are the caller's choice)."""

    up: torch.Tensor  # [F, D]
    down: torch.Tensor  # [D, F]
    gate: torch.Tensor | None = None  # [F, D]
    up_bias: torch.Tensor | None = None  # [F]
    gate_bias: torch.Tensor | None = None  # [F]
    down_bias: torch.Tensor | None = None  # [D]

    @property
    def d_ff(self) -> int:
        return self.up.shape[0]

    @property
    def d_model(self) -> int:
        return self.up.shape[1]


class FFN:
    """One FFN inside a model, read and written through its architecture's spec."""

    def __init__(self, model: nn.Module, spec: FFNSpec, index: int, block: nn.Module, block_path: str):
        self.model = model
        self.spec = spec
        self.index = index
        self.block = block
        self.block_path = block_path

    def __repr__(self) -> str:
        return f"FFN(layer={self.index}, {self.block_path}, d_ff={self.d_ff})"

    def _get(self, path: str | None) -> nn.Module | None:
        return None if path is None else _resolve(self.block, path)

    @property
    def down_module(self) -> nn.Module:
        """The down projection; its input is h."""
        return self._get(self.spec.down)

    @property
    def input_module(self) -> nn.Module:
        """The module whose input is the FFN input x (the first projection)."""
        return self._get(self.spec.gate_up or self.spec.up)

    @property
    def module(self) -> nn.Module | None:
        """The whole FFN as one module, where the architecture has one."""
        return self._get(self.spec.module)

    @property
    def activation(self) -> nn.Module:
        return self._get(self.spec.act)

    @property
    def is_gated(self) -> bool:
        return self.spec.gate is not None or self.spec.gate_up is not None

    @property
    def d_ff(self) -> int:
        return self._weight(self.spec.down).shape[1]

    def _weight(self, path: str) -> torch.Tensor:
        """A projection's weight as [out, in], whatever the storage layout."""
        weight = self._get(path).weight
        return weight.t() if self.spec.layout == "conv1d" else weight

    def _bias(self, path: str) -> torch.Tensor | None:
        return getattr(self._get(path), "bias", None)

    def read(self) -> FFNWeights:
        """The FFN's weights in canonical orientation (views of the model's tensors where possible)."""
        spec = self.spec
        if spec.gate_up is not None:
            gate, up = self._weight(spec.gate_up).chunk(2, dim=0)
            bias = self._bias(spec.gate_up)
            gate_bias, up_bias = bias.chunk(2) if bias is not None else (None, None)
        else:
            up, up_bias = self._weight(spec.up), self._bias(spec.up)
            gate = self._weight(spec.gate) if spec.gate else None
            gate_bias = self._bias(spec.gate) if spec.gate else None
        return FFNWeights(
            up=up,
            down=self._weight(spec.down),
            gate=gate,
            up_bias=up_bias,
            gate_bias=gate_bias,
            down_bias=self._bias(spec.down),
        )

    @torch.no_grad()
    def write(self, weights: FFNWeights) -> None:
        """Copy canonical weights back into the model (shapes must match the model's)."""
        spec = self.spec

        def put(path: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
            module = self._get(path)
            stored = weight.t() if spec.layout == "conv1d" else weight
            if module.weight.shape != stored.shape:
                raise BrickworkError(
                    f"{self.block_path}.{path}: weight shape {tuple(stored.shape)} does not fit "
                    f"{tuple(module.weight.shape)}"
                )
            module.weight.copy_(stored)
            if bias is not None:
                module.bias.copy_(bias)

        if spec.gate_up is not None:
            bias = None
            if weights.up_bias is not None:
                bias = torch.cat([weights.gate_bias, weights.up_bias])
            put(spec.gate_up, torch.cat([weights.gate, weights.up], dim=0), bias)
        else:
            put(spec.up, weights.up, weights.up_bias)
            if spec.gate:
                put(spec.gate, weights.gate, weights.gate_bias)
        put(spec.down, weights.down, weights.down_bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """h for FFN input x, computed from the canonical weights (the reference the hooks are checked against)."""
        w = self.read()
        up = nn.functional.linear(x, w.up, w.up_bias)
        if w.gate is None:
            return self.activation(up)
        return self.activation(nn.functional.linear(x, w.gate, w.gate_bias)) * up


def find_ffns(model: nn.Module) -> list[FFN]:
    """Every FFN of ``model``, in layer order."""
    spec = spec_for(model)
    base = getattr(model, "base_model", model)
    try:
        blocks = _resolve(base, spec.layers)
    except AttributeError as exc:
        raise BrickworkError(
            f"{type(model).__name__} has no '{spec.layers}' under its base model; "
            "its FFNSpec does not match this class."
        ) from exc
    prefix = next((name for name, module in model.named_modules() if module is blocks), spec.layers)
    return [FFN(model, spec, i, block, f"{prefix}.{i}") for i, block in enumerate(blocks)]
