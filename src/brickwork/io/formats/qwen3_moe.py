"""``qwen3_moe``: ``Qwen3MoeForCausalLM`` (Qwen3 Technical Report, Yang et al. 2025; transformers, vLLM).

Qwen3 attention (per-head RMSNorm of queries and keys, an explicit ``head_dim``, optional biases on q/k/v/o), so it
holds carved ``qwen3`` models only: the q/k norms cannot be switched off, so a Llama-style attention has no exact
place in it. The MoE block has no shared expert: every neuron of a carved layer must be routed (``--shared 0``).
The router is a softmax over all experts, renormalised over the top-k with ``norm_topk_prob``: it computes
``softmax`` (``norm_topk_prob=False``) and ``softmax_topk``, and a ``sum`` carve exactly at top-1 (renormalised).
Uncarved layers stay dense (``mlp_only_layers``).
"""

from __future__ import annotations

from brickwork.errors import BrickworkError
from brickwork.io.formats.base import ExportPlan, StockFormat, common_config


class Qwen3Moe(StockFormat):
    name = "qwen3_moe"
    model_class = "Qwen3MoeForCausalLM"
    sources = ("qwen3",)
    source_description = "Qwen3 attention with q/k norms and SwiGLU FFN"
    rules = ("softmax", "softmax_topk")
    rule_hint = "Qwen3-MoE weights experts by a softmax: carve with --combine softmax_topk or softmax"
    derives_head_dim = (
        False  # Qwen3-MoE takes head_dim from the config (Qwen3 has heads x head_dim != hidden)
    )

    def check_attention(self, config) -> None:
        super().check_attention(config)
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            raise BrickworkError(
                f"this qwen3 model has sliding-window layers (use_sliding_window); {self.name} exports full "
                "attention only"
            )

    def holds_attention_bias(self, config) -> bool:
        return True  # Qwen3-MoE's attention_bias puts biases on q/k/v/o, as Qwen3's does

    def check(self, plan: ExportPlan, num_layers: int) -> None:
        if plan.shared:
            raise BrickworkError(
                "qwen3_moe has no shared expert; this carve has shared neurons: carve with --shared 0"
            )

    def config(self, model, plan: ExportPlan):
        import transformers as tf

        source = model.config
        return tf.Qwen3MoeConfig(
            **common_config(source),
            attention_bias=bool(getattr(source, "attention_bias", False)),
            intermediate_size=source.intermediate_size,
            moe_intermediate_size=plan.expert_size,
            num_experts=plan.num_experts,
            num_experts_per_tok=plan.active,
            # a weighted rule says; sum: renormalised (exact at top-1)
            norm_topk_prob=plan.rule == "softmax_topk" if plan.rule != "sum" else self.renormalises_sum,
            decoder_sparse_step=1,
            mlp_only_layers=plan.dense_layers(source.num_hidden_layers),
            use_sliding_window=False,
        )
