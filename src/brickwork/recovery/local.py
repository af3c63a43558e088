"""Layer-local recovery: refit each carved layer so that it reproduces its dense FFN on its own inputs.

Layer by layer, in order: the inputs ``x`` of a carved layer are captured from the carved model itself, with
every earlier layer already recovered (so the errors earlier layers leave are what this one is fitted on), and
the target is the dense FFN's output on those same inputs, ``y = W_down (act(W_gate x) * W_up x)`` with the
layer's original weights. Then, in closed form (no back-propagation, seconds per layer on a CPU):

1. a ``fitted`` router is refitted (ridge regression of each expert's dense activation mass on ``x``, with or
   without intercept as the router had), so routing follows the inputs the carved model really produces;
2. the down projection is refitted to the routed activations: with ``H`` the ``[N, F]`` activations the
   carved layer passes to its down projection (zero for unselected experts and dropped down rows),
   ``W = argmin ||H W - y||^2 + lambda ||W - W0||^2``, one ``F x F`` solve. The neurons that remain carry
   what the dropped ones contributed on average, the least-squares compensation of pruning-by-reconstruction
   (e.g. Kim et al. 2024 / FLAP, An et al. 2024; here per routed activation pattern).

Held-out tokens (a tenth of those captured) measure the layer's relative reconstruction error before and after.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from brickwork.bricks.carve import carved_layers
from brickwork.bricks.module import BrickFFN
from brickwork.errors import BrickworkError

logger = logging.getLogger(__name__)


@dataclass
class LocalRecoveryConfig:
    tokens: int = 8192  # calibration tokens whose FFN inputs each layer is fitted on
    window: int = 512
    ridge: float = 1e-2  # lambda, relative to the mean diagonal of H^T H
    refit_router: bool = True
    holdout: float = 0.1  # share of the captured tokens kept out of the fit to measure it

    def __post_init__(self):
        if self.tokens < self.window:
            raise ValueError(f"tokens ({self.tokens}) must hold at least one window of {self.window}")
        if not 0 < self.holdout < 0.5:
            raise ValueError(f"holdout must be in (0, 0.5), got {self.holdout}")
        if self.ridge <= 0:
            raise ValueError("ridge must be positive")


@dataclass
class LayerRecovery:
    layer: int
    error_before: float  # held-out ||carved(x) - dense(x)||^2 / ||dense(x)||^2
    error_after: float
    seconds: float


@dataclass
class RecoveryReport:
    mode: str
    layers: list[LayerRecovery] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture_inputs(model, brick: BrickFFN, windows: torch.Tensor) -> torch.Tensor:
    """The FFN inputs of ``brick`` on ``windows``, stopping each forward once they are seen."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        raise _Stop

    handle = brick.register_forward_pre_hook(hook)
    device = next(model.parameters()).device
    try:
        for batch in windows.split(4):
            with contextlib.suppress(_Stop):
                model(input_ids=batch.to(device))
    finally:
        handle.remove()
    return torch.cat(seen)


def _dense_output(weights, x: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) of the dense FFN with ``weights`` (stored neuron order) on ``x``."""
    up = x @ weights["up"].t()
    h = act(x @ weights["gate"].t()) * up if weights["gate"] is not None else act(up)
    return h @ weights["down_t"], h


def _relative_error(brick: BrickFFN, x: torch.Tensor, y: torch.Tensor) -> float:
    out = brick.forward_reference(x)
    return float(((out - y) ** 2).sum() / (y**2).sum().clamp_min(1e-30))


@torch.no_grad()
def _refit_layer(brick: BrickFFN, x: torch.Tensor, y: torch.Tensor, h_dense: torch.Tensor, config) -> None:
    from brickwork.routing.fitted import ridge_fit

    if config.refit_router and brick.router.kind == "fitted" and brick.num_experts:
        s, e, size = brick.num_shared, brick.num_experts, brick.expert_size
        mass = h_dense[:, s:].abs().view(-1, e, size).sum(-1)
        intercept = bool(brick.router.bias.abs().max() > 0)
        weight, bias = ridge_fit(x, mass, intercept=intercept)
        brick.router.weight.copy_(weight.to(brick.router.weight.dtype))
        brick.router.bias.copy_(bias.to(brick.router.bias.dtype))
    h = brick.masked_hidden(x).double()
    target = y.double() - (brick.down_bias.double() if brick.down_bias is not None else 0)
    gram = h.t() @ h
    lam = config.ridge * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(lam)
    w0 = brick.down_t.double()
    w = torch.linalg.solve(gram, h.t() @ target + lam * w0)
    brick.down_t.copy_(w.to(brick.down_t.dtype))


def recover_local_(
    model, tokenizer, calib, config: LocalRecoveryConfig | None = None, progress: bool = True
) -> RecoveryReport:
    """Refit every carved layer of ``model`` in place (router and down projection), layer by layer."""
    from brickwork.data.sources import token_windows

    config = config or LocalRecoveryConfig()
    bricks = carved_layers(model)
    if not bricks:
        raise BrickworkError("the model has no carved layer to recover: carve it first")
    started = time.perf_counter()
    windows = token_windows(tokenizer, calib, config.window, config.tokens)
    # the dense targets come from each layer's weights as carved, before anything is refitted
    dense = {
        i: {
            "up": b.up.detach().clone(),
            "gate": None if b.gate is None else b.gate.detach().clone(),
            "down_t": b.down_t.detach().clone(),
        }
        for i, b in bricks.items()
    }
    if any(b.up_bias is not None or b.gate_bias is not None for b in bricks.values()):
        raise BrickworkError(
            "local recovery supports FFNs without input biases (Llama-style models); this one has them"
        )
    report = RecoveryReport(mode="local")
    generator = torch.Generator().manual_seed(0)
    for index, brick in tqdm(sorted(bricks.items()), desc="recovering", unit="layer", disable=not progress):
        layer_started = time.perf_counter()
        x = _capture_inputs(model, brick, windows).float()
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        held = max(1, int(config.holdout * x.shape[0]))
        x_fit, x_held = x[order[held:]], x[order[:held]]
        with torch.no_grad():
            y_fit, h_fit = _dense_output(dense[index], x_fit, brick.act)
            y_held, _ = _dense_output(dense[index], x_held, brick.act)
            if brick.down_bias is not None:
                y_fit, y_held = y_fit + brick.down_bias, y_held + brick.down_bias
            before = _relative_error(brick, x_held, y_held)
            _refit_layer(brick, x_fit, y_fit, h_fit, config)
            after = _relative_error(brick, x_held, y_held)
        report.layers.append(LayerRecovery(index, before, after, time.perf_counter() - layer_started))
        logger.info("layer %d: held-out relative error %.4f -> %.4f", index, before, after)
    report.seconds = time.perf_counter() - started
    return report
