"""llama.cpp's ``glm4moe`` architecture (GLM-4.5, DeepSeek-V3's gate): the ``gguf`` format of Llama-style carves
with combine ``sigmoid`` (llama.cpp ``src/models/glm4-moe.cpp``; ``convert_hf_to_gguf.py``'s Glm4MoeModel).

Sigmoid gating with a selection bias (``exp_probs_b``, zero here), ungated shared experts (the loader expects at
least one), the post-attention norm named ``post_attention_norm``, NeoX rotary embedding over the whole head, q/k/v
biases only where the source has them; the output matrix is written even when the source ties it. Every layer
is carved (the file says no leading dense block). transformers has no glm4moe GGUF reader, so the file is read
back by brickwork's own reader of the names written here.
"""

from __future__ import annotations

from pathlib import Path

from brickwork.errors import BrickworkError
from brickwork.io.formats.base import ExportPlan
from brickwork.io.formats.glm4_moe import Glm4Moe, check_leading_dense, check_whole_shared_experts
from brickwork.io.gguf import ATTENTION_TENSORS, GgufContents, LlamaCppArchitecture, load_gguf_state


class LlamaCppGlm4Moe(LlamaCppArchitecture, Glm4Moe):
    """The GLM-4-MoE model of a glm4moe GGUF file: the writer stores the output matrix in any case."""

    name = "gguf"
    unties_head = False
    gguf_name = "glm4moe"
    gguf_layer_tensors = ATTENTION_TENSORS | {
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
        "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    }

    def check(self, plan: ExportPlan, num_layers: int) -> None:
        dense = check_leading_dense(plan, num_layers)
        if dense:
            raise BrickworkError(f"layers {dense} are dense: carve every layer for a GGUF export")
        if not plan.shared:
            raise BrickworkError(
                "llama.cpp's glm4moe expects shared experts; this carve has none: carve with --shared > 0, "
                "or export to glm4_moe"
            )
        check_whole_shared_experts(plan)

    def check_gguf(self, stock) -> None:
        if stock.config.first_k_dense_replace:
            raise BrickworkError(f"llama.cpp's {self.gguf_name} export needs every layer to be MoE")

    def add_gguf_metadata(self, writer, config) -> None:
        import gguf

        head_dim = config.head_dim
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)  # the whole head rotates (GLM-4.5 rotates half)
        writer.add_expert_count(config.n_routed_experts)
        writer.add_expert_shared_count(config.n_shared_experts)
        writer.add_leading_dense_block_count(0)
        writer.add_expert_weights_scale(1.0)
        writer.add_expert_weights_norm(False)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        writer.add_nextn_predict_layers(0)

    def read_gguf(self, path: Path):
        """A ``Glm4MoeForCausalLM`` (float32) from its metadata and tensors mapped back by the writer's names. It
        checks the file's contents round trip; what llama.cpp computes from them is checked by
        bench/llama_cpp_serving.py."""
        import transformers as tf

        contents = GgufContents(path, self.gguf_name)
        fields = contents.config_fields()
        head_dim = int(contents.field("attention.key_length"))
        rope = fields.pop("rope_parameters") | {
            "partial_rotary_factor": int(contents.field("rope.dimension_count")) / head_dim
        }
        config = tf.Glm4MoeConfig(
            **fields,
            head_dim=head_dim,
            rope_parameters=rope,
            attention_bias="blk.0.attn_q.bias" in contents.names,
            n_shared_experts=int(contents.field("expert_shared_count")),
            n_routed_experts=int(contents.field("expert_count")),
            routed_scaling_factor=float(contents.field("expert_weights_scale")),
            norm_topk_prob=bool(contents.field("expert_weights_norm")),
            n_group=1,
            topk_group=1,
            first_k_dense_replace=int(contents.field("leading_dense_block_count")),
            use_qk_norm=False,
            num_nextn_predict_layers=0,
        )
        model = tf.Glm4MoeForCausalLM(config).float().eval()
        return load_gguf_state(model, contents, self.gguf_layer_tensors)
