"""Forward hooks on FFNs, owned by one object that removes them on exit, even on error."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from brickwork.models.specs import FFN

HiddenCallback = Callable[[int, torch.Tensor], None]


class FFNCapture:
    """Calls ``on_hidden(layer, h)`` for every FFN hidden activation h (the down projection's input).

    With ``on_input``, also calls ``on_input(layer, x)`` with the FFN input. Use as a context manager::

        with FFNCapture(ffns, on_hidden=stats.update):
            model(input_ids)
    """

    def __init__(
        self,
        ffns: Sequence[FFN],
        on_hidden: HiddenCallback | None = None,
        on_input: HiddenCallback | None = None,
    ):
        self.ffns = list(ffns)
        self.on_hidden = on_hidden
        self.on_input = on_input
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FFNCapture:
        try:
            for ffn in self.ffns:
                if self.on_hidden is not None:
                    self._handles.append(
                        ffn.down_module.register_forward_pre_hook(self._hook(ffn.index, self.on_hidden))
                    )
                if self.on_input is not None:
                    self._handles.append(
                        ffn.input_module.register_forward_pre_hook(self._hook(ffn.index, self.on_input))
                    )
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _hook(layer: int, callback: HiddenCallback):
        def hook(module, args):
            callback(layer, args[0].detach())

        return hook
