"""Next-token training of chosen parameters on a user's text, everything else frozen: the loop grow and update
share (and the benchmark's full fine-tuning and LoRA baselines, so that all train on the same batches).

A parameter may come with a row mask (``masks[param]``, a bool tensor over its first dimension): only those rows
train. Their gradient elsewhere is zeroed before every step, and AdamW without weight decay then leaves the other
rows bit for bit as they were (their moments stay zero, so their update is exactly zero). Batches come in an order
fixed by ``seed``: the same inputs give the same trained model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from brickwork.divergence import DivergenceGuard
from brickwork.errors import BrickworkError


@dataclass
class TrainConfig:
    """Training settings of grow and update (``brickwork grow`` / ``update`` read their help from here)."""

    tokens: int = field(default=65536, metadata={"help": "training tokens; training stops after them"})
    window: int = field(default=256, metadata={"help": "tokens per training sequence"})
    batch_size: int = field(default=8, metadata={"help": "sequences per optimiser step"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate (AdamW, no weight decay)"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order"})

    def __post_init__(self):
        for name, low in (("tokens", 1), ("window", 2), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.tokens < self.window * self.batch_size:
            raise ValueError(
                f"tokens ({self.tokens}) must cover at least one batch (window x batch_size = "
                f"{self.window * self.batch_size})"
            )

    @property
    def steps(self) -> int:
        return self.tokens // (self.window * self.batch_size)


def batches(windows: torch.Tensor, config: TrainConfig) -> list[torch.Tensor]:
    """Every step's ``[batch_size, window]`` batch, in an order drawn from ``config.seed`` (windows reused in a new
    order when the text holds fewer than the steps need)."""
    generator = torch.Generator().manual_seed(config.seed)
    needed = config.steps * config.batch_size
    order = torch.cat(
        [torch.randperm(len(windows), generator=generator) for _ in range(needed // len(windows) + 1)]
    )
    return [windows[order[s * config.batch_size : (s + 1) * config.batch_size]] for s in range(config.steps)]


def trainable_count(params: list[torch.nn.Parameter], masks: dict | None = None) -> int:
    """Weights that train: a masked parameter counts its unmasked rows only."""
    masks = masks or {}
    total = 0
    for p in params:
        mask = masks.get(p)
        total += p.numel() if mask is None else int(mask.sum()) * (p.numel() // max(p.shape[0], 1))
    return total


def train_lm_(
    model,
    params: list[torch.nn.Parameter],
    tokenizer,
    data,
    config: TrainConfig | None = None,
    masks: dict | None = None,
    progress: bool = True,
    desc: str = "training",
    extra_loss: Callable[[int], torch.Tensor] | None = None,
) -> dict:
    """Train ``params`` of ``model`` in place on ``data``'s next-token loss (every other parameter frozen); ``masks``
    (parameter -> bool row mask) limits a parameter to some rows; ``extra_loss(step)``, when given, is a term added
    to each step's loss (grow's gate penalty on replay text). Returns a report: steps, losses (next-token only),
    extra_losses (when given), trainable weights, seconds. Refuses (BrickworkError) a run whose loss or weights stop
    being finite, whose weights explode or whose loss climbs far above its start
    (:class:`~brickwork.divergence.DivergenceGuard`)."""
    from brickwork.data.sources import token_windows

    config = config or TrainConfig()
    masks = masks or {}
    if not params:
        raise BrickworkError("nothing to train: no parameter was chosen")
    started = time.perf_counter()
    windows = token_windows(tokenizer, data, config.window, config.tokens)
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    names = {id(p): name for name, p in model.named_parameters()}
    guard = DivergenceGuard((names.get(id(p), f"parameter {i}"), p) for i, p in enumerate(params))
    device = params[0].device
    row_masks = [(p, mask.to(device).view(-1, *([1] * (p.dim() - 1)))) for p, mask in masks.items()]
    was_training = model.training
    model.train()
    losses, extra_losses = [], []
    # dropout (GPT-2, OPT, BERT train with it) draws from the global generator: seed it, and restore it after
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    rng.__enter__()
    torch.manual_seed(config.seed)
    try:
        bar = tqdm(batches(windows, config), desc=desc, unit="step", disable=not progress)
        for step, batch in enumerate(bar):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
            total = loss
            if extra_loss is not None:
                extra = extra_loss(step)
                extra_losses.append(extra.item())
                total = loss + extra
            guard.check_loss(total, step + 1)
            total.backward()
            for p, mask in row_masks:
                if p.grad is not None:
                    p.grad.mul_(mask)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            guard.check_weights(step + 1)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        rng.__exit__(None, None, None)
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(False)
    model.eval()
    return {
        "steps": len(losses),
        "tokens": len(losses) * config.window * config.batch_size,
        "losses": losses,
        **({"extra_losses": extra_losses} if extra_loss is not None else {}),
        "trainable": trainable_count(params, masks),
        "seconds": time.perf_counter() - started,
    }
