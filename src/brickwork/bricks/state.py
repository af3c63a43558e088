"""A carved model's carve state: one typed object, ``model.brickwork``.

:class:`CarveState` holds what the carve as a whole was (its configuration and calibration, and what budgets,
per-token budgets and merging later recorded) and, per carved layer, a :class:`LayerState`: where the layer's
brick sits in its block and the emptied dense modules that :func:`uncarve_` puts back.
Bricks carry nothing of this: a brick is its spec and its weights, and swapping one brick for another (prune,
merge) changes only the module at the layer's place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from brickwork.bricks.module import BrickFFN
from brickwork.errors import BrickworkError
from brickwork.models.specs import FFN, _resolve, find_ffns

# The carve-level fields save() writes and load() restores, in brickwork.json's names.
RECORDED = ("config", "calibration", "calibration_tokens")


@dataclass
class LayerState:
    """One carved layer: its dense FFN's place (``ffn``), the path in ``ffn.block`` where its brick (or merged
    bricks) sit, and the dense modules the brick replaced, emptied, with their parameters' shapes."""

    ffn: FFN
    path: str
    dense_modules: dict[str, nn.Module]
    dense_shapes: dict[tuple[str, str], torch.Size]

    def module(self) -> nn.Module:
        """The module at the layer's place now: a BrickFFN, or a MergedBricks."""
        return self.ffn.block.get_submodule(self.path)

    def put(self, module: nn.Module) -> None:
        """Put ``module`` at the layer's place."""
        parent, _, name = self.path.rpartition(".")
        setattr(self.ffn.block.get_submodule(parent) if parent else self.ffn.block, name, module)


@dataclass
class CarveState:
    """``model.brickwork``: the carve's record (``config``: ``CarveConfig.to_dict()``; ``calibration``: the
    calibration source described; ``calibration_tokens``), what later changes recorded (``budget``: each layer's
    fraction after ``set_budget``; ``budget_allocation``; ``token_budget``; ``token_budget_fit``; ``merged``: the
    merge record), and the carved ``layers``. ``config`` is None while a carve is under way."""

    layers: dict[int, LayerState] = field(default_factory=dict)
    config: dict | None = None
    calibration: str | None = None
    calibration_tokens: int | None = None
    budget: dict | None = None
    budget_allocation: dict | None = None
    token_budget: dict | None = None
    token_budget_fit: dict | None = None
    merged: dict | None = None

    @property
    def complete(self) -> bool:
        """Whether the carve finished (it has its configuration)."""
        return self.config is not None

    def record(self) -> dict:
        """The carve-level fields that are set, as a dict (what tests and reports compare; no modules)."""
        names = (*RECORDED, "budget", "budget_allocation", "token_budget", "token_budget_fit", "merged")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def carve_state(model: nn.Module, create: bool = False) -> CarveState | None:
    """``model``'s carve state (None when it has none, unless ``create``: then a new, empty one)."""
    state = model.__dict__.get("brickwork")
    if state is None and create:
        state = CarveState()
        model.brickwork = state
    return state


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_resolve(root, parent) if parent else root, name, module)


def _swap_in(model: nn.Module, ffn: FFN, brick: nn.Module) -> None:
    """Put ``brick`` (a BrickFFN or MergedBricks) where ``model``'s dense FFN ``ffn`` was; keep the dense modules
    (emptied) in the model's carve state (:class:`~brickwork.bricks.state.LayerState`) to put back on uncarve_."""
    spec = ffn.spec
    if spec.module is not None:
        path = spec.module
        replaced = {spec.module: ffn.module}
        _set(ffn.block, spec.module, brick)
    else:  # the FFN is spread over the block (OPT, BERT): the brick takes the first projection's place
        first = path = spec.gate_up or spec.up
        replaced = {first: ffn.input_module, spec.act: ffn.activation, spec.down: ffn.down_module}
        _set(ffn.block, first, brick)
        _set(ffn.block, spec.act, nn.Identity())
        _set(ffn.block, spec.down, nn.Identity())
    shapes = {}
    for where, module in replaced.items():
        for name, param in module.named_parameters():
            shapes[(where, name)] = param.shape
            param.data = torch.empty(0, dtype=param.dtype)
    # in the model's carve state, not as submodules: they stay out of state_dict and parameters()
    carve_state(model, create=True).layers[ffn.index] = LayerState(ffn, path, replaced, shapes)


def refuse_grown(bricks: dict[int, BrickFFN], what: str) -> None:
    """Refuse (BrickworkError) layers holding experts grown beside the carved ones (:mod:`brickwork.ops.grow`):
    ``what`` reads, counts or retrains the carved bricks alone and would be wrong for them."""
    grown = sorted(i for i, b in bricks.items() if getattr(b, "grown", None) is not None)
    if grown:
        raise BrickworkError(
            f"{what} does not handle grown experts (layers {grown}); remove them first "
            "(brickwork.ops.grow.remove_grown_) or apply it before growing"
        )


def carved_layers(model: nn.Module) -> dict[int, BrickFFN]:
    """The BrickFFNs of a carved model, by layer index. A merged model (several children's bricks in a layer,
    :mod:`brickwork.ops.merge`) is refused: what reads or changes one carve's bricks does not apply to it."""
    for module in model.modules():
        children = getattr(module, "merged_children", None)
        if children is not None:
            raise BrickworkError(
                f"this model is merged from {children} children's bricks (brickwork merge), and this works on "
                "one carve's bricks: use one child, or their average (brickwork merge --average)"
            )
    state = carve_state(model)
    if state is None:
        return {}
    modules = {index: layer.module() for index, layer in sorted(state.layers.items())}
    return {index: module for index, module in modules.items() if isinstance(module, BrickFFN)}


def model_reads(model: nn.Module) -> float:
    """FFN weights a token reads over every FFN of ``model`` / their dense weights: carved (or merged) layers at
    their fixed top-k's fraction, router included (the most a token reads under a per-token budget), layers left
    dense at 1, weighted by layer size."""
    from brickwork.bricks.merged import layer_modules

    layers = layer_modules(model)
    sizes, reads = {}, {}
    for index, layer in layers.items():
        first = getattr(layer, "branches", [layer])[0]  # a merged layer: the size of one child's bricks
        sizes[index] = first.d_ff * first.weights_per_neuron
        reads[index] = sizes[index] * layer.read_fraction()
    for ffn in find_ffns(model):  # the layers left dense read all of theirs
        if ffn.index not in layers:
            sizes[ffn.index] = reads[ffn.index] = ffn.d_ff * _weights_per_neuron(ffn)
    return sum(reads.values()) / sum(sizes.values())


def _weights_per_neuron(ffn: FFN) -> int:
    w = ffn.read()
    return w.d_model * (3 if w.gate is not None else 2)


@torch.no_grad()
def uncarve_(model: nn.Module) -> nn.Module:
    """Put the dense FFNs back, bit for bit (undoes :func:`carve_`)."""
    bricks = carved_layers(model)
    if not bricks:
        raise BrickworkError("this model has no carved layers")
    refuse_grown(bricks, "uncarve_ (the dense FFN has no place for them)")
    pruned = sorted(i for i, b in bricks.items() if b.pruned_from is not None)
    if pruned:  # refused before any layer changes
        raise BrickworkError(
            f"layers {pruned} were pruned (brickwork prune): their dense FFNs cannot be rebuilt; uncarve the "
            "carve from before pruning"
        )
    state = carve_state(model)
    for index, brick in bricks.items():
        layer = state.layers[index]
        for (path, name), shape in layer.dense_shapes.items():
            param = dict(layer.dense_modules[path].named_parameters())[name]
            param.data = torch.empty(shape, dtype=param.dtype, device=brick.up.device)
        for path, module in layer.dense_modules.items():
            _set(layer.ffn.block, path, module)
        layer.ffn.write(brick.to_dense_weights())
    del model.brickwork
    return model
