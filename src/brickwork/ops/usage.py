"""Which bricks a text uses: per carved layer, how often each routed expert is selected on that text.

What update (:mod:`brickwork.ops.update`) and domain pruning (:mod:`brickwork.ops.prune`) choose bricks by, and
what the merge benchmark reads to check that a domain's tokens go to its own child's bricks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError


@dataclass
class ExpertUsage:
    """``counts[layer]``: ``[num_experts]`` selections of each routed expert over ``tokens`` tokens (a token
    selecting ``active`` experts counts once for each)."""

    counts: dict[int, torch.Tensor]
    tokens: int
    source: str

    def shares(self, layer: int) -> torch.Tensor:
        """Each expert's share of the layer's selections (sums to 1)."""
        counts = self.counts[layer].double()
        return counts / counts.sum().clamp_min(1)

    def covering(self, layer: int, coverage: float) -> torch.Tensor:
        """The fewest experts (indices, most used first) whose selections make up ``coverage`` of the layer's;
        experts never selected are never included (coverage 1 gives every expert used at least once)."""
        if not 0 < coverage <= 1:
            raise ValueError(f"coverage must be in (0, 1], got {coverage}")
        shares = self.shares(layer)
        order = torch.sort(shares, descending=True, stable=True).indices
        cumulative = shares[order].cumsum(0)
        needed = (
            int(torch.searchsorted(cumulative, torch.tensor(coverage - 1e-12, dtype=cumulative.dtype))) + 1
        )
        chosen = order[: min(needed, len(order))]
        return chosen[shares[chosen] > 0]

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "source": self.source,
            "counts": {str(k): v.tolist() for k, v in sorted(self.counts.items())},
        }


# expert_usage's options as ``brickwork prune`` shows them (the defaults are the signature's).
USAGE_HELP = {"tokens": "domain tokens to count selections on", "window": "tokens per window"}


@torch.no_grad()
def expert_usage(
    model, tokenizer, data, tokens: int = 16384, window: int = 512, batch_size: int = 4, progress: bool = True
) -> ExpertUsage:
    """Run ``tokens`` of ``data`` (a corpus name, text file or ``hf:`` dataset) through the carved ``model`` and
    count, per carved layer, how often each routed expert is selected (slots a per-token budget dropped count for
    none)."""
    from brickwork.data.sources import describe_source, token_windows

    bricks = carved_layers(model)
    if not bricks:
        raise BrickworkError("the model has no carved layer: carve it first (brickwork carve)")
    windows = token_windows(tokenizer, data, window, tokens)
    counts = {i: torch.zeros(b.num_experts, dtype=torch.long) for i, b in bricks.items()}

    def hook(index):
        def count(brick, args):
            x = args[0].reshape(-1, brick.d_model)
            selection = brick.route(x)[0]
            chosen = selection[selection >= 0].cpu()
            counts[index] += torch.bincount(chosen, minlength=brick.num_experts)

        return count

    handles = [b.register_forward_pre_hook(hook(i)) for i, b in bricks.items()]
    device = next(model.parameters()).device
    try:
        for batch in tqdm(windows.split(batch_size), desc="expert usage", unit="batch", disable=not progress):
            model(input_ids=batch.to(device))
    finally:
        for h in handles:
            h.remove()
    return ExpertUsage(counts=counts, tokens=windows.numel(), source=describe_source(data))
