"""``mixtral``: ``MixtralForCausalLM`` (Jiang et al. 2024, "Mixtral of Experts"), for carves without shared
neurons that carve every layer.

Mixtral's router always renormalises the top-k softmax probabilities: it computes ``softmax_topk``, and a ``sum``
carve exactly at top-1.
"""

from __future__ import annotations

from brickwork.errors import BrickworkError
from brickwork.io.formats.base import ExportPlan, StockFormat, common_config, require_every_layer


class Mixtral(StockFormat):
    name = "mixtral"
    model_class = "MixtralForCausalLM"
    rules = ("softmax_topk",)
    rule_hint = "Mixtral always renormalises the top-k weights: carve with --combine softmax_topk"

    def check(self, plan: ExportPlan, num_layers: int) -> None:
        require_every_layer(self.name, plan, num_layers)
        if plan.shared:
            raise BrickworkError(
                "mixtral has no shared expert; this carve has shared neurons: export to qwen2_moe"
            )

    def config(self, model, plan: ExportPlan):
        import transformers as tf

        return tf.MixtralConfig(
            **common_config(model.config),
            intermediate_size=plan.expert_size,
            num_local_experts=plan.num_experts,
            num_experts_per_tok=plan.active,
            sliding_window=None,
        )
