"""Captures of what bricks route, owned by context managers, not kept on the modules.

- :class:`SelectionCapture`: each brick's routed experts per token, for debugging and tests. A forward pre-hook
  routes the brick's input as the brick routes it (:meth:`BrickFFN.select`); the forward itself runs on whatever
  path it would take, kernels included.
- :class:`BalanceCapture`: while training a weighted combine rule, each brick's Switch Transformer load-balancing
  term (:meth:`BrickFFN.balance_loss`) and its selections per expert, as the differentiable reference path
  computes them. Outside a capture no balance term is computed at all.

On leaving the ``with`` block the hooks are removed and nothing stays behind: a captured term holds a step's
autograd graph, which a module field would keep alive (and make the model impossible to deep-copy).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# Bricks whose reference path reports its balance terms, each to the capture it is in.
_BALANCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bricks(target) -> dict:
    """``{name: brick}`` of a model (its carved layers, by index) or of an iterable or dict of bricks."""
    from brickwork.bricks.module import BrickFFN

    if isinstance(target, BrickFFN):
        return {0: target}
    if isinstance(target, dict):
        return dict(target)
    if isinstance(target, nn.Module):
        from brickwork.bricks.state import carved_layers

        return carved_layers(target)
    return dict(enumerate(target))


class SelectionCapture:
    """``with SelectionCapture(model) as capture: model(ids)`` -> ``capture.selections[layer]``: the ``[T, active]``
    routed experts of each brick's latest forward (-1: a slot a per-token budget dropped)."""

    def __init__(self, target):
        self.bricks = _bricks(target)
        self.selections: dict = {}
        self._hooks: list = []

    def __enter__(self) -> SelectionCapture:
        for name, brick in self.bricks.items():
            self._hooks.append(brick.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def record(brick, args):
            x = args[0]
            with torch.no_grad():
                self.selections[name] = brick.select(x.reshape(-1, brick.d_model))

        return record

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class BalanceCapture:
    """``with BalanceCapture(bricks) as capture:`` each training forward of a brick with a weighted combine rule
    adds its load-balancing term and its selections per expert; :meth:`take` returns what was added since the last
    call (``terms``: a list of scalar tensors with their graphs; ``loads``: ``{name: [E] counts}``) and forgets it."""

    def __init__(self, target):
        self.bricks = _bricks(target)
        self._names = {id(brick): name for name, brick in self.bricks.items()}
        self._terms: dict = {}
        self._loads: dict = {}

    def __enter__(self) -> BalanceCapture:
        for brick in self.bricks.values():
            _BALANCE[brick] = self
        return self

    def add(self, brick, term: torch.Tensor, load: torch.Tensor) -> None:
        name = self._names[id(brick)]
        self._terms.setdefault(name, []).append(term)
        self._loads[name] = self._loads[name] + load if name in self._loads else load

    def take(self) -> tuple[list[torch.Tensor], dict]:
        """The terms in the order of the bricks given (each brick's in the order of its forwards), and the loads."""
        terms = [term for name in self.bricks for term in self._terms.get(name, ())]
        loads = self._loads
        self._terms, self._loads = {}, {}
        return terms, loads

    def __exit__(self, *exc) -> None:
        for brick in self.bricks.values():
            if _BALANCE.get(brick) is self:
                del _BALANCE[brick]
        self._terms, self._loads = {}, {}


def balance_capture(brick) -> BalanceCapture | None:
    """The capture ``brick`` reports its balance terms to, or None (none is computed)."""
    return _BALANCE.get(brick)
