"""Saving and loading carved models: safetensors weights, the base config, a versioned brickwork config.

A saved directory holds ``config.json`` (the base model's ``transformers`` config), ``model.safetensors``
(every weight, bricks included; no pickle), ``brickwork.json`` (format version, the CarveConfig, each carved
layer's shapes and router, calibration provenance), the tokenizer when given, and a short ``README.md`` model
card. It is written to a temporary directory and renamed, so an interrupted save leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from brickwork.bricks.carve import _swap_in, carved_layers
from brickwork.bricks.config import CarveConfig
from brickwork.bricks.module import BrickFFN
from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_directory, atomic_write_text
from brickwork.models.specs import find_ffns
from brickwork.routing import ROUTERS
from brickwork.version import __version__

FORMAT = "brickwork-carved"
FORMAT_VERSION = 1


def _layer_record(index: int, brick: BrickFFN) -> dict:
    return {
        "layer": index,
        "d_model": brick.d_model,
        "d_ff": brick.d_ff,
        "num_shared": brick.num_shared,
        "num_experts": brick.num_experts,
        "expert_size": brick.expert_size,
        "active": brick.active,
        "gated": brick.gate is not None,
        "up_bias": brick.up_bias is not None,
        "gate_bias": brick.gate_bias is not None,
        "down_bias": brick.down_bias is not None,
        "router": brick.router.kind,
        "router_config": brick.router.extra_config(),
        "down_keep": brick.down_keep,
        "accumulate": brick.accumulate,
        "stock_routing": brick.stock_routing,
        "active_fraction": brick.active_fraction(),
    }


def _model_card(meta: dict) -> str:
    config = meta["carve_config"]
    fractions = [layer["active_fraction"] for layer in meta["layers"]]
    return "\n".join(
        [
            f"# Carved with brickwork {meta['brickwork_version']}",
            "",
            f"- base model: `{meta['base_model']}` ({meta['model_type']})",
            f"- carved layers: {len(meta['layers'])}; experts {config['experts']} (shared {config['shared']}, "
            f"active {config['active']} routed per token); method `{config['method']}`, router `{config['router']}`",
            f"- FFN weights read per token (carved layers, router included): {sum(fractions) / len(fractions):.1%}",
            f"- calibration: `{meta['calibration']}` ({meta['calibration_tokens']} tokens), seed {config['seed']}",
            "",
            "Load with `brickwork.load(path)`; the result is a `transformers` model (`generate()` works).",
            "",
        ]
    )


def save(model, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Save a carved model to ``directory`` (replacing it atomically)."""
    bricks = carved_layers(model)
    if not bricks or not hasattr(model, "brickwork"):
        raise BrickworkError(
            "save() takes a model carved with brickwork.carve_; for a dense model use model.save_pretrained"
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "brickwork_version": __version__,
        "base_model": str(getattr(model, "name_or_path", "")),
        "model_type": model.config.model_type,
        "model_class": type(model).__name__,
        "carve_config": model.brickwork["config"],
        "calibration": model.brickwork["calibration"],
        "calibration_tokens": model.brickwork["calibration_tokens"],
        "layers": [_layer_record(i, b) for i, b in sorted(bricks.items())],
    }
    with atomic_directory(directory) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        atomic_write_text(tmp / "brickwork.json", json.dumps(meta, indent=2))
        atomic_write_text(tmp / "README.md", _model_card(meta))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)


def _read_meta(directory: Path) -> dict:
    path = directory / "brickwork.json"
    if not directory.is_dir() or not path.is_file():
        raise BrickworkError(
            f"{directory} is not a carved brickwork model (no brickwork.json); create one with "
            "`brickwork carve` or brickwork.save()"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BrickworkError(f"{path} is damaged ({exc.msg}); save the model again") from exc
    if meta.get("format") != FORMAT:
        raise BrickworkError(f"{path} is not a carved-model record (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise BrickworkError(
            f"{directory} was saved by brickwork {meta.get('brickwork_version')}, newer than this "
            f"one ({__version__}); upgrade brickwork to load it"
        )
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise BrickworkError(f"{directory} is incomplete: {name} is missing; save the model again")
    return meta


def load(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a carved model saved by :func:`save` (no calibration data needed). Returns the model.

    The tokenizer, when saved, loads with ``transformers.AutoTokenizer.from_pretrained(directory)``.
    """
    import transformers

    directory = Path(directory)
    meta = _read_meta(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    model_class = getattr(transformers, meta["model_class"], None)
    if model_class is None:
        raise BrickworkError(f"this transformers has no {meta['model_class']}; upgrade transformers")
    model = model_class(config)
    ffns = find_ffns(model)
    for record in meta["layers"]:
        index = record["layer"]
        if index >= len(ffns):
            raise BrickworkError(f"{directory}: carved layer {index} does not exist in the base config")
        router_class = ROUTERS.get(record["router"])
        if router_class is None:
            raise BrickworkError(f"{directory}: unknown router '{record['router']}'")
        router = router_class.empty(
            record["num_experts"],
            record["d_model"],
            record["d_ff"],
            record["gated"],
            routed_neurons=record["num_experts"] * record["expert_size"],
            **record["router_config"],
        )
        ffn = ffns[index]
        brick = BrickFFN(
            record["d_model"],
            record["num_shared"],
            record["num_experts"],
            record["expert_size"],
            record["active"],
            ffn.activation,
            router,
            gated=record["gated"],
            up_bias=record["up_bias"],
            gate_bias=record["gate_bias"],
            down_bias=record["down_bias"],
            down_keep=record.get("down_keep"),
            accumulate=record.get("accumulate", "float32"),  # saved before the option: float32 sums
        )
        brick.stock_routing = record.get("stock_routing")
        _swap_in(ffn, brick)
    try:
        missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise BrickworkError(
            f"{directory}/model.safetensors is damaged or does not match brickwork.json: {str(exc)[:500]}"
        ) from exc
    if missing or unexpected:
        raise BrickworkError(
            f"{directory}/model.safetensors does not match brickwork.json (missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.brickwork = {
        "config": CarveConfig.from_dict(meta["carve_config"]).to_dict(),
        "calibration": meta["calibration"],
        "calibration_tokens": meta["calibration_tokens"],
    }
    model.name_or_path = str(directory)
    return model.to(device).eval()
