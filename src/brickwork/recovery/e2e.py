"""End-to-end recovery: distil the dense parent into the carved model, with ``accelerate``.

The carved model's experts (gate, up and down rows of every carved layer, shared neurons included) are
trained to match the parent's next-token distribution, ``KL(parent || carved)`` at temperature ``T`` (Hinton
et al. 2015), plus optionally the language-modelling loss. With a weighted combine rule (``carve --combine
softmax`` or ``softmax_topk``) the routers train too, through the selected experts' weights (as MoE models are
trained); with the default unweighted sum the top-k choice passes no gradient to the router, so routing stays as
carved (the local mode refits it).

Built on ``accelerate``: the same code runs on one CPU, one GPU, or many processes (``accelerate launch``,
DDP; FSDP through an accelerate config). Batches come in a fixed order drawn from ``seed``, so a run resumed
from a checkpoint (``accelerator.save_state`` every ``checkpoint_every`` steps) continues exactly where the
uninterrupted run would be.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from brickwork.bricks.capture import BalanceCapture
from brickwork.bricks.merged import MergedBricks
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.state import carved_layers, refuse_grown
from brickwork.divergence import DivergenceGuard
from brickwork.errors import BrickworkError

logger = logging.getLogger(__name__)


@dataclass
class E2EConfig:
    """End-to-end recovery settings; the ``brickwork recover --mode e2e`` options read their help from here."""

    tokens: int = field(default=32768, metadata={"help": "e2e: token budget, training stops after it"})
    window: int = field(default=256, metadata={"help": "e2e: tokens per training sequence"})
    batch_size: int = field(
        default=4, metadata={"help": "e2e: sequences per optimiser step, over all processes"}
    )
    lr: float = field(default=5e-5, metadata={"help": "e2e: learning rate (AdamW)"})
    temperature: float = field(default=1.0, metadata={"help": "e2e: distillation temperature"})
    lm_weight: float = field(
        default=0.0, metadata={"help": "e2e: weight of the next-token loss added to the KL"}
    )
    balance: float = field(
        default=0.01,
        metadata={
            "help": "e2e: weight of the load-balancing loss (Switch Transformer's) of carves with a weighted "
            "combine rule, whose routers train"
        },
    )
    checkpoint_every: int = field(default=0, metadata={"help": "e2e: steps between checkpoints (0: none)"})
    seed: int = field(default=0, metadata={"help": "e2e: seed of the batch order"})

    def __post_init__(self):
        for name, low in (
            ("tokens", 1),
            ("window", 2),
            ("batch_size", 1),
            ("checkpoint_every", 0),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, positive in (("lr", True), ("temperature", True), ("lm_weight", False), ("balance", False)):
            value = getattr(self, name)
            ok = (
                isinstance(value, (int, float))
                and math.isfinite(value)
                and (value > 0 if positive else value >= 0)
            )
            if not ok:
                raise ValueError(
                    f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
                )
        if self.tokens < self.window * self.batch_size:
            raise ValueError(
                f"tokens ({self.tokens}) must cover at least one batch (window x batch_size = "
                f"{self.window * self.batch_size})"
            )


# The config fields that fix a teacher's architecture: a teacher must agree with the carve on each it has.
_ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
)
# relative difference of a non-FFN weight that a dtype round trip (bf16: ~1e-3) stays in
TEACHER_TOLERANCE = 5e-3


@torch.no_grad()
def check_teacher(model, parent) -> None:
    """Refuse (BrickworkError) a teacher that is not the carve's dense parent: a carved model, another
    architecture, or other non-FFN weights (each a tensor's relative difference within
    :data:`TEACHER_TOLERANCE`; only the FFNs were carved, so everything else must be the parent's)."""
    hint = "pass the dense model the carve was made from as --parent (brickwork.json's base_model names it)"
    if carved_layers(parent):
        raise BrickworkError(f"the teacher is itself a carved model; {hint}")
    ours, theirs = model.config.to_dict(), parent.config.to_dict()
    differ = [k for k in _ARCHITECTURE_KEYS if (k in ours or k in theirs) and ours.get(k) != theirs.get(k)]
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} against {ours.get(k)!r}" for k in differ[:4])
        raise BrickworkError(f"the teacher's architecture differs from the carve's ({shown}); {hint}")
    bricks = {name for name, module in model.named_modules() if isinstance(module, (BrickFFN, MergedBricks))}
    teacher = parent.state_dict()
    for name, tensor in model.state_dict().items():
        if any(name.startswith(prefix + ".") for prefix in bricks):
            continue
        other = teacher.get(name)
        if other is None or other.shape != tensor.shape:
            raise BrickworkError(f"the teacher has no weight {name} of shape {tuple(tensor.shape)}; {hint}")
        if not tensor.is_floating_point():
            continue
        a, b = tensor.float(), other.float().to(tensor.device)
        difference = float((a - b).norm() / b.norm().clamp_min(1e-12))
        if difference > TEACHER_TOLERANCE:
            raise BrickworkError(
                f"the teacher's {name} differs from the carve's by {difference:.3g} (relative; at most "
                f"{TEACHER_TOLERANCE} for the parent); {hint}"
            )


def _trainable(model) -> list[torch.nn.Parameter]:
    params = []
    for p in model.parameters():
        p.requires_grad_(False)
    for brick in carved_layers(model).values():
        for name, p in brick.named_parameters():
            # routers only where the combination weights pass them a gradient
            if brick.combine.weighted or not name.startswith("router."):
                p.requires_grad_(True)
                params.append(p)
    return params


def _batches(windows: torch.Tensor, config: E2EConfig, world: int) -> list[torch.Tensor]:
    """Every step's batch, in an order fixed by the seed; each step's windows are split across processes."""
    per_step = config.batch_size
    steps = config.tokens // (config.window * per_step)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.cat(
        [
            torch.randperm(len(windows), generator=generator)
            for _ in range(steps * per_step // len(windows) + 1)
        ]
    )
    if per_step % world:
        raise BrickworkError(f"batch_size {per_step} must be a multiple of the number of processes ({world})")
    return [windows[order[s * per_step : (s + 1) * per_step]] for s in range(steps)]


def recover_e2e_(
    model,
    parent,
    tokenizer,
    calib,
    config: E2EConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    accelerator=None,
    callback=None,
):
    """Train ``model``'s carved experts in place to match ``parent``; returns a report dict.

    ``stop_after`` ends the run after that many steps (to test resumption); ``resume`` continues from the
    latest checkpoint in ``checkpoint_dir``. ``callback(steps_done, model)``, if given, runs on every process
    after each optimiser step with the unwrapped model in training mode (a benchmark scores it there, under
    ``torch.no_grad()`` and ``model.eval()``, and sets ``model.train()`` again).
    """
    from accelerate import Accelerator

    from brickwork.data.sources import token_windows

    config = config or E2EConfig()
    refuse_grown(carved_layers(model), "recovery")
    if not carved_layers(model):
        raise BrickworkError("the model has no carved layer to recover: carve it first")
    check_teacher(model, parent)
    if resume and checkpoint_dir is None:
        raise BrickworkError("resume needs the checkpoint directory")
    accelerator = accelerator or Accelerator()
    started = time.perf_counter()
    windows = token_windows(tokenizer, calib, config.window, config.tokens)
    steps = _batches(windows, config, accelerator.num_processes)
    params = _trainable(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    model.train()
    parent.eval()
    for p in parent.parameters():
        p.requires_grad_(False)
    model, optimizer = accelerator.prepare(model, optimizer)
    parent = parent.to(accelerator.device)
    start_step = 0
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume:
        latest = _latest(checkpoint_dir)
        if latest is None:
            raise BrickworkError(f"no checkpoint in {checkpoint_dir} to resume from")
        accelerator.load_state(str(latest))
        start_step = json.loads((latest / "brickwork-step.json").read_text())["step"]
    unwrapped = accelerator.unwrap_model(model)
    guard = DivergenceGuard((n, p) for n, p in unwrapped.named_parameters() if p.requires_grad)
    losses = []
    weighted = [b for b in carved_layers(unwrapped).values() if b.combine.weighted]
    load = [torch.zeros(b.num_experts, device=accelerator.device) for b in weighted]  # selections per expert
    rank, world = accelerator.process_index, accelerator.num_processes
    t = config.temperature
    bar = tqdm(
        range(start_step, len(steps)),
        desc="distilling",
        unit="step",
        disable=not progress or not accelerator.is_main_process,
    )
    with BalanceCapture(weighted) as capture:  # the weighted layers' balance terms, step by step
        for step in bar:
            if stop_after is not None and step >= stop_after:
                break
            batch = steps[step].chunk(world)[rank].to(accelerator.device)
            with torch.no_grad():
                teacher = torch.log_softmax(parent(input_ids=batch).logits[:, :-1].float() / t, dim=-1)
            logits = model(input_ids=batch).logits[:, :-1].float()
            student = torch.log_softmax(logits / t, dim=-1)
            loss = (teacher.exp() * (teacher - student)).sum(-1).mean() * t * t
            if config.lm_weight:
                loss = loss + config.lm_weight * torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
                )
            distillation = loss.detach()  # what `losses` reports: the balance term is a regulariser
            balance, step_load = capture.take()
            if config.balance and balance:
                loss = loss + config.balance * torch.stack(balance).mean()
            for i, counts in step_load.items():
                load[i] += counts
            guard.check_loss(loss, step + 1)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            guard.check_weights(step + 1)
            losses.append(accelerator.gather(distillation[None]).mean().item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            done = step + 1
            if callback is not None:
                callback(done, accelerator.unwrap_model(model))
            if checkpoint_dir is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
                target = checkpoint_dir / f"step-{done:07d}"
                accelerator.save_state(str(target))
                if accelerator.is_main_process:
                    (target / "brickwork-step.json").write_text(
                        json.dumps({"step": done, "config": asdict(config)})
                    )
                accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {
        "mode": "e2e",
        "steps": len(losses),
        "start_step": start_step,
        "tokens_per_step": config.window * config.batch_size,
        "losses": losses,
        "seconds": time.perf_counter() - started,
        "processes": world,
        "expert_load": _load_summary(load),
    }


def _load_summary(load: list[torch.Tensor]) -> dict | None:
    """Over the weighted layers trained here, each layer's least and most selected expert's share of the
    selections relative to a uniform share (1 = uniform), averaged; and the experts never selected."""
    seen = [counts for counts in load if counts.sum() > 0]
    if not seen:
        return None
    relative = [counts / counts.mean() for counts in seen]
    return {
        "min_vs_uniform": float(torch.stack([r.min() for r in relative]).mean()),
        "max_vs_uniform": float(torch.stack([r.max() for r in relative]).mean()),
        "never_selected": int(sum(int((counts == 0).sum()) for counts in seen)),
        "experts": int(sum(len(counts) for counts in seen)),
    }


def _latest(directory: Path | None) -> Path | None:
    if directory is None or not directory.is_dir():
        return None
    done = sorted(p for p in directory.glob("step-*") if (p / "brickwork-step.json").is_file())
    return done[-1] if done else None
