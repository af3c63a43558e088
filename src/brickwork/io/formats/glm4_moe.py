"""``glm4_moe``: ``Glm4MoeForCausalLM`` (GLM-4.5, Zeng et al. 2025; transformers, vLLM, llama.cpp's ``glm4moe``).

DeepSeek-V3's gate (sigmoid scores, a selection bias, shared experts; DeepSeek-AI 2024) with Llama-style attention,
so it holds many fine-grained experts plus shared ones exactly (``carve --combine sigmoid``). Shared neurons become
``n_shared_experts`` ungated experts (their count must be a multiple of the expert size), the selection bias is
zero, one expert group, no renormalisation, no partial rotary embedding or q/k norm; leading dense layers become
``first_k_dense_replace``. A ``sum`` carve is refused: sigmoid weights are never exactly 1.
"""

from __future__ import annotations

import torch

from brickwork.errors import BrickworkError
from brickwork.io.formats.base import ExportPlan, StockFormat, common_config, shared_neurons


def check_leading_dense(plan: ExportPlan, num_layers: int) -> list[int]:
    """The dense layers, refused unless they lead (``first_k_dense_replace``)."""
    dense = plan.dense_layers(num_layers)
    if dense != list(range(len(dense))):
        raise BrickworkError(
            f"glm4_moe keeps only leading layers dense (first_k_dense_replace); layers {dense} are dense. "
            "Carve every layer after the first dense ones."
        )
    return dense


def check_whole_shared_experts(plan: ExportPlan) -> None:
    """Refuse shared neurons that do not make whole experts."""
    if plan.shared % plan.expert_size:
        raise BrickworkError(
            f"glm4_moe's shared experts are whole experts: {plan.shared} shared neurons is not a multiple of the "
            f"expert size {plan.expert_size}; carve with --shared (a number of experts)"
        )


class Glm4Moe(StockFormat):
    name = "glm4_moe"
    model_class = "Glm4MoeForCausalLM"
    rules = ("sigmoid",)
    rule_hint = "GLM-4.5's gate weights experts by sigmoid scores: carve with --combine sigmoid"
    default_for_rules = ("sigmoid",)
    # vLLM's Glm4MoeForCausalLM never ties: it needs lm_head.weight in the file
    unties_head = True

    def check(self, plan: ExportPlan, num_layers: int) -> None:
        if plan.rule == "sum":
            raise BrickworkError(
                "glm4_moe weights experts by sigmoid scores, never exactly 1 each: carve with --combine sigmoid"
            )
        check_leading_dense(plan, num_layers)
        check_whole_shared_experts(plan)

    def config(self, model, plan: ExportPlan):
        import transformers as tf

        common = common_config(model.config)
        rope = dict(common.pop("rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
        if self.unties_head:
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
            first_k_dense_replace=len(plan.dense_layers(model.config.num_hidden_layers)),
            norm_topk_prob=False,
            use_qk_norm=False,
            num_nextn_predict_layers=0,
        )

    def layer_tensors(self, brick, plan, temperature, scale, dtype, shared_gate=None):
        out = super().layer_tensors(brick, plan, temperature, scale, dtype)
        out["gate.e_score_correction_bias"] = torch.zeros(plan.num_experts)
        # ungated: the shared neurons as they are (transformers makes 0-sized ones when there are none)
        out.update({"shared_experts." + name: t for name, t in shared_neurons(brick, plan).items()})
        return out
