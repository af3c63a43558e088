"""Layer-local recovery: refit each carved layer so that it reproduces its dense FFN on its own inputs.

Layer by layer, in order: the inputs ``x`` of a carved layer are captured from the carved model itself, with
every earlier layer already recovered (so the errors earlier layers leave are what this one is fitted on), and
the target is the dense FFN's output on those same inputs, ``y = W_down (act(W_gate x) * W_up x)`` with the
layer's original weights. Then, in closed form (no back-propagation, seconds per layer on a CPU):

1. a router that refits (:meth:`Router.refit`; the ``fitted`` router: ridge regression of each expert's dense activation mass on ``x``, with or
   without intercept as the router had), so routing follows the inputs the carved model really produces; a
   weighted combine rule's temperature and scale are fitted again to it;
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
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from brickwork.bricks.module import BrickFFN
from brickwork.bricks.state import carved_layers, refuse_grown
from brickwork.errors import BrickworkError
from brickwork.models.specs import find_ffns

logger = logging.getLogger(__name__)


@dataclass
class LocalRecoveryConfig:
    """Layer-local recovery settings; the ``brickwork recover`` options read their help from here."""

    tokens: int = field(
        default=16384, metadata={"help": "local: calibration tokens whose FFN inputs each layer is fitted on"}
    )
    window: int = field(default=512, metadata={"help": "local: tokens per calibration sequence"})
    ridge: float = field(default=1e-2, metadata={"help": "lambda, relative to the mean diagonal of H^T H"})
    refit_router: bool = True
    holdout: float = field(default=0.1, metadata={"help": "share of the captured tokens kept out of the fit"})

    def __post_init__(self):
        for name, low in (("tokens", 1), ("window", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.tokens < self.window:
            raise ValueError(f"tokens ({self.tokens}) must hold at least one window of {self.window}")
        if not 0 < self.holdout < 0.5:
            raise ValueError(f"holdout must be in (0, 0.5), got {self.holdout}")
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge > 0):
            raise ValueError(f"ridge must be a finite number > 0, got {self.ridge!r}")


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


class _LayerStream:
    """The calibration windows' hidden states entering one decoder block after another.

    One forward pass records each block's call on every batch (the hidden states entering the first block,
    and every block's other arguments: attention masks, position embeddings); then :meth:`run` runs a single
    block on stored states. Fitting layer ``i`` thus costs one block's work, not a forward pass through the
    ``i`` blocks before it, and the states it sees come from the blocks before it as they are by then
    (recovered), which is what the model itself would compute.
    """

    def __init__(self, model, blocks: list[torch.nn.Module], windows: torch.Tensor, batch: int = 4):
        self.blocks = blocks
        self.calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
        self.hidden: list[torch.Tensor] = []
        device = next(model.parameters()).device

        def record(i):
            def hook(module, args, kwargs):
                if i == 0:
                    self.hidden.append(self._hidden(args, kwargs))
                # keep the other arguments only: every block's hidden states would hold the whole stream
                if args:
                    self.calls[i].append(((None, *args[1:]), kwargs))
                else:
                    self.calls[i].append((args, dict(kwargs, hidden_states=None)))
                if i == len(blocks) - 1:
                    raise _Stop
                return None

            return hook

        handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            with torch.no_grad():
                for ids in windows.split(batch):
                    with contextlib.suppress(_Stop):
                        model(input_ids=ids.to(device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if any(len(c) != len(self.hidden) for c in self.calls):
            raise BrickworkError("the decoder blocks were not each called once per batch")

    @staticmethod
    def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
        if args:
            return args[0]
        if "hidden_states" in kwargs:
            return kwargs["hidden_states"]
        raise BrickworkError("cannot find the hidden states among a decoder block's arguments")

    @torch.no_grad()
    def run(self, i: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.calls[i][batch]
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs = dict(kwargs, hidden_states=hidden)
        out = self.blocks[i](*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def capture(self, i: int, brick: BrickFFN) -> torch.Tensor:
        """The FFN inputs of ``brick`` (in block ``i``) on every batch, the rest of the block skipped."""
        seen: list[torch.Tensor] = []

        def hook(module, args):
            seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
            raise _Stop

        handle = brick.register_forward_pre_hook(hook)
        try:
            for b, hidden in enumerate(self.hidden):
                with contextlib.suppress(_Stop):
                    self.run(i, b, hidden)
        finally:
            handle.remove()
        return torch.cat(seen)

    def advance(self, i: int) -> None:
        """Replace the stored states by block ``i``'s outputs (the inputs of block ``i + 1``)."""
        self.hidden = [self.run(i, b, h) for b, h in enumerate(self.hidden)]
        self.calls[i] = []  # block i's arguments are not needed again


def _dense_output(brick: BrickFFN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) of the dense FFN that ``brick`` holds (every neuron, stored order) on ``x``, down bias aside."""
    h = brick.hidden(x, 0, brick.d_ff)
    return h @ brick.down_t, h


def _relative_error(brick: BrickFFN, x: torch.Tensor, y: torch.Tensor) -> float:
    out = brick.forward_reference(x)
    return float(((out - y) ** 2).sum() / (y**2).sum().clamp_min(1e-30))


@torch.no_grad()
def _refit_layer(brick: BrickFFN, x: torch.Tensor, y: torch.Tensor, h_dense: torch.Tensor, config) -> None:
    if config.refit_router:  # routers that refit say how (Router.refit); the others keep their weights
        brick.router.refit(brick, x, h_dense)
    if (
        brick.combine.weighted
    ):  # the weights follow the (refitted) router: fit their temperature and scale again
        from brickwork.carving.carve import refit_combine_

        step = max(1, len(x) // 8192)  # what carving fits them on, at most
        refit_combine_(brick, x[::step])
    h = brick.masked_hidden(x).float()
    target = y.float() - (brick.down_bias.float() if brick.down_bias is not None else 0)
    # The [F, F] and [F, D] products in fp32 (N x F x F is the cost; the relative rounding of the sums is
    # ~1e-6, far below the ridge term), the solve in fp64.
    gram = (h.t() @ h).double()
    lam = config.ridge * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(lam)
    w0 = brick.down_t.double()
    w = torch.linalg.solve(gram, (h.t() @ target).double() + lam * w0)
    brick.down_t.copy_(w.to(brick.down_t.dtype))


def recover_local_(
    model, tokenizer, calib, config: LocalRecoveryConfig | None = None, progress: bool = True
) -> RecoveryReport:
    """Refit every carved layer of ``model`` in place (router and down projection), layer by layer."""
    from brickwork.data.sources import token_windows

    config = config or LocalRecoveryConfig()
    bricks = carved_layers(model)
    refuse_grown(bricks, "recovery")
    if not bricks:
        raise BrickworkError("the model has no carved layer to recover: carve it first")
    started = time.perf_counter()
    windows = token_windows(tokenizer, calib, config.window, config.tokens)
    if any(b.up_bias is not None or b.gate_bias is not None for b in bricks.values()):
        raise BrickworkError(
            "local recovery supports FFNs without input biases (Llama-style models); this one has them"
        )
    report = RecoveryReport(mode="local")
    generator = torch.Generator().manual_seed(0)
    blocks = [ffn.block for ffn in find_ffns(model)]
    stream = _LayerStream(model, blocks[: max(bricks) + 1], windows)
    bar = tqdm(total=len(bricks), desc="recovering", unit="layer", disable=not progress)
    for index in range(max(bricks) + 1):
        brick = bricks.get(index)
        if brick is not None:
            layer_started = time.perf_counter()
            x = stream.capture(index, brick).float()
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            held = max(1, int(config.holdout * x.shape[0]))
            x_fit, x_held = x[order[held:]], x[order[:held]]
            with torch.no_grad():
                # the dense targets: the layer's weights as carved (all neurons, stored order), read before
                # _refit_layer changes its down projection; earlier layers' refits do not touch them
                y_fit, h_fit = _dense_output(brick, x_fit)
                y_held, _ = _dense_output(brick, x_held)
                if brick.down_bias is not None:
                    y_fit, y_held = y_fit + brick.down_bias, y_held + brick.down_bias
                before = _relative_error(brick, x_held, y_held)
                _refit_layer(brick, x_fit, y_fit, h_fit, config)
                after = _relative_error(brick, x_held, y_held)
            del x, x_fit, x_held, y_fit, h_fit, y_held
            report.layers.append(LayerRecovery(index, before, after, time.perf_counter() - layer_started))
            logger.info("layer %d: held-out relative error %.4f -> %.4f", index, before, after)
            bar.update()
        if index < max(bricks):
            stream.advance(index)
    bar.close()
    report.seconds = time.perf_counter() - started
    return report
