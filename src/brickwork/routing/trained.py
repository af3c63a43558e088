"""``trained``: a linear router trained, layer by layer, to choose the experts the oracle would choose.

The ``fitted`` router regresses each expert's activation mass on the FFN input (MoEfication, Zhang et al.
2022). Regression spends its capacity on predicting every expert's mass, while routing only needs the order
at the top-k boundary. Following MoEfication's trained routers (the experts with the largest mass as labels)
and Mixture-of-Experts gates trained as classifiers, this router starts from the ridge fit and is trained on
the calibration samples with a listwise cross-entropy: ``softmax(x W^T + b)`` against the oracle's choice
(the ``active`` experts of largest mass, ``sum_{i in e} |h_i|``), each chosen expert weighted by its share of
the chosen mass, so that missing a heavy expert costs more than missing a light one.

It stays a plain linear gate (``intercept=False`` gives the stock ``x W^T`` of Mixtral and Qwen2-MoE), so the
kernels and export treat it as ``fitted``. Training is deterministic (seeded minibatches on the CPU), and
one-eighth of the samples is held out: the trained weights are kept only where they capture more of the
oracle's mass on those samples than the ridge fit does; otherwise the layer keeps the ridge fit, and the
log says so.

Measured on SmolLM2 (bench/results/granularity-smollm2): it captures more of the oracle's mass than ``fitted``
but gives no better perplexity (a little worse at 64-192 experts), so ``fitted`` stays the default; activation
mass is the wrong training target, and this module is the place to try a better one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from brickwork.divergence import DivergenceGuard
from brickwork.errors import BrickworkError
from brickwork.routing.base import Router, RouterInputs, RouterOptions, register_router, router_option
from brickwork.routing.fitted import FittedRouter, ridge_fit

logger = logging.getLogger(__name__)

BATCH = 1024


def captured_mass(scores: torch.Tensor, mass: torch.Tensor, active: int) -> float:
    """Share of the oracle's top-``active`` mass that the top-``active`` of ``scores`` capture (1 = oracle)."""
    chosen = mass.gather(1, scores.topk(active, dim=1).indices).sum()
    best = mass.topk(active, dim=1).values.sum()
    return (chosen / best.clamp_min(1e-30)).item()


def oracle_targets(mass: torch.Tensor, active: int) -> torch.Tensor:
    """``[N, E]`` target distributions: the oracle's ``active`` experts, weighted by their mass."""
    top = mass.topk(active, dim=1)
    targets = torch.zeros_like(mass).scatter_(1, top.indices, top.values.clamp_min(0))
    return targets / targets.sum(1, keepdim=True).clamp_min(1e-30)


def train_linear_router(
    x: torch.Tensor,
    mass: torch.Tensor,
    active: int,
    intercept: bool,
    steps: int,
    lr: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Weights ``[E, D]`` and bias ``[E]`` of a linear router trained as above, with its held-out figures."""
    x, mass = x.float(), mass.float()
    held = max(1, len(x) // 8)
    x_fit, mass_fit, x_val, mass_val = x[:-held], mass[:-held], x[-held:], mass[-held:]
    weight0, bias0 = ridge_fit(x_fit, mass_fit, intercept=intercept)
    weight0, bias0 = weight0.float(), bias0.float()
    # Selection depends only on each token's order of scores: scale the start to unit-spread scores, so that the
    # softmax starts neither flat nor saturated.
    scale = (x_fit @ weight0.t() + bias0).std().clamp_min(1e-12)
    weight = (weight0 / scale).clone().requires_grad_(True)
    bias = (bias0 / scale).clone().requires_grad_(intercept)
    params = [weight, bias] if intercept else [weight]
    optimizer = torch.optim.Adam(params, lr=lr)
    targets = oracle_targets(mass_fit, active)
    generator = torch.Generator().manual_seed(seed)
    guard = DivergenceGuard(
        [("router weight", weight), ("router bias", bias)], hint="lower the router option lr"
    )
    with torch.enable_grad():  # carving runs under no_grad
        for step in range(steps):
            batch = torch.randint(len(x_fit), (min(BATCH, len(x_fit)),), generator=generator)
            logits = x_fit[batch] @ weight.t() + bias
            loss = -(targets[batch] * torch.log_softmax(logits, dim=1)).sum(1).mean()
            guard.check_loss(loss, step + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            guard.check_weights(step + 1)
    with torch.no_grad():
        before = captured_mass(x_val @ weight0.t() + bias0, mass_val, active)
        after = captured_mass(x_val @ weight.t() + bias, mass_val, active)
    report = {"held_out_captured_before": before, "held_out_captured_after": after, "kept": after >= before}
    if after < before:
        return weight0, bias0, report
    return weight.detach(), bias.detach(), report


@dataclass(frozen=True)
class TrainedOptions(RouterOptions):
    intercept: bool = router_option(True, "train a bias (false: the bias-free gate stock MoE formats hold)")
    steps: int = router_option(300, "training steps per layer", lambda v: v >= 0, "an integer >= 0")
    lr: float = router_option(1e-2, "learning rate", lambda v: v > 0, "a number > 0")
    seed: int = router_option(0, "seed of the minibatch order", lambda v: v >= 0, "an integer >= 0")


@register_router
class TrainedRouter(FittedRouter):
    kind = "trained"
    needs_samples = True
    predicts_mass = False  # softmax logits trained to rank experts, not a regression of their mass
    Options = TrainedOptions

    refit = Router.refit  # kept as trained: a ridge refit would undo the training

    @classmethod
    def build(
        cls,
        inputs: RouterInputs,
        intercept: bool = True,
        steps: int = 300,
        lr: float = 1e-2,
        seed: int = 0,
    ) -> TrainedRouter:
        if inputs.inputs is None or inputs.active is None:
            raise BrickworkError(
                "the trained router fits on calibration samples: calibrate with samples=True"
            )
        mass = inputs.expert_mass()
        if inputs.active >= mass.shape[1]:  # every routed expert runs: nothing to choose
            weight, bias = ridge_fit(inputs.inputs, mass, intercept=intercept)
        else:
            weight, bias, report = train_linear_router(
                inputs.inputs, mass, inputs.active, intercept, steps, lr, seed
            )
            logger.info(
                "trained router: held-out share of the oracle's mass %.3f (ridge fit) -> %.3f%s",
                report["held_out_captured_before"],
                report["held_out_captured_after"],
                "" if report["kept"] else "; the ridge fit is kept",
            )
        dtype = inputs.weights.up.dtype
        return cls(weight.to(dtype), bias.to(dtype))
