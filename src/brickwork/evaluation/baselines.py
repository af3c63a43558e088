"""Neuron-level activation-sparsity baselines, to compare carved models with at equal FFN weight reads.

Each baseline is a set of hooks on a dense model's FFNs (owned by one context manager, removed on exit),
with per-layer magnitude thresholds calibrated on calibration text to a target fraction of neurons (or
inputs) kept. Each reports the FFN weights a token reads under it, per layer, as carving does.

- ``cats``: Lee et al. 2024, "CATS: Contextually-Aware Thresholding for Sparsity in Large Language Models".
  Keep neuron i when |act(gate_i . x)| exceeds the layer's threshold; the gate is computed densely, up and
  down only for kept neurons. Reads ``(1 + 2 s) / 3`` of a gated FFN at keep fraction s.
- ``teal``: Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models". Zero the
  smallest-magnitude FFN inputs (threshold on |x|) and the smallest |h| before the down projection. Reads
  ``(2 s + s) / 3`` (gated) with the same keep fraction s for inputs and h.
- ``oracle``: keep each token's top-s neurons by the true |h| (an upper bound for neuron-level selection; it
  computes gate and up densely). Reads ``(2 + s) / 3`` (gated).

For plain (non-gated) FFNs the gate is the up projection: CATS thresholds |act(up . x)| and reads
``(1 + s) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from brickwork.data.sources import iter_token_windows
from brickwork.errors import BrickworkError
from brickwork.models.specs import FFN, find_ffns

BaselineKind = Literal["cats", "teal", "oracle"]
BASELINES: tuple[str, ...] = ("cats", "teal", "oracle")


@dataclass
class BaselineReport:
    kind: str
    keep_fraction: float
    reads: float  # FFN weights read per token / dense, averaged over layers by size


def reads_fraction(kind: str, keep: float, gated: bool) -> float:
    """FFN weights read per token / dense weights, for a neuron (and input) keep fraction."""
    inputs = 2 if gated else 1  # input projections per neuron (gate and up, or up alone)
    if kind == "cats":  # the gate (or the only input projection) densely, the rest for kept neurons
        return (1 + (inputs - 1) * keep + keep) / (inputs + 1)
    if kind == "teal":
        return (inputs * keep + keep) / (inputs + 1)
    if kind == "oracle":
        return (inputs + keep) / (inputs + 1)
    raise ValueError(f"unknown baseline '{kind}'; choose from {BASELINES}")


_KEEP_VALUES = 2_000_000


def _quantile(values: torch.Tensor, q: float) -> float:
    flat = values.flatten().float()
    if (
        flat.numel() > 1_000_000
    ):  # torch.quantile's input limit; a strided subsample is plenty for a threshold
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    return float(torch.quantile(flat, q))


class NeuronSparsity:
    """Hooks applying one baseline to every FFN of a model (use as a context manager)."""

    def __init__(self, model, kind: BaselineKind, keep_fraction: float):
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline '{kind}'; choose from {BASELINES}")
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        self.model, self.kind, self.keep = model, kind, keep_fraction
        self.ffns = find_ffns(model)
        self.thresholds: dict[int, dict[str, float]] = {}
        self._handles: list = []
        self._gate_values: dict[int, torch.Tensor] = {}

    # --- calibration -------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(
        self, tokenizer, calib: str | Path, tokens: int = 4096, window: int = 512
    ) -> NeuronSparsity:
        """Per-layer thresholds so that ``keep_fraction`` of the values pass, on ``tokens`` calibration tokens."""
        seen: dict[tuple[int, str], list[torch.Tensor]] = {}
        needed = {"cats": ("act",), "teal": ("x", "h"), "oracle": ()}[self.kind]

        def keep(layer: int, name: str) -> Callable:
            def hook(module, args, output=None):
                value = (args[0] if output is None else output).detach()
                # A strided subsample bounds memory (about 2M values per layer and kind; plenty for a quantile).
                # The stride is coprime to the width, so that every column is sampled.
                width = value.shape[-1]
                stride = max(1, tokens * width // _KEEP_VALUES)
                while math.gcd(stride, width) != 1:
                    stride += 1
                seen.setdefault((layer, name), []).append(value.abs().flatten()[::stride].clone())

            return hook

        handles = []
        try:
            for ffn in self.ffns:
                if "x" in needed:
                    handles.append(ffn.input_module.register_forward_pre_hook(keep(ffn.index, "x")))
                if "h" in needed:
                    handles.append(ffn.down_module.register_forward_pre_hook(keep(ffn.index, "h")))
                if "act" in needed:
                    handles.append(ffn.activation.register_forward_hook(keep(ffn.index, "act")))
            windows = list(iter_token_windows(tokenizer, calib, window, tokens))
            if not windows:
                raise BrickworkError(
                    f"'{calib}' gives no window of {window} tokens to calibrate thresholds on"
                )
            device = next(self.model.parameters()).device
            for batch in torch.stack(windows).split(4):
                self.model(input_ids=batch.to(device))
        finally:
            for handle in handles:
                handle.remove()
        for ffn in self.ffns:
            self.thresholds[ffn.index] = {
                # keep_fraction 1 keeps everything, zeros included
                name: -1.0 if self.keep >= 1 else _quantile(torch.cat(seen[(ffn.index, name)]), 1 - self.keep)
                for name in needed
            }
        return self

    # --- application -------------------------------------------------------------------------------------
    def report(self) -> BaselineReport:
        sizes = [ffn.d_ff * (3 if ffn.is_gated else 2) for ffn in self.ffns]
        fractions = [reads_fraction(self.kind, self.keep, ffn.is_gated) for ffn in self.ffns]
        overall = sum(s * f for s, f in zip(sizes, fractions, strict=True)) / sum(sizes)
        return BaselineReport(kind=self.kind, keep_fraction=self.keep, reads=overall)

    def __enter__(self) -> NeuronSparsity:
        if self.kind != "oracle" and not self.thresholds:
            raise BrickworkError(
                f"baseline '{self.kind}' needs calibrated thresholds: call .calibrate(...) first"
            )
        try:
            for ffn in self.ffns:
                self._install(ffn)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._gate_values.clear()

    def _install(self, ffn: FFN) -> None:
        i, hooks = ffn.index, self._handles
        if self.kind == "oracle":
            k = max(1, round(self.keep * ffn.d_ff))

            def top_h(module, args):
                h = args[0]
                index = h.abs().topk(k, dim=-1).indices
                return (torch.zeros_like(h).scatter_(-1, index, h.gather(-1, index)),)

            hooks.append(ffn.down_module.register_forward_pre_hook(top_h))
        elif self.kind == "teal":
            tx, th = self.thresholds[i]["x"], self.thresholds[i]["h"]
            for module in {
                ffn.input_module,
                *([ffn.block.get_submodule(ffn.spec.gate)] if ffn.spec.gate else []),
            }:
                hooks.append(module.register_forward_pre_hook(lambda m, a, t=tx: (a[0] * (a[0].abs() > t),)))
            hooks.append(
                ffn.down_module.register_forward_pre_hook(lambda m, a, t=th: (a[0] * (a[0].abs() > t),))
            )
        else:  # cats: remember act(gate) and mask h where it is small
            ta = self.thresholds[i]["act"]

            def remember(module, args, output, layer=i):
                self._gate_values[layer] = output

            def mask(module, args, layer=i, t=ta):
                return (args[0] * (self._gate_values.pop(layer).abs() > t),)

            hooks.append(ffn.activation.register_forward_hook(remember))
            hooks.append(ffn.down_module.register_forward_pre_hook(mask))
