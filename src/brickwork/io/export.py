"""Export carved models to stock Mixture-of-Experts architectures that unmodified engines load.

The formats, one file each, are in :mod:`brickwork.io.formats` (``EXPORT_FORMATS``): each says what it holds and
refuses, its config and its tensors. This module is the pipeline they share: plan (:func:`plan_export`), choose
the router temperature, build the stock model, write it atomically, load it back with stock ``transformers`` and
compare logits with the carved model.

Routing. A carve made with a weighted combine rule (``brickwork carve --combine softmax``, ``softmax_topk`` or
``sigmoid``, :mod:`brickwork.bricks.combine`) exports exactly by construction to a format whose router computes
that rule: the rule is what the stock router computes, its temperature divides the router weights (a power of two)
and its scale multiplies the experts' down projections.

A carve with the default ``sum`` rule sums the selected experts with weight 1; stock routers weight them by
softmax probabilities. Top-1 with renormalisation (``norm_topk_prob``; Mixtral always renormalises) gives weight 1
exactly, so top-1 carves export exactly. For top-k > 1 the router logits are divided by a power of two T (exact
in floating point, and it keeps their order) so that the top-k probabilities are nearly equal, and the experts'
down projections are multiplied by the number of probabilities they share: k with renormalisation, the number
of experts without it (llama.cpp's qwen2moe never renormalises). Each expert's weight is then
``1 + O(spread / T)`` where ``spread`` is the range of the router's logits; a larger T makes the weights more
equal but lets floating-point ties reorder experts whose logits are within about ``T * 2^-23`` of each other.
T is chosen per layer on held-out tokens: the smallest power of two whose stock routing, simulated in fp32,
reproduces brickwork's routed sum to a mean per-token relative squared error of 1e-6 (larger T only adds the
risk of reordering near-tied experts on unseen tokens, which the sample cannot show).

Refused by every format, with the reason (:meth:`brickwork.io.formats.base.StockFormat.plan`): routers that are
not linear in the FFN input (the stock gate is one ``Linear`` with no bias), down-row sparsity, experts or top-k
that differ between layers, FFN or attention output biases, activations other than SiLU; each format adds its own.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from brickwork.bricks.combine import Combine
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError
from brickwork.io.formats import DEFAULT_FORMAT, EXPORT_FORMATS, ExportPlan, StockFormat, get_format
from brickwork.io.formats.base import EXPORT_MARKER, export_record

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FORMAT",
    "EXPORT_FORMATS",
    "EXPORT_MARKER",
    "ExportReport",
    "build_stock_model",
    "check_export_output",
    "compare_logits",
    "export",
    "export_record",
    "load_exported",
    "plan_export",
    "stock_routing_copy",
]


@dataclass
class ExportReport:
    format: str
    path: str
    seconds: float
    temperatures: dict[int, float] = field(default_factory=dict)  # carved layer -> router logit divisor
    validation: dict | None = None  # kl, agreement, max_logit_diff, tokens
    conversion: dict | None = None  # stock_routing: how far the converted carve is from the original

    def to_dict(self) -> dict:
        return asdict(self)


def plan_export(model, format: str | StockFormat) -> ExportPlan:
    """What ``format`` takes from the carved ``model`` (BrickworkError saying what it cannot hold, and what to do)."""
    return get_format(format).plan(model)


# --- router temperature --------------------------------------------------------------------------------
@torch.no_grad()
def _capture_inputs(model, bricks: dict[int, BrickFFN], windows: torch.Tensor, limit: int = 2048) -> dict:
    """Up to ``limit`` FFN inputs of each carved layer on ``windows``."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []

    def hook(index):
        def record(module, args):
            if sum(len(t) for t in seen.get(index, [])) < limit:
                seen.setdefault(index, []).append(args[0].reshape(-1, args[0].shape[-1]).detach().float())

        return record

    try:
        for index, brick in bricks.items():
            handles.append(brick.register_forward_pre_hook(hook(index)))
        for batch in windows.split(4):
            model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(v)[:limit] for i, v in seen.items()}


_GOOD_ENOUGH = 1e-6  # mean per-token relative squared error of the routed sum (expert weights within ~1e-3)


@torch.no_grad()
def _choose_temperature(brick: BrickFFN, x: torch.Tensor, renormalise: bool) -> tuple[float, float]:
    """The power of two T whose stock routing (softmax of logits / T, top-k, renormalised or not, experts
    scaled to compensate) best reproduces brickwork's unweighted routed sum on ``x`` (mean per-token relative
    squared error, returned with it)."""
    spec = brick.spec
    s, e, size, k, d = spec.num_shared, spec.num_experts, spec.expert_size, spec.active, spec.d_model
    weight, _ = brick.router.linear_form()
    weight = weight.detach().float()
    gate = brick.gate.detach()[s:].view(e, size, d)
    up = brick.up.detach()[s:].view(e, size, d)
    down = brick.down_t.detach()[s:].view(e, size, d)
    h = torch.nn.functional.silu(torch.einsum("nd,esd->nes", x, gate)) * torch.einsum("nd,esd->nes", x, up)
    outputs = torch.einsum("nes,esd->ned", h, down)  # every expert's output for every token
    chosen = brick.select(x)
    reference = outputs.gather(1, chosen[..., None].expand(-1, -1, d)).sum(1)
    scale = k if renormalise else e
    best, best_error = 1.0, math.inf
    for power in range(0, 25):
        t = 2.0**power
        probs = torch.softmax(torch.nn.functional.linear(x, weight / t), dim=-1)
        top = probs.topk(k, dim=-1)
        w = top.values / top.values.sum(-1, keepdim=True) if renormalise else top.values
        y = (outputs.gather(1, top.indices[..., None].expand(-1, -1, d)) * (w * scale)[..., None]).sum(1)
        # per-token relative error, averaged: a few tokens with huge activations must not set T for the rest
        error = float(((y - reference).pow(2).sum(-1) / reference.pow(2).sum(-1).clamp_min(1e-30)).mean())
        if error <= _GOOD_ENOUGH:  # the smallest such T: larger ones only add the risk of reordered experts
            return t, error
        if error < best_error:
            best, best_error = t, error
    return best, best_error


def _temperatures(
    plan: ExportPlan, format: str | StockFormat, inputs: dict[int, torch.Tensor] | None
) -> dict[int, float]:
    fmt = get_format(format).stock(plan)  # the router the temperature is chosen for
    if plan.rule != "sum":
        return {index: brick.spec.combine.temperature for index, brick in plan.bricks.items()}
    if fmt.exact(plan):
        return dict.fromkeys(plan.bricks, 1.0)
    if inputs is None:
        raise BrickworkError(
            "this export (top-k > 1, or GGUF) needs validation windows to choose the router temperature"
        )
    chosen = {}
    for index, brick in plan.bricks.items():
        chosen[index], error = _choose_temperature(brick, inputs[index], renormalise=fmt.renormalises_sum)
        logger.info(
            "layer %d: router temperature %g, routed relative error %.2e", index, chosen[index], error
        )
    return chosen


# --- building the stock model ------------------------------------------------------------------------
def build_stock_model(
    model, format: str | StockFormat, temperatures: dict[int, float], shared_gates: dict | None = None
):
    """The stock ``transformers`` model that computes what the carved model computes (the format's own:
    :meth:`~brickwork.io.formats.base.StockFormat.build`).

    ``shared_gates`` (GGUF): each carved layer's shared-expert gate vector instead of zeros."""
    fmt = get_format(format)
    plan = fmt.plan(model)
    return fmt.stock(plan).build(model, plan, temperatures, shared_gates)


def stock_routing_copy(model, format: str | StockFormat, temperatures: dict[int, float]):
    """A copy of the carved ``model`` whose bricks weight their experts as ``format``'s stock router does: the
    ``sum`` rule becomes ``softmax`` (a router that does not renormalise, as llama.cpp's qwen2moe) or
    ``softmax_topk`` at each layer's temperature, with the experts scaled by the number of probabilities they
    share (all experts, or the top-k). Each brick gets a new spec; ``model`` is not changed."""
    fmt = get_format(format)
    plan = fmt.plan(model)
    fmt = fmt.stock(plan)  # the router whose weighting the copy takes
    share = fmt.sum_share(plan)
    converted = copy.deepcopy(model)
    for index, brick in carved_layers(converted).items():
        combine = Combine(fmt.sum_rule(), temperature=temperatures[index], scale=float(share))
        brick.spec = replace(brick.spec, combine=combine)
    return converted


# --- validation -----------------------------------------------------------------------------------------
@torch.no_grad()
def compare_logits(reference, other, windows: torch.Tensor) -> dict:
    """KL(reference || other) per token, top-1 agreement and the largest |logit difference|."""
    kl, agree, count, max_diff = 0.0, 0, 0, 0.0
    for batch in windows.split(4):
        a = reference(input_ids=batch).logits.float()
        b = other(input_ids=batch).logits.float()
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kl += (la.exp() * (la - lb)).sum().item()
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        count += a.shape[0] * a.shape[1]
        max_diff = max(max_diff, (a - b).abs().max().item())
    return {"kl": kl / count, "agreement": agree / count, "max_logit_diff": max_diff, "tokens": count}


# export's options as ``brickwork export`` shows them (the defaults are the signature's).
EXPORT_HELP = {
    "validate_data": "validation text",
    "validate_tokens": "validation tokens",
    "window": "tokens per validation window",
    "dtype": "dtype of the exported weights",
    "stock_routing": "top-k > 1: first convert the carve to weight its experts as the stock router does, so "
    "the export is exact (the change this makes to the carve is measured and printed)",
}


def export(
    model,
    out: str | Path,
    format: str = DEFAULT_FORMAT,
    tokenizer=None,
    validate_data: str | Path | None = "botchan",
    validate_tokens: int = 2048,
    window: int = 512,
    dtype: Literal["float32", "float16"] = "float32",
    validate: bool = True,
    stock_routing: bool = False,
    overwrite: bool = False,
    sources: tuple = (),
) -> ExportReport:
    """Write ``model`` (carved) in a stock MoE format (a name in ``EXPORT_FORMATS``) and check it against the
    carved model.

    The output is written atomically. With ``validate_data``, the result is loaded back with stock
    ``transformers`` (no remote code) and compared on ``validate_tokens`` tokens of it; those windows also set
    the router temperature of top-k > 1 carves with the ``sum`` rule (and the GGUF shared gate); ``validate=False``
    uses them for that only. Without ``validate_data``, only carves with a weighted combine rule and top-1 carves
    export to formats that renormalise (qwen2_moe, mixtral, qwen3_moe, llama.cpp's qwen3moe GGUF), and only
    weighted ones to the others.

    ``stock_routing=True`` exports a copy of a ``sum`` carve converted to a weighted combine rule with the chosen
    temperature (:func:`stock_routing_copy`), so that the export computes what the converted carve computes;
    ``report.conversion`` says how far the conversion moved the carve, and the validation compares the export
    with the converted copy. ``model`` itself is never changed. Carving with a weighted rule makes this
    unnecessary.

    An existing export at ``out`` is replaced; anything else only with ``overwrite=True`` (see
    :func:`check_export_output`); ``sources`` (paths read) may be neither ``out`` nor inside it. A directory
    export carries ``brickwork-export.json`` (this report).
    """
    from brickwork.data.sources import token_windows

    started = time.perf_counter()
    fmt = get_format(format)
    check_export_output(out, fmt, overwrite, sources)
    plan = fmt.plan(model)
    router = fmt.stock(plan)  # the stock model built and how it routes (a file format names one per plan)
    windows = None
    if validate_data is not None:
        if tokenizer is None:
            raise BrickworkError("validation needs the tokenizer; pass tokenizer= or validate_data=None")
        windows = token_windows(tokenizer, validate_data, window, validate_tokens)
    # inputs set the sum rule's temperature, and what else the format sets on them (the qwen2moe GGUF shared gate)
    needs_inputs = windows is not None and (router.needs_inputs(plan) or not router.exact(plan))
    inputs = _capture_inputs(model, plan.bricks, windows) if needs_inputs else None
    temperatures = _temperatures(plan, fmt, inputs)
    shared_gates = router.shared_gates(plan, inputs)
    report_conversion = None
    source = model  # what the export is built from and validated against
    if stock_routing and not router.exact(plan):
        source = stock_routing_copy(model, fmt, temperatures)
        report_conversion = compare_logits(model, source, windows)
    stock = build_stock_model(source, fmt, temperatures, shared_gates)
    out = Path(out)
    report = ExportReport(
        format=fmt.name, path=str(out), seconds=0.0, temperatures=temperatures, conversion=report_conversion
    )
    with fmt.output(out, overwrite, sources) as tmp:
        fmt.write(stock, tmp, tokenizer, dtype)
        if windows is not None and validate:  # validated before it replaces anything
            report.validation = compare_logits(source, fmt.load(tmp), windows)
        fmt.finish(tmp, report, started)
    report.seconds = time.perf_counter() - started
    return report


def check_export_output(
    out: str | Path, format: str | StockFormat, overwrite: bool = False, inputs: tuple = ()
) -> Path:
    """Refuse, before any work, an export output that cannot or may not be written (BrickworkError)."""
    return get_format(format).check_output(Path(out).expanduser(), overwrite, inputs)


def load_exported(path: str | Path, format: str | StockFormat):
    """The exported model as stock ``transformers`` loads it (no ``trust_remote_code``), in float32."""
    return get_format(format).load(Path(path))
