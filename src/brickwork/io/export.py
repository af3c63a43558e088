"""Export carved models to stock Mixture-of-Experts architectures that unmodified engines load.

- ``qwen2_moe``: ``Qwen2MoeForCausalLM`` (transformers, vLLM). Shared neurons become the shared expert, whose
  sigmoid gate is zeroed (sigmoid(0) = 1/2 exactly) and compensated by doubling its down projection; routed
  experts and a linear router map to ``mlp.experts`` and ``mlp.gate``; uncarved layers are listed in
  ``mlp_only_layers``; q/k/v biases are zero where the source had none.
- ``mixtral``: ``MixtralForCausalLM``, for carves without shared neurons that carve every layer.
- ``glm4_moe``: ``Glm4MoeForCausalLM`` (GLM-4.5; transformers, vLLM, llama.cpp's ``glm4moe``): DeepSeek-V3's
  gate (sigmoid scores, a selection bias, shared experts; DeepSeek-AI 2024) with Llama-style attention, so it
  holds many fine-grained experts plus shared ones exactly (``carve --combine sigmoid``). Shared neurons become
  ``n_shared_experts`` ungated experts (their count must be a multiple of the expert size), the selection bias is
  zero, one expert group, no renormalisation, no partial rotary embedding or q/k norm; leading dense layers
  become ``first_k_dense_replace``.
- ``gguf``: a GGUF file in llama.cpp's ``qwen2moe`` architecture (``softmax`` and ``sum`` carves) or ``glm4moe``
  (``sigmoid`` carves); f32 or f16 tensors, the router stays f32. llama.cpp evaluates the qwen2moe shared gate
  as silu(z)/z, NaN at z = 0, so the GGUF shared gate is a tiny vector (|w . x| about 1e-4) rather than zero; the
  shared expert is then off by about 5e-5 relative. glm4moe's shared experts have no gate.

Routing. A carve made with a weighted combine rule (``brickwork carve --combine softmax`` or ``softmax_topk``,
:mod:`brickwork.bricks.combine`) exports exactly by construction: the rule is what the stock router computes, its
temperature divides the router weights (a power of two) and its scale multiplies the experts' down projections.
``softmax`` goes to qwen2_moe (``norm_topk_prob=False``) and gguf, ``softmax_topk`` to qwen2_moe and mixtral.

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

Refused, with the reason: routers that are not linear in the FFN input (the stock gate is one ``Linear`` with no
bias), down-row sparsity, experts or top-k that differ between layers, FFN or attention output biases,
activations other than SiLU, and (mixtral, gguf) layers left dense or shared neurons (mixtral).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from brickwork.bricks.carve import carved_layers
from brickwork.bricks.combine import STOCK_RULES, Combine
from brickwork.bricks.module import BrickFFN
from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_directory, atomic_file, atomic_write_text, check_output_dir
from brickwork.version import __version__

logger = logging.getLogger(__name__)

ExportFormat = Literal["qwen2_moe", "mixtral", "glm4_moe", "gguf"]
EXPORT_FORMATS: tuple[str, ...] = ("qwen2_moe", "mixtral", "glm4_moe", "gguf")
EXPORT_MARKER = "brickwork-export"  # brickwork-export.json's format: what check_output_dir recognises
_SOURCE_TYPES = ("llama", "mistral", "qwen2")
# GGUF only: typical |w . x| of the shared expert's gate (see _shared_gate_directions). At 1e-7, sigmoid(w . x)
# rounds to 1/2 in fp32 for most tokens (the spacing of fp32 near 1/2 is 6e-8), yet w . x stays far from zero
# and from fp32's smallest normal numbers (the gate is stored f32 even in f16 files).
_SHARED_GATE_LOGIT = 1e-7


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


# --- what can be exported ------------------------------------------------------------------------------
@dataclass
class _Plan:
    bricks: dict[int, BrickFFN]
    num_experts: int
    expert_size: int
    active: int
    shared: int
    rule: str  # the carve's combine rule (one for every layer)

    def stock_format(self, format: str) -> str:
        """The transformers architecture built for ``format``: a GGUF file of a ``sigmoid`` carve is glm4moe."""
        return rule_architecture(self.rule) if format == "gguf" else format


def rule_architecture(rule: str) -> str:
    """The stock transformers architecture that computes combine ``rule``: glm4_moe for ``sigmoid`` (GLM-4.5's
    gate), qwen2_moe for the others."""
    return "glm4_moe" if rule == "sigmoid" else "qwen2_moe"


def plan_export(model, format: str) -> _Plan:
    config = model.config
    if format not in EXPORT_FORMATS:
        raise BrickworkError(f"unknown export format '{format}'; choose from {', '.join(EXPORT_FORMATS)}")
    if config.model_type not in _SOURCE_TYPES:
        raise BrickworkError(
            f"export to {format} supports carved {', '.join(_SOURCE_TYPES)} models (Llama-style attention "
            f"and SwiGLU FFN); this model is '{config.model_type}'"
        )
    bricks = carved_layers(model)
    if not bricks:
        raise BrickworkError("the model has no carved layer: carve it first (brickwork carve)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise BrickworkError(f"stock MoE experts use SiLU; this model's FFN uses '{config.hidden_act}'")
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings and config.model_type == "mistral":
        raise BrickworkError(
            f"sliding-window attention (window {window} < {config.max_position_embeddings} positions) does not "
            "export to these formats"
        )
    if getattr(config, "mlp_bias", False) or (
        getattr(config, "attention_bias", False) and config.model_type != "qwen2"
    ):
        raise BrickworkError("FFN or attention output biases have no place in the stock MoE formats")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise BrickworkError(
            "heads x head_dim differs from hidden_size; Qwen2-MoE engines (vLLM) assume they are equal"
        )
    grown = sorted(index for index, brick in bricks.items() if brick.grown is not None)
    if grown:
        raise BrickworkError(
            f"layers {grown} hold grown bricks (brickwork.ops.grow), which stock MoE formats have no place for; "
            "export the model they were grown on (or remove them with brickwork.ops.grow.remove_grown_)"
        )
    specs = {index: brick.spec for index, brick in bricks.items()}
    budgeted = sorted(index for index, spec in specs.items() if spec.token_budget is not None)
    if budgeted:
        raise BrickworkError(
            f"layers {budgeted} choose how many experts each token runs (a per-token budget); stock MoE engines run "
            "a fixed top-k: remove it with brickwork.set_token_budget(model, None) (and save again) before exporting"
        )
    shapes = {(b.num_experts, b.expert_size, b.active, b.num_shared) for b in specs.values()}
    if len(shapes) > 1:
        raise BrickworkError(
            f"carved layers differ in experts / expert size / top-k / shared neurons ({sorted(shapes)}); stock "
            "MoE configs hold one value of each for the whole model"
        )
    num_experts, expert_size, active, shared = shapes.pop()
    rules = {b.combine.rule for b in specs.values()}
    if len(rules) > 1:
        raise BrickworkError(
            f"carved layers combine experts differently ({sorted(rules)}); a stock MoE config has one router rule"
        )
    rule = rules.pop()
    if rule != "sum" and rule not in STOCK_RULES[format]:
        fits = [f for f, held in STOCK_RULES.items() if rule in held]
        hint = {
            "gguf": "llama.cpp's qwen2moe does not renormalise the top-k weights: carve with --combine softmax "
            "(or sigmoid, for its glm4moe)",
            "mixtral": "Mixtral always renormalises the top-k weights: carve with --combine softmax_topk",
            "glm4_moe": "GLM-4.5's gate weights experts by sigmoid scores: carve with --combine sigmoid",
        }.get(format, "")
        raise BrickworkError(
            f"this carve weights its experts by '{rule}', which {format} cannot compute ({hint}); "
            f"export it to {' or '.join(fits)}"
        )
    for index, spec in specs.items():
        if spec.down_keep is not None:
            raise BrickworkError(
                f"layer {index} uses down-row sparsity (down_fraction), which stock experts cannot express"
            )
        if spec.up_bias or spec.gate_bias or spec.down_bias:
            raise BrickworkError(f"layer {index} has FFN biases; stock MoE experts have none")
        if not spec.gated:
            raise BrickworkError(f"layer {index} is not a gated (SwiGLU) FFN")
        form = bricks[index].router.linear_form()
        if form is None:
            raise BrickworkError(
                f"layer {index}'s router '{spec.router}' is not a linear function of the FFN input; stock "
                "MoE gates are one Linear layer. Carve with --router fitted (router option intercept=false) "
                "or --router centroid."
            )
        if form[1] is not None and bool(form[1].detach().abs().max() > 0):
            raise BrickworkError(
                f"layer {index}'s router has a bias; stock MoE gates have none. Carve with the fitted router's "
                "option intercept=false (brickwork carve --router-option intercept=false)."
            )
    if num_experts < 2 or active >= num_experts:
        raise BrickworkError("export needs routed experts to choose from (active < experts)")
    n_layers = config.num_hidden_layers
    if format == "glm4_moe" and rule == "sum":
        raise BrickworkError(
            "glm4_moe weights experts by sigmoid scores, never exactly 1 each: carve with --combine sigmoid"
        )
    if format == "glm4_moe" or (format == "gguf" and rule == "sigmoid"):
        dense = sorted(set(range(n_layers)) - set(bricks))
        if dense != list(range(len(dense))):
            raise BrickworkError(
                f"glm4_moe keeps only leading layers dense (first_k_dense_replace); layers {dense} are dense. "
                "Carve every layer after the first dense ones."
            )
        if format == "gguf":
            if dense:
                raise BrickworkError(f"layers {dense} are dense: carve every layer for a GGUF export")
            if not shared:
                raise BrickworkError(
                    "llama.cpp's glm4moe expects shared experts; this carve has none: carve with --shared > 0, "
                    "or export to glm4_moe"
                )
        if shared % expert_size:
            raise BrickworkError(
                f"glm4_moe's shared experts are whole experts: {shared} shared neurons is not a multiple of the "
                f"expert size {expert_size}; carve with --shared (a number of experts)"
            )
        return _Plan(bricks, num_experts, expert_size, active, shared, rule)
    if format in ("mixtral", "gguf") and len(bricks) != n_layers:
        dense = sorted(set(range(n_layers)) - set(bricks))
        raise BrickworkError(
            f"{format} needs every layer to be MoE; layers {dense} are dense. Carve every layer, or export "
            "to qwen2_moe (which keeps dense layers as mlp_only_layers)."
        )
    if format == "mixtral" and shared:
        raise BrickworkError(
            "mixtral has no shared expert; this carve has shared neurons: export to qwen2_moe"
        )
    if format in ("qwen2_moe", "gguf") and not shared:
        raise BrickworkError(
            f"{format} expects a shared expert; this carve has none: export to mixtral, or carve with shared > 0"
        )
    return _Plan(bricks, num_experts, expert_size, active, shared, rule)


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


@torch.no_grad()
def _shared_gate_directions(inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per carved layer, a gate vector w with |w . x| about 1e-7 on its captured FFN inputs x (along their mean).

    llama.cpp computes the shared expert's sigmoid gate as silu(z) / z, which is NaN at z = 0, so the GGUF
    export cannot zero the gate as the safetensors formats do: sigmoid(w . x) = 1/2 + w . x / 4 instead, a
    relative error of about |w . x| / 2 on the shared expert after the factor 2.
    """
    out = {}
    for index, x in inputs.items():
        total = x.sum(0)
        direction = total / total.norm().clamp_min(1e-12)
        typical = (x @ direction).abs().median().clamp_min(1e-12)
        out[index] = direction * (_SHARED_GATE_LOGIT / typical)
    return out


def _exact(plan: _Plan, format: str) -> bool:
    """A weighted combine rule the format computes (plan_export checked it), or top-1 with renormalisation:
    the selected expert's weight is exactly 1 at any temperature."""
    return plan.rule != "sum" or (plan.active == 1 and format != "gguf")


def _temperatures(plan: _Plan, format: str, inputs: dict[int, torch.Tensor] | None) -> dict[int, float]:
    if plan.rule != "sum":
        return {index: brick.spec.combine.temperature for index, brick in plan.bricks.items()}
    if _exact(plan, format):
        return dict.fromkeys(plan.bricks, 1.0)
    if inputs is None:
        raise BrickworkError(
            "this export (top-k > 1, or GGUF) needs validation windows to choose the router temperature"
        )
    chosen = {}
    for index, brick in plan.bricks.items():
        chosen[index], error = _choose_temperature(brick, inputs[index], renormalise=format != "gguf")
        logger.info(
            "layer %d: router temperature %g, routed relative error %.2e", index, chosen[index], error
        )
    return chosen


# --- building the stock model --------------------------------------------------------------------------
def _common_config(config) -> dict:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    out = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
        attention_dropout=0.0,
    )
    rope = getattr(config, "rope_parameters", None)
    if rope is not None:
        out["rope_parameters"] = dict(rope)
    return out


def _stock_config(model, plan: _Plan, format: str):
    import transformers as tf

    common = _common_config(model.config)
    if plan.stock_format(format) == "glm4_moe":
        rope = dict(common.pop("rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
        dense = sorted(set(range(model.config.num_hidden_layers)) - set(plan.bricks))
        if format == "glm4_moe":  # vLLM's Glm4MoeForCausalLM never ties: it needs lm_head.weight in the file
            common["tie_word_embeddings"] = False
        return tf.Glm4MoeConfig(
            **common,
            rope_parameters=rope | {"partial_rotary_factor": 1.0},  # GLM-4.5 rotates half; Llama all
            attention_bias=model.config.model_type == "qwen2",
            intermediate_size=model.config.intermediate_size,
            moe_intermediate_size=plan.expert_size,
            n_shared_experts=plan.shared // plan.expert_size,
            n_routed_experts=plan.num_experts,
            num_experts_per_tok=plan.active,
            routed_scaling_factor=1.0,  # each layer's scale is folded into its experts' down projections
            n_group=1,
            topk_group=1,
            first_k_dense_replace=len(dense),
            norm_topk_prob=False,
            use_qk_norm=False,
            num_nextn_predict_layers=0,
        )
    if format == "mixtral":
        return tf.MixtralConfig(
            **common,
            intermediate_size=plan.expert_size,
            num_local_experts=plan.num_experts,
            num_experts_per_tok=plan.active,
            sliding_window=None,
        )
    return tf.Qwen2MoeConfig(
        **common,
        intermediate_size=model.config.intermediate_size,
        moe_intermediate_size=plan.expert_size,
        shared_expert_intermediate_size=plan.shared,
        num_experts=plan.num_experts,
        num_experts_per_tok=plan.active,
        # a weighted rule says; sum: HF and vLLM renormalise (exact top-1), llama.cpp's qwen2moe does not
        norm_topk_prob=plan.rule == "softmax_topk" if plan.rule != "sum" else format != "gguf",
        decoder_sparse_step=1,
        mlp_only_layers=sorted(set(range(model.config.num_hidden_layers)) - set(plan.bricks)),
        qkv_bias=True,
        use_sliding_window=False,
    )


def _expert_weights(brick: BrickFFN, plan: _Plan, scale: float) -> dict[str, torch.Tensor]:
    s, e, size, d = plan.shared, plan.num_experts, plan.expert_size, brick.spec.d_model
    gate, up, down_t = brick.gate.detach(), brick.up.detach(), brick.down_t.detach()
    routed = slice(s, s + e * size)
    return {
        "gate_up": torch.cat([gate[routed].view(e, size, d), up[routed].view(e, size, d)], dim=1),
        "down": (down_t[routed].view(e, size, d).transpose(1, 2) * scale).contiguous(),  # [E, D, size]
        "shared_gate": gate[:s],
        "shared_up": up[:s],
        "shared_down": (down_t[:s].t() * 2).contiguous(),  # times 2: the zeroed sigmoid gate halves it
    }


@torch.no_grad()
def build_stock_model(
    model, format: str, temperatures: dict[int, float], shared_gates: dict[int, torch.Tensor] | None = None
):
    """The stock ``transformers`` model (Qwen2-MoE or Mixtral) that computes what the carved model computes.

    ``shared_gates`` (GGUF): each carved layer's shared-expert gate vector instead of zeros."""
    import transformers as tf

    plan = plan_export(model, format)
    stock_format = plan.stock_format(format)
    config = _stock_config(model, plan, format)
    cls = {
        "mixtral": tf.MixtralForCausalLM,
        "glm4_moe": tf.Glm4MoeForCausalLM,
        "qwen2_moe": tf.Qwen2MoeForCausalLM,
    }[stock_format]
    dtype = next(model.parameters()).dtype
    stock = cls(config).to(dtype).eval()
    source = model.state_dict()
    target = stock.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name in target:
        if ".mlp." in name:
            continue
        if name in source:
            out[name] = source[name]
        elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            out[name] = torch.zeros_like(target[name])  # the source had no q/k/v bias
        elif name == "lm_head.weight":
            out[name] = source["model.embed_tokens.weight"]
        else:
            raise BrickworkError(f"no source weight for {name}; cannot export this model")
    # sum rule: renormalised top-k probabilities are about 1/k each; llama.cpp's unrenormalised ones about 1/E
    share = plan.num_experts if format == "gguf" else plan.active
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp."
        brick = plan.bricks.get(layer)
        if brick is None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[prefix + proj + ".weight"] = source[prefix + proj + ".weight"]
            continue
        temperature = temperatures[layer]
        weight, _ = brick.router.linear_form()
        # a weighted rule's scale; sum: 1 when exact (top-1 renormalised), else the probabilities' share
        sum_scale = 1.0 if _exact(plan, format) else float(share)
        w = _expert_weights(brick, plan, scale=brick.spec.combine.scale if plan.rule != "sum" else sum_scale)
        out[prefix + "gate.weight"] = (weight.detach() / temperature).to(dtype)
        out[prefix + "experts.gate_up_proj"] = w["gate_up"]
        out[prefix + "experts.down_proj"] = w["down"]
        if stock_format == "glm4_moe":
            out[prefix + "gate.e_score_correction_bias"] = torch.zeros(plan.num_experts)
            # ungated: the shared neurons as they are (transformers makes 0-sized ones when there are none)
            out[prefix + "shared_experts.gate_proj.weight"] = w["shared_gate"]
            out[prefix + "shared_experts.up_proj.weight"] = w["shared_up"]
            out[prefix + "shared_experts.down_proj.weight"] = (
                brick.down_t.detach()[: plan.shared].t().contiguous()
            )
        elif format != "mixtral":
            out[prefix + "shared_expert.gate_proj.weight"] = w["shared_gate"]
            out[prefix + "shared_expert.up_proj.weight"] = w["shared_up"]
            out[prefix + "shared_expert.down_proj.weight"] = w["shared_down"]
            gate = torch.zeros(1, config.hidden_size, dtype=dtype)
            if shared_gates is not None:
                gate[0] = shared_gates[layer].to(dtype)
            out[prefix + "shared_expert_gate.weight"] = gate
    missing = set(target) - set(out)
    if missing:
        raise BrickworkError(f"export left weights unset: {sorted(missing)[:5]}")
    stock.load_state_dict(out, strict=True)
    if config.tie_word_embeddings:
        stock.tie_weights()
    return stock


def stock_routing_copy(model, format: str, temperatures: dict[int, float]):
    """A copy of the carved ``model`` whose bricks weight their experts as ``format``'s stock router does: the
    ``sum`` rule becomes ``softmax`` (gguf) or ``softmax_topk`` at each layer's temperature, with the experts
    scaled by the number of probabilities they share (experts for gguf, top-k otherwise). Each brick gets a new
    spec; ``model`` is not changed."""
    plan = plan_export(model, format)
    share = plan.num_experts if format == "gguf" else plan.active
    rule = "softmax" if format == "gguf" else "softmax_topk"
    converted = copy.deepcopy(model)
    for index, brick in carved_layers(converted).items():
        combine = Combine(rule, temperature=temperatures[index], scale=float(share))
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


def export(
    model,
    out: str | Path,
    format: ExportFormat = "qwen2_moe",
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
    """Write ``model`` (carved) in a stock MoE format and check it against the carved model.

    The output is written atomically. With ``validate_data``, the result is loaded back with stock
    ``transformers`` (no remote code) and compared on ``validate_tokens`` tokens of it; those windows also set
    the router temperature of top-k > 1 carves with the ``sum`` rule (and the GGUF shared gate); ``validate=False``
    uses them for that only. Without ``validate_data``, only carves with a weighted combine rule and top-1 carves
    export to qwen2_moe or mixtral, and only weighted ones to gguf.

    ``stock_routing=True`` exports a copy of a ``sum`` carve converted to a weighted combine rule with the chosen
    temperature (:func:`stock_routing_copy`), so that the export computes what the converted carve computes;
    ``report.conversion`` says how far the conversion moved the carve, and the validation compares the export
    with the converted copy. ``model`` itself is never changed. Carving with a weighted rule makes this
    unnecessary.

    An existing export at ``out`` is replaced; anything else only with ``overwrite=True`` (see
    :func:`check_export_output`); ``sources`` (paths read) may be neither ``out`` nor inside it. A directory export carries ``brickwork-export.json`` (this report).
    """
    from brickwork.data.sources import token_windows

    started = time.perf_counter()
    check_export_output(out, format, overwrite, sources)
    plan = plan_export(model, format)
    windows = None
    if validate_data is not None:
        if tokenizer is None:
            raise BrickworkError("validation needs the tokenizer; pass tokenizer= or validate_data=None")
        windows = token_windows(tokenizer, validate_data, window, validate_tokens)
    # inputs set the sum rule's temperature, and the qwen2moe GGUF shared gate
    gated_gguf = format == "gguf" and plan.stock_format(format) == "qwen2_moe"
    needs_inputs = windows is not None and (gated_gguf or not _exact(plan, format))
    inputs = _capture_inputs(model, plan.bricks, windows) if needs_inputs else None
    temperatures = _temperatures(plan, format, inputs)
    if gated_gguf and inputs is None:
        raise BrickworkError("a GGUF export needs validation windows (validate_data) to set the shared gate")
    shared_gates = _shared_gate_directions(inputs) if gated_gguf else None
    report_conversion = None
    source = model  # what the export is built from and validated against
    if stock_routing and not _exact(plan, format):
        source = stock_routing_copy(model, format, temperatures)
        report_conversion = compare_logits(model, source, windows)
    stock = build_stock_model(source, format, temperatures, shared_gates)
    out = Path(out)
    report = ExportReport(
        format=format, path=str(out), seconds=0.0, temperatures=temperatures, conversion=report_conversion
    )
    if format == "gguf":
        from brickwork.io.gguf import write_gguf_file

        with atomic_file(out) as tmp:  # validated before it replaces anything
            write_gguf_file(stock, tmp, tokenizer, dtype=dtype)
            if windows is not None and validate:
                report.validation = compare_logits(source, load_exported(tmp, format), windows)
    else:
        if dtype == "float16":
            stock = stock.half()
        with atomic_directory(out, "export", overwrite, sources) as tmp:
            stock.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if windows is not None and validate:  # validated before it replaces anything
                report.validation = compare_logits(source, load_exported(tmp, format), windows)
            report.seconds = time.perf_counter() - started
            record = export_record(report)
            atomic_write_text(tmp / "brickwork-export.json", json.dumps(record, indent=2))
    report.seconds = time.perf_counter() - started
    return report


def export_record(report: ExportReport) -> dict:
    """``brickwork-export.json``: the report, with the format it was exported to as ``export_format`` (``format``
    is the marker that says the directory is a brickwork export)."""
    record = report.to_dict()
    record["export_format"] = record.pop("format")
    return {"format": EXPORT_MARKER, "brickwork_version": __version__, **record}


def check_export_output(out: str | Path, format: str, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Refuse, before any work, an export output that cannot or may not be written (BrickworkError)."""
    out = Path(out).expanduser()
    if format != "gguf":
        return check_output_dir(out, "export", overwrite, inputs)
    if out.suffix != ".gguf":
        raise BrickworkError(f"a GGUF output path must end in .gguf, got {out}")
    if out.is_dir():
        raise BrickworkError(f"the output {out} is a directory; --format gguf writes one .gguf file")
    for source in inputs:
        if source is not None and Path(source).exists() and Path(source).resolve() == out.resolve():
            raise BrickworkError(f"the output {out} is the input; choose another --out")
    if out.exists() and not overwrite and not _is_brickwork_gguf(out):
        raise BrickworkError(
            f"{out} exists and is not a brickwork export; refusing to replace it. Choose another --out, or pass "
            "--overwrite"
        )
    return out


def _is_brickwork_gguf(path: Path) -> bool:
    from brickwork.models.loading import open_gguf

    try:
        field = open_gguf(path).get_field("general.name")
    except BrickworkError:  # an unreadable file is not ours
        return False
    return field is not None and field.contents() == "brickwork export"


def load_exported(path: str | Path, format: str):
    """The exported model as stock ``transformers`` loads it (no ``trust_remote_code``), in float32."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if format == "gguf":
        from brickwork.io.gguf import gguf_architecture, read_glm4moe_gguf

        if gguf_architecture(path) == "glm4moe":  # transformers has no glm4moe GGUF reader
            return read_glm4moe_gguf(path)
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=_gguf_config(path), dtype=torch.float32
        ).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _gguf_config(path: Path):
    """transformers' GGUF reader (5.x) maps no expert or shared-expert sizes for qwen2moe, so the config is
    rebuilt from the file's own metadata (nothing here comes from brickwork's side)."""
    from brickwork.io.gguf import read_qwen2moe_config

    return read_qwen2moe_config(path)
