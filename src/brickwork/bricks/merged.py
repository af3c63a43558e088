"""Merged bricks: one carved layer holding several children's bricks and a linear domain router over them.

The module side of :mod:`brickwork.ops.merge` (which builds them from children of one carve, Branch-Train-MiX):
each token runs the bricks of its top-scoring child. Here, below the I/O layer, so that saving and loading need
not import the operations.
"""

from __future__ import annotations

import torch
from torch import nn

from brickwork.bricks.module import BrickFFN


class MergedBricks(nn.Module):
    """One carved layer of a merged model: ``branches`` (the children's BrickFFNs, one spec) and a linear domain
    router ``scores = x domain_weight^T + domain_bias`` over the layer's FFN input. Each token runs the branch of
    its highest score (ties: the lowest index), scored in float64 so that the choice does not depend on the
    batch; its output is what that branch computes for it."""

    def __init__(self, branches: list[BrickFFN]):
        super().__init__()
        if len(branches) < 2:
            raise ValueError(f"a merged layer holds at least 2 children's bricks, got {len(branches)}")
        spec = branches[0].spec
        for i, branch in enumerate(branches[1:], 1):
            if branch.spec != spec:
                raise ValueError(f"branch {i}'s spec differs from branch 0's: {branch.spec} vs {spec}")
        self.branches = nn.ModuleList(branches)
        dtype = getattr(torch, spec.dtype)
        self.domain_weight = nn.Parameter(torch.zeros(len(branches), spec.d_model, dtype=dtype))
        self.domain_bias = nn.Parameter(torch.zeros(len(branches), dtype=dtype))

    @property
    def merged_children(self) -> int:
        """How many children's bricks the layer holds (:func:`carved_layers` refuses modules that have this)."""
        return len(self.branches)

    @property
    def spec(self):
        """The branches' one spec."""
        return self.branches[0].spec

    @property
    def d_model(self) -> int:
        return self.spec.d_model

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """``[T]``: the branch each token of ``x [T, D]`` runs."""
        scores = x.double() @ self.domain_weight.double().t() + self.domain_bias.double()
        return scores.argmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.d_model)
        choice = self.route(flat)
        out = torch.empty_like(flat)
        for i, branch in enumerate(self.branches):
            rows = torch.nonzero(choice == i).squeeze(1)
            if rows.numel():
                out = out.index_copy(0, rows, branch(flat.index_select(0, rows)))
        return out.view(x.shape)

    def read_fraction(self) -> float:
        """FFN weights read per token (one branch's, and the domain router's) / dense FFN weights."""
        branch = self.branches[0]
        router = self.domain_weight.numel() + self.domain_bias.numel()
        return branch.read_fraction() + router / (branch.d_ff * branch.weights_per_neuron)

    def extra_repr(self) -> str:
        return f"children={len(self.branches)}, top-1 linear domain router"


def layer_modules(model: nn.Module) -> dict[int, BrickFFN | MergedBricks]:
    """Each carved layer of a carved or merged model, by layer index: its BrickFFN, or its MergedBricks."""
    from brickwork.bricks.state import carve_state

    state = carve_state(model)
    if state is None:
        return {}
    modules = {index: layer.module() for index, layer in sorted(state.layers.items())}
    return {index: m for index, m in modules.items() if isinstance(m, (BrickFFN, MergedBricks))}
