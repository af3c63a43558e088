"""``qwen2_moe``: ``Qwen2MoeForCausalLM`` (Qwen Team 2024; transformers, vLLM).

Shared neurons become the shared expert, whose sigmoid gate is zeroed (sigmoid(0) = 1/2 exactly) and compensated by
doubling its down projection; routed experts and a linear router map to ``mlp.experts`` and ``mlp.gate``; uncarved
layers are listed in ``mlp_only_layers``; q/k/v biases are zero where the source had none. The router is a softmax
over all experts, renormalised over the top-k with ``norm_topk_prob``: it computes ``softmax``
(``norm_topk_prob=False``) and ``softmax_topk``, and a ``sum`` carve exactly at top-1 (renormalised).
"""

from __future__ import annotations

import torch

from brickwork.errors import BrickworkError
from brickwork.io.formats.base import ExportPlan, StockFormat, common_config, shared_neurons


def require_shared(name: str, plan: ExportPlan) -> None:
    """Refuse a carve without shared neurons for a format whose layers hold a shared expert."""
    if not plan.shared:
        raise BrickworkError(
            f"{name} expects a shared expert; this carve has none: export to mixtral, or carve with shared > 0"
        )


class Qwen2Moe(StockFormat):
    name = "qwen2_moe"
    model_class = "Qwen2MoeForCausalLM"
    rules = ("softmax", "softmax_topk")
    default_for_rules = ("sum", "softmax", "softmax_topk")

    def check(self, plan: ExportPlan, num_layers: int) -> None:
        require_shared(self.name, plan)

    def config(self, model, plan: ExportPlan):
        import transformers as tf

        return tf.Qwen2MoeConfig(
            **common_config(model.config),
            intermediate_size=model.config.intermediate_size,
            moe_intermediate_size=plan.expert_size,
            shared_expert_intermediate_size=plan.shared,
            num_experts=plan.num_experts,
            num_experts_per_tok=plan.active,
            # a weighted rule says; sum: HF and vLLM renormalise (exact top-1), llama.cpp's qwen2moe does not
            norm_topk_prob=plan.rule == "softmax_topk" if plan.rule != "sum" else self.renormalises_sum,
            decoder_sparse_step=1,
            mlp_only_layers=plan.dense_layers(model.config.num_hidden_layers),
            qkv_bias=True,
            use_sliding_window=False,
        )

    def layer_tensors(self, brick, plan, temperature, scale, dtype, shared_gate=None):
        out = super().layer_tensors(brick, plan, temperature, scale, dtype)
        # times 2: the zeroed sigmoid gate halves the shared expert
        shared = shared_neurons(brick, plan, down_scale=2)
        out.update({"shared_expert." + name: tensor for name, tensor in shared.items()})
        gate = torch.zeros(1, brick.spec.d_model, dtype=dtype)
        if shared_gate is not None:
            gate[0] = shared_gate.to(dtype)
        out["shared_expert_gate.weight"] = gate
        return out
