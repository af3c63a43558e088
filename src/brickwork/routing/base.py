"""Routers: modules that score a layer's routed experts for each token; the router registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from brickwork.errors import BrickworkError
from brickwork.grouping.base import Grouping
from brickwork.models.specs import FFNWeights

if TYPE_CHECKING:
    from brickwork.bricks.module import BrickFFN


@dataclass
class RouterInputs:
    """What a router may be built from, for one FFN."""

    weights: FFNWeights  # the dense FFN, canonical orientation, original neuron order
    grouping: Grouping
    stats: dict[str, torch.Tensor]  # the layer's profile statistics
    coactivation: torch.Tensor | None
    inputs: torch.Tensor | None  # [N, D] calibration FFN inputs x
    hidden: torch.Tensor | None  # [N, F] the matching h, original neuron order
    active: int | None = None  # routed experts run per token (what routers trained to choose need to know)

    def expert_mass(self) -> torch.Tensor:
        """[N, E] activation mass of each routed expert on the calibration tokens: sum of |h| over its neurons."""
        if self.hidden is None:
            raise BrickworkError("this router fits on calibration activations: calibrate with samples=True")
        return self.hidden.abs()[:, self.grouping.experts].sum(-1)

    def expert_output_norm(self) -> torch.Tensor:
        """[N, E] norm of each routed expert's contribution to the FFN output, ``||sum_{i in e} h_i down_i||``:
        what leaving the expert out changes, where the activation mass ignores the down rows' sizes."""
        if self.hidden is None:
            raise BrickworkError("this router fits on calibration activations: calibrate with samples=True")
        h, down = self.hidden.float(), self.weights.down.float()
        return torch.stack(
            [(h[:, neurons] @ down[:, neurons].t()).norm(dim=-1) for neurons in self.grouping.experts], dim=1
        )

    def expert_importance(self, target: str) -> torch.Tensor:
        """The per-token expert scores a router is fitted to: ``mass`` or ``output`` (see above)."""
        if target not in ("mass", "output"):
            raise BrickworkError(f"router target must be 'mass' or 'output', got {target!r}")
        return self.expert_mass() if target == "mass" else self.expert_output_norm()


class Router(nn.Module):
    """Scores ``[T, E]`` for the routed experts of one BrickFFN; the top ``active`` are run.

    Subclasses set ``kind`` (their registry name) and implement :meth:`forward`, :meth:`weights_read` (weights a
    token reads to be routed, for the active-fraction figure) and :meth:`extra_config` (what ``empty`` needs,
    besides the shapes, to rebuild the router before its state dict is loaded).
    """

    kind: str = ""
    needs_samples: bool = False  # whether build() fits on calibration (x, h) pairs
    # What the scores are, for the kernels (brickwork.kernels.ROUTING picks each path's routing by it):
    # "scores": whatever forward() computes, scored in torch as the reference path scores it (any router);
    # "linear": x W^T + b with (W, b) = linear_form(), routed inside the compiled kernels;
    # "partial": PartialInputRouter's estimate from each token's largest inputs, routed inside the kernels.
    computes: str = "scores"
    # Whether the scores estimate each expert's activation mass (non-negative, and additive over experts), so
    # that a share of a token's total means something: per-token budgets of the ``sum`` rule keep experts by
    # their share of these scores, clamped at 0 (brickwork.bricks.adaptive); other routers' are refused.
    predicts_mass: bool = False

    def forward(self, x: torch.Tensor, brick: BrickFFN) -> torch.Tensor:
        raise NotImplementedError

    def weights_read(self, brick: BrickFFN, routed: int | None = None) -> int:
        """Weights a token reads to be routed (its parameters, by default) when it runs ``routed`` experts (None:
        ``brick.active``; routers that reuse their work for the experts they select read more for fewer)."""
        return sum(p.numel() for p in self.parameters())

    def extra_config(self) -> dict:
        return {}

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(W [E, D], b [E] or None)`` when the scores are ``x W^T + b``, else None (export needs this)."""
        return None

    @classmethod
    def empty(cls, num_experts: int, d_model: int, d_ff: int, gated: bool, **extra) -> Router:
        """An uninitialised router of the right shapes, to load a saved state dict into."""
        raise NotImplementedError


ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Register a Router subclass; its ``build(inputs)`` classmethod constructs it from calibration data."""
    ROUTERS[cls.kind] = cls
    return cls


def topk_by_position(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[T, k]`` indices of each row's k largest scores, ties broken by position (the lower index first), as the
    kernels' selection breaks them (``torch.topk`` leaves the order of ties unspecified)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
