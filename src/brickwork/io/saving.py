"""Saving and loading carved models: safetensors weights, the base config, a versioned brickwork config.

A saved directory holds ``config.json`` (the base model's ``transformers`` config), ``model.safetensors``
(every weight, bricks included; no pickle), ``brickwork.json`` (format version, the CarveConfig, each carved
layer's :class:`~brickwork.bricks.spec.BrickSpec` and active fraction, calibration provenance), the tokenizer
when given, and a short ``README.md`` model card. It is written to a temporary directory and renamed, so an
interrupted save leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import _remove_duplicate_names, load_model, save_file

from brickwork.bricks.budget import restore_calibrated
from brickwork.bricks.combine import Combine
from brickwork.bricks.merged import MergedBricks, layer_modules
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.record import (
    FORMAT,
    FORMAT_VERSION,
    OPS_FORMAT_VERSION,
    header,
    layer_record,
    model_card,
)
from brickwork.bricks.spec import DTYPES, BrickSpec
from brickwork.bricks.state import RECORDED, _swap_in, carve_state
from brickwork.carving.config import CarveConfig, check_router_options
from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_directory, atomic_write_text
from brickwork.models.config_check import check_recorded_settings
from brickwork.models.loading import check_model_dir, register_directory_loader
from brickwork.models.specs import find_ffns
from brickwork.routing import ROUTERS
from brickwork.version import __version__

MAX_CHILDREN = 256  # a merged record asking for more is damaged


def _grown_spec(directory: Path, record: dict):
    """The GrownSpec of a layer record's ``grown`` bank, None when it has none (files before grow had none)."""
    from brickwork.bricks.grown import GrownSpec

    if "grown" not in record:
        return None
    try:
        return GrownSpec.from_dict(record["grown"])
    except (TypeError, ValueError) as exc:
        raise BrickworkError(
            f"{directory}/brickwork.json: layer {record['layer']}'s 'grown' record is damaged ({exc}); save the "
            "model again"
        ) from exc


def _merged_record(model, layers: dict) -> dict | None:
    """The ``merged`` record of a model merged from several children (:mod:`brickwork.ops.merge`), else None."""
    merged = {i: m for i, m in layers.items() if isinstance(m, MergedBricks)}
    if not merged:
        return None
    children = {m.merged_children for m in merged.values()}
    if len(children) != 1:
        raise BrickworkError(f"the merged layers hold different numbers of children ({sorted(children)})")
    return {
        "children": children.pop(),
        "layers": sorted(merged),
        "domains": (model.brickwork.merged or {}).get("domains"),
    }


def check_finite(model) -> None:
    """Refuse a model holding NaN or infinite weights (a diverged training run): it must not be saved."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BrickworkError(f"the model's weight {name} holds NaN or infinite values; nothing was saved")


def weights_dtype(tensors) -> str | list[str]:
    """The floating dtype of the weights saved (a sorted list when they have several), which load verifies."""
    names = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()})
    return names[0] if len(names) == 1 else names


def write_weights(model, path: Path, format: str) -> None:
    """``model.safetensors`` with the same bytes for the same weights: tied weights are stored once (the load
    ties them again), and the metadata holds one key (safetensors writes several in a random order)."""
    state = model.state_dict()
    for removed in _remove_duplicate_names(state).values():
        for name in removed:
            del state[name]
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": format})


def save(
    model,
    directory: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    inputs: tuple = (),
) -> Path:
    """Save a carved model to ``directory``, atomically; ``extra_files`` (name -> text) are written with it.

    An existing carve there is replaced; any other non-empty directory only with ``overwrite=True``; ``inputs``
    (paths the caller read) may be neither ``directory`` nor inside it. Models with non-finite weights are refused.
    """
    bricks = layer_modules(model)
    state = carve_state(model)
    if not bricks or state is None or not state.complete:
        raise BrickworkError(
            "save() takes a model carved with brickwork.carve_; for a dense model use model.save_pretrained"
        )
    check_finite(model)
    layers = [layer_record(i, b) for i, b in sorted(bricks.items())]
    record = {name: getattr(state, name) for name in RECORDED}
    weights = weights_dtype(model.state_dict().values())
    base_model = str(getattr(model, "name_or_path", ""))
    meta = header(model, base_model, record, layers, weights, merged=_merged_record(model, bricks))
    with atomic_directory(directory, "carve", overwrite, inputs) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        write_weights(model, tmp / "model.safetensors", FORMAT)
        atomic_write_text(tmp / "README.md", model_card(meta))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)
        atomic_write_text(tmp / "brickwork.json", json.dumps(meta, indent=2))  # the marker, last
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
    except (RecursionError, UnicodeDecodeError) as exc:
        raise BrickworkError(f"{path} is damaged (not a carved-model record); save the model again") from exc
    if isinstance(meta, dict) and meta.get("format") != FORMAT:
        raise BrickworkError(f"{path} is not a carved-model record (format {meta.get('format')!r})")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BrickworkError(f"{path} is not a carved-model record")
    version = meta.get("format_version", FORMAT_VERSION)  # files before versions were format 1
    if not _is_int(version, FORMAT_VERSION):
        raise BrickworkError(
            f"{path}: format_version is {version!r}, not a format ({FORMAT_VERSION} to {OPS_FORMAT_VERSION}); "
            "save the model again"
        )
    if version > OPS_FORMAT_VERSION:
        writer = meta.get("brickwork_version")
        by = f" (written by brickwork {writer})" if writer and writer != __version__ else ""
        raise BrickworkError(
            f"{directory} uses carved-model format {version!r}{by}; this brickwork ({__version__}) reads format "
            f"{OPS_FORMAT_VERSION} and older: upgrade brickwork to load it"
        )
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise BrickworkError(f"{directory} is incomplete: {name} is missing; save the model again")
    for key, allowed, what in (
        ("model_type", str, "a string"),
        ("model_class", str, "a string"),
        ("base_model", (str, type(None)), "a string"),
        ("calibration", (str, dict, type(None)), "a description of the calibration text"),
        ("weights_dtype", (str, list, type(None)), "a dtype name"),
        ("base_settings", (dict, type(None)), "an object"),
    ):
        if not isinstance(meta.get(key), allowed):
            raise BrickworkError(
                f"{path}: {key} is {_shown(meta.get(key))}, not {what}; save the model again"
            )
    tokens = meta.get("calibration_tokens")
    if tokens is not None and not _is_int(tokens, 0):
        raise BrickworkError(
            f"{path}: calibration_tokens is {_shown(tokens)}, not a count; save the model again"
        )
    return meta


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _model_class(directory: Path, meta: dict, config):
    """The model class ``brickwork.json`` names, if it is one transformers itself maps to this config's model type
    (causal LM, base model or masked LM); anything else is refused, never looked up and called."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    if meta.get("model_type") != config.model_type:
        raise BrickworkError(
            f"{directory}: brickwork.json says model type {meta.get('model_type')!r}, config.json "
            f"{config.model_type!r}; save the model again"
        )
    allowed: set[str] = set()
    for mapping in (
        auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        auto.MODEL_MAPPING_NAMES,
        auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    ):
        names = mapping.get(config.model_type, ())
        allowed.update([names] if isinstance(names, str) else names)
    name = meta.get("model_class")
    if not isinstance(name, str) or name not in allowed:
        raise BrickworkError(
            f"{directory}: model class {name!r} is not one transformers uses for {config.model_type} models "
            f"({', '.join(sorted(allowed)) or 'none'})"
        )
    model_class = getattr(transformers, name, None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise BrickworkError(f"this transformers has no {name}; upgrade transformers")
    return model_class


def _is_int(value, low: int, high: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )


def _check_record(directory: Path, record, ffns: list, seen: set) -> BrickSpec:
    """One carved layer's record as a :class:`BrickSpec`, every field checked against its allowed values and the
    base model's FFN shapes (BrickworkError naming the field)."""

    def bad(what: str):
        raise BrickworkError(f"{directory}/brickwork.json: carved layer record {what}; save the model again")

    if not isinstance(record, dict):
        bad(f"{record!r} is not an object")
    needed = [
        "layer",
        "d_model",
        "d_ff",
        "num_shared",
        "num_experts",
        "expert_size",
        "active",
        "gated",
        "up_bias",
        "gate_bias",
        "down_bias",
        "router",
        "router_config",
    ]
    absent = [k for k in needed if k not in record]
    if absent:
        bad(f"lacks {absent}")
    index = record["layer"]
    if not _is_int(index, 0, len(ffns) - 1):
        bad(f"layer {index!r} is not a layer of the base model (0 to {len(ffns) - 1})")
    if index in seen:
        bad(f"layer {index} appears twice")
    seen.add(index)
    ffn = ffns[index]
    weights = ffn.read()
    expected = {
        "d_model": weights.d_model,
        "d_ff": weights.d_ff,
        "gated": weights.gate is not None,
        "up_bias": weights.up_bias is not None,
        "gate_bias": weights.gate_bias is not None,
        "down_bias": weights.down_bias is not None,
    }
    pruned_from = record.get("pruned_from")
    if pruned_from is not None:  # a pruned brick keeps fewer neurons than the base model's FFN
        if pruned_from != weights.d_ff or type(pruned_from) is not int:
            bad(f"{index}: pruned_from is {pruned_from!r}, the base model's FFN has d_ff {weights.d_ff}")
        if not _is_int(record["d_ff"], 1, weights.d_ff - 1):
            bad(f"{index}: d_ff {record['d_ff']!r} of a pruned layer is not in [1, {weights.d_ff - 1}]")
        expected["d_ff"] = record["d_ff"]
    for key, value in expected.items():
        if record[key] != value or type(record[key]) is not type(value):
            bad(f"{index}: {key} is {record[key]!r}, the base model's FFN has {value!r}")
    try:
        spec = _record_spec(record)  # the values' own ranges; d_ff matched the base model's above
    except ValueError as exc:
        bad(f"{index}: {exc}")
    if spec.router not in ROUTERS:
        bad(f"{index}: unknown router {spec.router!r} (known: {', '.join(sorted(ROUTERS))})")
    try:
        check_router_options(spec.router, spec.router_config, builder="empty")
    except ValueError as exc:
        bad(f"{index}: {exc}")
    down_keep = record.get("down_keep")
    if down_keep is not None and down_keep > spec.computed_neurons:
        bad(f"{index}: down_keep {down_keep!r} is not in [1, {spec.computed_neurons}]")
    return spec


def _check_merged(directory: Path, meta: dict) -> tuple[int, set[int]]:
    """The merged record's children per merged layer and its merged layers ((1, {}) for a carve that is not
    merged)."""
    record = meta.get("merged")
    if record is None:
        return 1, set()
    carved = [r.get("layer") for r in meta["layers"] if isinstance(r, dict)]
    layers = record.get("layers") if isinstance(record, dict) else None
    if (
        not isinstance(record, dict)
        or not _is_int(record.get("children"), 2, MAX_CHILDREN)
        or not isinstance(layers, list)
        or not layers
        or len(set(layers)) != len(layers)
        or not all(_is_int(i, 0) and i in carved for i in layers)
    ):
        raise BrickworkError(
            f"{directory}/brickwork.json: the merged record is damaged (children 2 to {MAX_CHILDREN}, layers "
            "among the carved ones); save the model again"
        )
    return record["children"], set(layers)


def _record_spec(record: dict) -> BrickSpec:
    """The spec in a layer record (files of every brickwork version: see :meth:`BrickSpec.from_dict` and
    :func:`_combine`)."""
    # the provenance fields are checked where they are set (_empty_brick), with their own messages
    data = {k: v for k, v in record.items() if k in BrickSpec.record_keys() - {"calibrated", "pruned_from"}}
    data["combine"] = _combine(record).to_dict()
    return BrickSpec.from_dict(data)


def _combine(record: dict) -> Combine:
    """The brick's combination rule; records written before the rule existed may say ``stock_routing``
    (``{temperature, renormalise, scale}``, the export conversion's weights) or nothing (``sum``)."""
    if "combine" in record:
        return Combine.from_dict(record["combine"])
    stock = record.get("stock_routing")
    if stock is None:
        return Combine()
    if not isinstance(stock, dict) or set(stock) != {"temperature", "renormalise", "scale"}:
        raise ValueError(f"stock_routing {stock!r} is not {{temperature, renormalise, scale}}")
    if not isinstance(stock["renormalise"], bool):
        raise ValueError(f"stock_routing renormalise {stock['renormalise']!r} is not true or false")
    rule = "softmax_topk" if stock["renormalise"] else "softmax"
    return Combine(rule, temperature=stock["temperature"], scale=stock["scale"])


def _empty_brick(directory: Path, record: dict, spec: BrickSpec, ffn) -> BrickFFN:
    """An empty brick of a checked layer ``record``'s ``spec``, with its carved settings, to load weights into."""
    router = ROUTERS[spec.router].empty(
        spec.num_experts,
        spec.d_model,
        spec.d_ff,
        spec.gated,
        routed_neurons=spec.num_experts * spec.expert_size,
        **spec.router_config,
    )
    # a layer pruned for a domain (brickwork prune) records the dense d_ff (checked in _check_layer)
    spec = replace(spec, pruned_from=record.get("pruned_from"))
    brick = BrickFFN.from_spec(spec, ffn.activation, router)
    carved = record.get("calibrated")  # written since run-time budgets: the settings set_budget restores
    if carved is not None:
        try:
            restore_calibrated(brick, carved)
        except (TypeError, ValueError) as exc:
            raise BrickworkError(
                f"{directory}/brickwork.json: layer {record['layer']}'s 'calibrated' record is damaged ({exc})"
            ) from exc
    return brick


# safetensors' dtype names
_STORED_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _check_stored_dtypes(directory: Path, meta: dict, layers: list[dict], model) -> None:
    """Refuse weights stored in a dtype the record does not name: a float weight stored as integers would load
    truncated, a float16 one upcast without a word. The record's dtype is ``weights_dtype`` (written since load
    checks it), else a sequential carve's storage dtype, else the layers' ``dtype``."""
    from safetensors import safe_open

    sequential = meta.get("sequential")
    recorded = meta.get("weights_dtype") or (
        sequential.get("weights_dtype") if isinstance(sequential, dict) else None
    )
    if recorded is None:
        recorded = sorted({r.get("dtype", "float32") for r in layers})
    expected = {recorded} if isinstance(recorded, str) else set(recorded)
    if not expected <= set(DTYPES):
        raise BrickworkError(
            f"{directory}/brickwork.json: weights_dtype {_shown(recorded)} is not among {', '.join(DTYPES)}; save "
            "the model again"
        )
    path = directory / "model.safetensors"
    state = model.state_dict()
    try:
        with safe_open(str(path), "pt") as handle:
            stored = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise BrickworkError(f"{path} is damaged or does not match brickwork.json: {str(exc)[:300]}") from exc
    for name, code in stored.items():
        if name not in state:
            continue  # an unexpected weight: refused below, with the others
        dtype = _STORED_DTYPES.get(code, code)
        wanted = state[name]
        if wanted.is_floating_point() and dtype not in expected:
            raise BrickworkError(
                f"{path}: the weight {name} is stored as {dtype}; brickwork.json records {', '.join(sorted(expected))}"
                " (save the model again)"
            )
        if not wanted.is_floating_point() and dtype != str(wanted.dtype).removeprefix("torch."):
            raise BrickworkError(
                f"{path}: {name} is stored as {dtype}, the model holds it as "
                f"{str(wanted.dtype).removeprefix('torch.')} (save the model again)"
            )


def load(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a carved model saved by :func:`save` (no calibration data needed). Returns the model.

    Every field of ``brickwork.json`` is checked against its allowed values and the base model's shapes before
    anything is built. The tokenizer, when saved, loads with ``transformers.AutoTokenizer.from_pretrained``.
    """
    import transformers

    directory = Path(directory)
    meta = _read_meta(directory)
    check_model_dir(directory)  # config.json's fields, before transformers builds anything from them
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BrickworkError(f"{directory}/config.json is damaged: {str(exc)[:300]}") from exc
    if meta.get("base_settings") is not None:  # written since load verifies them
        check_recorded_settings(meta["base_settings"], config, f"{directory}/brickwork.json")
    model_class = _model_class(directory, meta, config)
    try:
        carve_config = CarveConfig.from_dict(meta.get("carve_config"))
    except (TypeError, ValueError) as exc:
        raise BrickworkError(f"{directory}/brickwork.json: carve_config is invalid: {exc}") from exc
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise BrickworkError(f"{directory}/brickwork.json lists no carved layer; save the model again")
    try:
        model = model_class(config)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise BrickworkError(
            f"{directory}/config.json builds no {model_class.__name__} ({str(exc)[:300]}); restore it"
        ) from exc
    ffns = find_ffns(model)
    seen: set[int] = set()
    specs = [_check_record(directory, record, ffns, seen) for record in layers]  # all, before building any
    grown = [_grown_spec(directory, record) for record in layers]
    children, merged = _check_merged(directory, meta)
    # The weights load into the rebuilt model's dtype (float32), as they always have, whatever they were carved in.
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    for record, spec, grown_spec in zip(layers, specs, grown, strict=True):
        index, spec = record["layer"], replace(spec, dtype=dtype)
        ffn = ffns[index]
        bricks = [
            _empty_brick(directory, record, spec, ffn) for _ in range(children if index in merged else 1)
        ]
        if grown_spec is not None:  # an empty bank: its weights load with the others
            from brickwork.bricks.grown import GrownExperts

            for brick in bricks:
                brick.grown = GrownExperts.for_brick(brick, grown_spec)
        _swap_in(model, ffn, MergedBricks(bricks) if index in merged else bricks[0])
    _check_stored_dtypes(directory, meta, layers, model)
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
    for name, tensor in model.state_dict().items():  # one pass: a NaN weight would make every logit NaN
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BrickworkError(
                f"{directory}/model.safetensors: the weight {name} holds NaN or infinite values; the model cannot "
                "be used (save it again from a sound copy)"
            )
    state = carve_state(model, create=True)
    state.config = carve_config.to_dict()
    state.calibration = meta.get("calibration")
    state.calibration_tokens = meta.get("calibration_tokens")
    if merged:
        state.merged = meta["merged"]
    model.name_or_path = str(directory)
    return model.to(device).eval()


register_directory_loader("brickwork.json", load)  # load_model() of a saved carve loads it here
