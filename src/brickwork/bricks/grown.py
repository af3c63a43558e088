"""Grown experts: new routed bricks beside a carved layer's, with their own sigmoid-gated router.

The module side of :mod:`brickwork.ops.grow` (which builds and trains them): a :class:`GrownExperts` bank hangs
on a :class:`~brickwork.bricks.BrickFFN` as ``brick.grown`` and adds its output to the brick's; :class:`GrownSpec`
is its record in ``brickwork.json``. Here, below the I/O layer, so that saving and loading need not import the
operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("ffn", "lora")
DEFAULT_RANK = 8  # rank of a low-rank expert when none is given
GATE_BIAS = -2.0  # the router bias the gates start from: sigmoid(-2) = 0.12, mostly closed


def _positive_int(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class GrownSpec:
    """One bank's shape: ``experts`` new routed experts of ``size`` neurons (``kind="ffn"``) or rank ``size``
    (``kind="lora"``), ``active`` of them selected per token."""

    kind: str
    experts: int
    size: int
    active: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        _positive_int("experts", self.experts)
        _positive_int("rank" if self.kind == "lora" else "expert_size", self.size)
        _positive_int("active", self.active)
        if self.active > self.experts:
            raise ValueError(f"active ({self.active}) must be in [1, experts = {self.experts}]")

    @property
    def size_key(self) -> str:
        return "rank" if self.kind == "lora" else "expert_size"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "experts": self.experts, self.size_key: self.size, "active": self.active}

    @classmethod
    def from_dict(cls, data) -> GrownSpec:
        """The spec a :meth:`to_dict` record holds; ValueError naming what is wrong otherwise."""
        if not isinstance(data, dict):
            raise ValueError(f"{data!r} is not an object")
        kind = data.get("kind")
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        size_key = "rank" if kind == "lora" else "expert_size"
        expected = {"kind", "experts", size_key, "active"}
        if set(data) != expected:
            raise ValueError(f"keys {sorted(data)} are not {sorted(expected)}")
        return cls(kind, data["experts"], data[size_key], data["active"])


class GrownExperts(nn.Module):
    """A bank of new routed experts for one carved layer, added to its BrickFFN's output.

    Rows are stored in expert order, ``size`` per expert: ``up`` ``[E * size, D]`` (a low-rank expert's A),
    ``gate`` (fresh gated neurons only, like the base FFN's) and ``down_t`` ``[E * size, D]`` (the output
    projection transposed; a low-rank expert's B transposed). The router ``router_weight [E, D]``,
    ``router_bias [E]`` picks the top ``active`` experts of each token; each selected expert's output is weighted
    by the sigmoid of its router score (its gate). Built empty (zeros); :meth:`initialise_` draws the start.
    """

    def __init__(
        self,
        spec: GrownSpec,
        d_model: int,
        activation: nn.Module | None = None,
        gated: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if spec.kind == "ffn" and activation is None:
            raise ValueError("fresh FFN experts need the layer's activation")
        self.spec = spec
        rows = spec.experts * spec.size

        def param(*shape):
            return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device))

        self.up = param(rows, d_model)
        self.gate = param(rows, d_model) if spec.kind == "ffn" and gated else None
        self.down_t = param(rows, d_model)
        self.router_weight = param(spec.experts, d_model)
        self.router_bias = param(spec.experts)
        # the layer's activation, shared with the brick: a plain attribute, not a submodule of the bank
        object.__setattr__(self, "_act", activation if spec.kind == "ffn" else None)

    @classmethod
    def for_brick(cls, brick, spec: GrownSpec) -> GrownExperts:
        """An empty bank of ``spec`` for ``brick``'s layer (its width, activation, gating, dtype and device)."""
        return cls(spec, brick.d_model, brick.act, brick.spec.gated, brick.up.dtype, brick.up.device)

    @torch.no_grad()
    def initialise_(self, generator: torch.Generator) -> GrownExperts:
        """The start: input rows and router random (std 1/sqrt(D), drawn on the CPU from ``generator`` so every
        device gets the same values), output rows zero (the bank adds exactly zero), gate bias :data:`GATE_BIAS`."""
        std = self.up.shape[1] ** -0.5
        for weight in (self.up, self.gate, self.router_weight):
            if weight is not None:
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)
        self.down_t.zero_()
        self.router_bias.fill_(GATE_BIAS)
        return self

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(selection [T, active], gates [T, active])``: each token's selected new experts and how open each is."""
        scores = nn.functional.linear(x, self.router_weight, self.router_bias)
        top = scores.topk(self.spec.active, dim=-1)
        return top.indices, torch.sigmoid(top.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        selection, gates = self.gates(x)
        weight = torch.zeros(x.shape[0], self.spec.experts, dtype=x.dtype, device=x.device)
        weight = weight.scatter(1, selection, gates.to(x.dtype))
        h = nn.functional.linear(x, self.up)
        if self.spec.kind == "ffn":
            h = self._act(h) if self.gate is None else self._act(nn.functional.linear(x, self.gate)) * h
        h = h.view(x.shape[0], self.spec.experts, self.spec.size) * weight[..., None]
        return (h.view(x.shape[0], -1) @ self.down_t).view(shape)

    def extra_repr(self) -> str:
        s = self.spec
        return f"kind={s.kind}, experts={s.experts}, {s.size_key}={s.size}, active={s.active}"
