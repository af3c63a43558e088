"""What the fitted router regresses: each expert's activation mass, or its contribution to the FFN output."""

from __future__ import annotations

import pytest
import torch

from brickwork.errors import BrickworkError
from brickwork.grouping.base import Grouping
from brickwork.models.specs import FFNWeights
from brickwork.routing.base import RouterInputs
from brickwork.routing.fitted import FittedRouter


def _inputs(n=64, d=6, f=8):
    g = torch.Generator().manual_seed(0)
    weights = FFNWeights(up=torch.randn(f, d, generator=g), down=torch.randn(d, f, generator=g))
    grouping = Grouping(shared=torch.tensor([0, 1]), experts=torch.tensor([[2, 5], [3, 4], [6, 7]]))
    hidden = torch.randn(n, f, generator=g)
    x = torch.randn(n, d, generator=g)
    return RouterInputs(weights, grouping, {}, None, x, hidden, active=1)


def test_output_norm_is_each_experts_contribution_to_the_output():
    inputs = _inputs()
    norms = inputs.expert_importance("output")
    h, down = inputs.hidden, inputs.weights.down
    for e, neurons in enumerate(inputs.grouping.experts.tolist()):
        expected = (h[:, neurons] @ down[:, neurons].t()).norm(dim=-1)
        torch.testing.assert_close(norms[:, e], expected)
    torch.testing.assert_close(inputs.expert_importance("mass"), inputs.expert_mass())
    with pytest.raises(BrickworkError, match="mass' or 'output'"):
        inputs.expert_importance("loss")


def test_fitted_router_fits_the_chosen_target():
    inputs = _inputs()
    by_mass, by_output = FittedRouter.build(inputs), FittedRouter.build(inputs, target="output")
    assert not torch.allclose(by_mass.weight, by_output.weight)
    # the fit is the ridge regression of that target: its residual is smaller than the other fit's on it
    target = inputs.expert_importance("output")
    residual = lambda r: (r(inputs.inputs, None) - target).pow(2).sum()  # noqa: E731
    assert residual(by_output) < residual(by_mass)
