"""``brickwork.json``, the record of a saved carve, written in one place: :func:`header` builds it for
:func:`brickwork.save` (a model in memory) and :func:`~brickwork.carving.sequential.carve_sequential` (a model
carved layer by layer, never whole in memory); :func:`model_card` is the ``README.md`` beside it.

Each carved layer's record is its spec's own :meth:`~brickwork.bricks.spec.BrickSpec.to_dict` with the layer's
index and the FFN weights a token reads (``reads``; older files call it ``active_fraction``; load reads neither); a grown bank adds its own spec. Reading and
checking the record is :func:`brickwork.load`'s (:mod:`brickwork.io.saving`).
"""

from __future__ import annotations

from brickwork.models.config_check import recorded_settings
from brickwork.version import __version__

FORMAT = "brickwork-carved"
FORMAT_VERSION = 1
# 2: a model the brick operations changed (brickwork.ops): a "merged" record, or layers with "grown" experts or
# "pruned_from"; or layers whose weighted rule was fitted for more than one top-k (a "combine" in "calibrated",
# "combine_fits" in the spec); plain carves still write 1, so older brickwork reads them, and says "upgrade" for
# the others
OPS_FORMAT_VERSION = 2


def layer_record(index: int, layer) -> dict:
    """The record of carved layer ``index``: its BrickFFN's (or a MergedBricks' first branch's: they share one
    spec) spec, the reads of the layer, and a grown bank's spec when it has one."""
    brick = layer.branches[0] if hasattr(layer, "branches") else layer
    # the spec's own record: shapes, rule, the carved settings set_budget(model, None) restores, pruned_from
    record = {"layer": index, **brick.spec.to_dict(), "reads": layer.read_fraction()}
    if brick.grown is not None:  # new bricks grown beside the carved ones (brickwork.ops.grow)
        record["grown"] = brick.grown.spec.to_dict()
    return record


def format_version(layers: list[dict], merged: dict | None = None) -> int:
    """The format version a brickwork.json with these layer records (and ``merged`` record) is written as: the
    oldest that reads it (see :data:`OPS_FORMAT_VERSION`)."""
    changed = any("grown" in r or "pruned_from" in r or "combine" in r["calibrated"] for r in layers)
    return OPS_FORMAT_VERSION if merged is not None or changed else FORMAT_VERSION


def header(
    model,
    base_model: str,
    carve: dict,
    layers: list[dict],
    weights_dtype,
    sequential: dict | None = None,
    merged: dict | None = None,
) -> dict:
    """brickwork.json for ``model`` (the carved model, or a sequential carve's skeleton): ``carve`` holds the
    carve-level record (``config``, ``calibration``, ``calibration_tokens``: see
    :data:`brickwork.bricks.state.RECORDED`), ``layers`` the :func:`layer_record` of each carved layer."""
    meta = {
        "format": FORMAT,
        "format_version": format_version(layers, merged),
        "brickwork_version": __version__,
        "base_model": base_model,
        "model_type": model.config.model_type,
        "model_class": type(model).__name__,
        "carve_config": carve["config"],
        "calibration": carve["calibration"],
        "calibration_tokens": carve["calibration_tokens"],
        "layers": layers,
    }
    if sequential is not None:
        meta["sequential"] = sequential
    meta["base_settings"] = recorded_settings(model.config)
    meta["weights_dtype"] = weights_dtype
    if merged is not None:
        meta["merged"] = merged
    return meta


def model_card(meta: dict) -> str:
    """The ``README.md`` of a saved carve, from its brickwork.json."""
    config = meta["carve_config"]
    fractions = [layer["reads"] for layer in meta["layers"]]
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
            *(
                [
                    f"- merged from {meta['merged']['children']} children; routed layers: {meta['merged']['layers']}",
                    "",
                ]
                if "merged" in meta
                else []
            ),
            "Load with `brickwork.load(path)`; the result is a `transformers` model (`generate()` works).",
            "",
        ]
    )
