"""One guard against diverged training, shared by every loop that trains weights (grow, update, recover's e2e
distillation, the trained router).

A run has diverged when its loss stops being finite, when its trained weights stop being finite or grow far past
their starting scale (a learning rate far too high drives weights to 1e30 while the loss, saturated at the
uniform distribution, stays finite), or when its loss climbs far above where it started. The guard raises a
:class:`~brickwork.errors.BrickworkError` at the first sign, so the caller saves nothing.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

import torch

from brickwork.errors import BrickworkError

WEIGHT_GROWTH = 1e3  # a weight may reach this many times its parameter's starting scale (at least 1)
LOSS_WINDOW = 3  # the loss compared with the start is the mean of this many last steps


class DivergenceGuard:
    """Watch one training run: call :meth:`check_loss` with each step's loss before its backward pass, and
    :meth:`check_weights` after each optimiser step.

    ``params`` are ``(name, parameter)`` pairs of what trains; ``hint`` is what the error tells the user to do.
    The loss limit is the first step's loss plus the larger of that loss and ``min_rise`` (a next-token loss of 3
    may rise to 6; a distillation loss of 0.05 to 1.05).
    """

    def __init__(
        self,
        params: Iterable[tuple[str, torch.Tensor]],
        hint: str = "lower --lr",
        min_rise: float = 1.0,
    ):
        self.params = list(params)
        self.hint = hint
        self.min_rise = min_rise
        with torch.no_grad():
            self.limits = [
                WEIGHT_GROWTH * max(float(p.detach().abs().max()) if p.numel() else 0.0, 1.0)
                for _, p in self.params
            ]
        self.start: float | None = None
        self.recent: deque[float] = deque(maxlen=LOSS_WINDOW)

    def _fail(self, what: str, step: int) -> None:
        raise BrickworkError(f"{what} at step {step}: training diverged ({self.hint}); nothing was saved")

    def check_loss(self, loss: torch.Tensor | float, step: int) -> None:
        """Refuse a non-finite loss, or a recent mean far above the first step's (``step`` counts from 1)."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            self._fail(f"the training loss is {value}", step)
        if self.start is None:
            self.start = value
        self.recent.append(value)
        limit = self.start + max(abs(self.start), self.min_rise)
        mean = sum(self.recent) / len(self.recent)
        if len(self.recent) == self.recent.maxlen and mean > limit:
            self._fail(
                f"the training loss rose from {self.start:.4g} to {mean:.4g} (mean of the last {len(self.recent)} "
                f"steps; the limit is {limit:.4g})",
                step,
            )

    @torch.no_grad()
    def check_weights(self, step: int) -> None:
        """Refuse trained weights that are not finite or have grown past their limit."""
        for (name, p), limit in zip(self.params, self.limits, strict=True):
            if not p.numel():
                continue
            largest = float(p.detach().abs().max())
            if not math.isfinite(largest):
                self._fail(f"{name} holds NaN or infinite values", step)
            if largest > limit:
                self._fail(f"{name} grew to {largest:.3g} (limit {limit:.3g}, from its starting scale)", step)
