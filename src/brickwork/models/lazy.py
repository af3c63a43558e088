"""A model whose weights stay on disk until asked for: a skeleton on the meta device, filled module by module.

:func:`open_lazy_model` builds the model from its ``config.json`` with every parameter on the meta device (no
memory) and the buffers real (rotary frequencies and embedding scales are computed at construction and are not in
the checkpoint), and indexes the safetensors file(s) by tensor name. :func:`materialise` fills one submodule from
the files in a given dtype; :func:`release` puts it back on the meta device. Each read opens the file and closes it
again: a ``safe_open`` handle kept open maps the file, and every page read stays in the process's RSS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from brickwork.errors import BrickworkError


class LazyCheckpoint:
    """The tensors of a safetensors checkpoint (one file, or shards listed in ``model.safetensors.index.json``),
    read on demand by name."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BrickworkError(f"{index} is damaged: {exc}") from exc
            files = {name: self.directory / file for name, file in weight_map.items()}
        elif single.is_file():
            try:
                with safe_open(str(single), "pt") as handle:
                    files = dict.fromkeys(handle.keys(), single)
            except (SafetensorError, OSError) as exc:
                raise BrickworkError(f"{single} is damaged: {str(exc)[:300]}") from exc
        else:
            raise BrickworkError(
                f"{self.directory} holds no safetensors weights (model.safetensors or model.safetensors.index.json); "
                "carving layer by layer reads safetensors only: convert the model first (load it and "
                "save_pretrained), or use an alias, whose cache is safetensors"
            )
        self.files: dict[str, Path] = files

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (floating ones cast to ``dtype`` when given), each file opened once and closed."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise BrickworkError(f"{self.directory}: the checkpoint has no tensor {name}")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, wanted in by_file.items():
            try:
                with safe_open(str(path), "pt") as handle:
                    for name in wanted:
                        tensor = handle.get_tensor(name)
                        if dtype is not None and tensor.is_floating_point():
                            tensor = tensor.to(dtype)
                        out[name] = tensor
            except (SafetensorError, OSError) as exc:
                raise BrickworkError(f"{path} is damaged: {str(exc)[:300]}") from exc
        return out


@dataclass
class LazyModel:
    """A meta-device causal LM skeleton and the checkpoint its weights come from."""

    model: nn.Module
    checkpoint: LazyCheckpoint
    location: Path
    _tied: dict[str, list[str]] | None = None

    def prefix(self, module: nn.Module) -> str:
        """``module``'s state-dict prefix in the whole model (``"model.layers.3."``; ``""`` for the model)."""
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return f"{name}." if name else ""
        raise BrickworkError(f"{type(module).__name__} is not part of this model")

    def tied_names(self) -> dict[str, list[str]]:
        """Parameters held under several names (tied embeddings): each name -> all names of its tensor, sorted.
        Read from the skeleton as built (materialising replaces parameters, which unties them)."""
        if self._tied is None:
            groups: dict[int, list[str]] = {}
            for name, param in self.model.named_parameters(remove_duplicate=False):
                groups.setdefault(id(param), []).append(name)
            self._tied = {
                name: sorted(names) for names in groups.values() if len(names) > 1 for name in names
            }
        return self._tied

    def source_name(self, name: str) -> str:
        """Where the model's tensor ``name`` is in the checkpoint (a tied tensor may be stored under another name)."""
        for candidate in [name, *self.tied_names().get(name, [])]:
            if candidate in self.checkpoint:
                return candidate
        raise BrickworkError(
            f"{self.location}: the checkpoint has no tensor {name}; its names do not match the model's "
            "(carving layer by layer reads tensors by the model's own state-dict names)"
        )


def open_lazy_model(location: str | os.PathLike) -> LazyModel:
    """The causal LM in ``location`` (a Hugging Face directory with safetensors weights) as a meta-device skeleton."""
    import transformers
    from accelerate import init_empty_weights

    location = Path(location)
    checkpoint = LazyCheckpoint(location)
    try:
        config = transformers.AutoConfig.from_pretrained(location)
    except (OSError, ValueError, KeyError) as exc:
        raise BrickworkError(f"{location}/config.json is damaged: {str(exc)[:300]}") from exc
    # parameters on meta; buffers real (computed at construction, not in the checkpoint)
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # tying is done by from_pretrained, not from_config, under init_empty_weights
    model.eval()
    lazy = LazyModel(model=model, checkpoint=checkpoint, location=location)
    tied = lazy.tied_names()  # now, while tied parameters are one object
    absent = [
        name
        for name, _ in model.named_parameters(remove_duplicate=False)
        if not any(candidate in checkpoint for candidate in [name, *tied.get(name, [])])
    ]
    if absent:  # checked before any work: transformers renames some checkpoints' tensors on load (GPT-NeoX)
        raise BrickworkError(
            f"{location}: the checkpoint has no tensor {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}; "
            f"carving layer by layer reads tensors under the model's own names, and this {config.model_type} "
            "checkpoint stores them under others: carve it whole (without --sequential)"
        )
    return lazy


@torch.no_grad()
def materialise(lazy: LazyModel, module: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Fill ``module``'s parameters from the checkpoint, in ``dtype`` (floating tensors)."""
    prefix = lazy.prefix(module)
    materialise_parameters(
        lazy, [prefix + name for name, _ in module.named_parameters(remove_duplicate=False)], dtype
    )


@torch.no_grad()
def materialise_parameters(lazy: LazyModel, names: list[str], dtype: torch.dtype = torch.float32) -> None:
    """Fill the model's parameters ``names`` (full state-dict names) from the checkpoint, in ``dtype``.

    Persistent buffers keep the values they were built with."""
    sources = {name: lazy.source_name(name) for name in names}
    tensors = lazy.checkpoint.read(set(sources.values()), dtype)
    for name in names:
        value = tensors[sources[name]]
        owner, _, leaf = name.rpartition(".")
        holder = lazy.model.get_submodule(owner) if owner else lazy.model
        param = getattr(holder, leaf)
        if tuple(value.shape) != tuple(param.shape):
            raise BrickworkError(
                f"{lazy.location}: tensor {name} has shape {tuple(value.shape)}, the model's config "
                f"says {tuple(param.shape)}"
            )
        setattr(holder, leaf, nn.Parameter(value, requires_grad=False))


def release(module: nn.Module) -> None:
    """Put ``module``'s parameters back on the meta device (their memory is freed once nothing else holds them)."""
    for sub in module.modules():
        for leaf, param in list(sub.named_parameters(recurse=False)):
            setattr(sub, leaf, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))


def is_materialised(module: nn.Module) -> bool:
    """Whether any of ``module``'s parameters holds real memory."""
    return any(not p.is_meta for p in module.parameters())
