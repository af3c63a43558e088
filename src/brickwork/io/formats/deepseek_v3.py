"""``deepseek_v3``: ``DeepseekV3ForCausalLM`` (DeepSeek-V3 Technical Report, DeepSeek-AI 2024): refused, with the
reason, for every source brickwork carves.

Its MoE block would hold a carve exactly (sigmoid scores with a zero ``e_score_correction_bias``, ``n_group=1``,
``topk_group=1``, ``routed_scaling_factor`` folded into the experts, ``norm_topk_prob=False``, shared experts,
``first_k_dense_replace`` for leading dense layers), but its attention is Multi-head Latent Attention (MLA,
DeepSeek-V2, DeepSeek-AI 2024), which cannot re-parameterise a Llama-style (or Qwen3) attention exactly:

- the rotary part of the keys (``qk_rope_head_dim``) is one head shared by every query head, so the distinct
  rotated keys of a model with more than one key/value head have no place, and the per-head part of the keys is
  never rotated;
- the rest of the keys and all the values are read from a latent through ``kv_a_layernorm``, an RMSNorm whose
  epsilon is fixed in the modeling code: a per-token rescaling that a linear k/v projection does not have (even
  carrying the whole normalised input in the latent leaves a factor that depends on the token's norm through
  the two epsilons);
- ``q_proj`` has no bias (Qwen2's q/k/v biases).

``q_lora_rank=None`` makes the query a plain linear map, but the key/value path stays as above. GLM-4.5's
``glm4_moe`` is DeepSeek-V3's gate with Llama-style attention: export there (``--format glm4_moe``).
"""

from __future__ import annotations

from brickwork.errors import BrickworkError
from brickwork.io.formats.base import ExportPlan, StockFormat


class DeepseekV3(StockFormat):
    name = "deepseek_v3"
    model_class = "DeepseekV3ForCausalLM"
    sources = ()  # no source attention maps exactly onto MLA (see the module docstring)
    rules = ("sigmoid",)

    def plan(self, model) -> ExportPlan:
        raise BrickworkError(
            "deepseek_v3's Multi-head Latent Attention cannot hold this model's attention exactly (its rotary "
            "key is one head shared by all heads, and keys and values pass through a normalised latent), so "
            f"a carved '{model.config.model_type}' model does not export to it. DeepSeek-V3's router with "
            "Llama-style attention is glm4_moe: carve with --combine sigmoid and export with --format glm4_moe"
        )
