"""llama.cpp's ``qwen3moe`` architecture: the ``gguf`` format of carved ``qwen3`` models (llama.cpp
``src/models/qwen3moe.cpp``, ``src/llama-model.cpp``; ``convert_hf_to_gguf.py``'s Qwen3MoeModel; Qwen3 Technical
Report, Yang et al. 2025).

Qwen3 attention as it is: per-head RMSNorm of queries and keys (``attn_q_norm``, ``attn_k_norm``, both required),
the head size from ``attention.key_length`` / ``value_length`` (Qwen3 has heads x head_dim != hidden), NeoX rotary
embedding over the whole head (the graph asserts rotary dims = head size). q/k/v biases would load, but there is
no ``attn_output.bias``, so Qwen3's ``attention_bias`` (q/k/v/o) is refused. Every block is MoE (``ffn_gate_inp``
required, no dense FFN tensors) and has no shared expert: carve every layer with ``--shared 0``. The output
matrix is optional (tied models use the embeddings), so a tied source stores none.

The router is a softmax over all experts; llama.cpp's graph always renormalises the top-k weights (``norm_w``
true in its ``build_moe_ffn`` call) and scales them by nothing (it reads no ``expert_weights_scale``), so it
computes ``softmax_topk`` exactly, a ``sum`` carve exactly at top-1 (w / w = 1), and a top-k ``sum`` carve through
the temperature (experts scaled by k); a ``softmax`` carve (not renormalised) has no place in it. transformers'
GGUF reader knows qwen3moe (with ``norm_topk_prob`` true, as here) but maps no expert size, so the validation
passes it the config read from the file's own metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch

from brickwork.errors import BrickworkError
from brickwork.io.formats.base import ExportPlan, require_every_layer
from brickwork.io.formats.qwen3_moe import Qwen3Moe
from brickwork.io.gguf import ATTENTION_TENSORS, GgufContents, LlamaCppArchitecture


class LlamaCppQwen3Moe(LlamaCppArchitecture, Qwen3Moe):
    """The Qwen3-MoE model of a qwen3moe GGUF file: top-k weights always renormalised, every layer MoE."""

    name = "gguf"
    rules = ("softmax_topk",)
    rule_hint = (
        "llama.cpp's qwen3moe always renormalises the top-k weights: carve with --combine softmax_topk"
    )
    renormalises_sum = True
    gguf_name = "qwen3moe"
    gguf_layer_tensors = ATTENTION_TENSORS | {
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
    }
    writes_tied_output = False

    def holds_attention_bias(self, config) -> bool:
        return False  # no attn_output.bias in llama.cpp's qwen3moe

    def check(self, plan: ExportPlan, num_layers: int) -> None:
        if plan.shared:
            raise BrickworkError(
                f"llama.cpp's {self.gguf_name} has no shared expert; this carve has {plan.shared} shared neurons: "
                "carve with --shared 0"
            )
        require_every_layer(self.name, plan, num_layers, instead="qwen3_moe")

    def check_gguf(self, stock) -> None:
        config = stock.config
        if config.mlp_only_layers or not config.norm_topk_prob or config.attention_bias:
            raise BrickworkError(
                f"llama.cpp's {self.gguf_name} holds every layer MoE, renormalised top-k weights and no attention "
                "biases; this model differs"
            )

    def add_gguf_metadata(self, writer, config) -> None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_expert_count(config.num_experts)

    def read_gguf(self, path: Path):
        import transformers as tf

        contents = GgufContents(path, self.gguf_name)
        head_dim = int(contents.field("attention.key_length"))
        if int(contents.field("attention.value_length")) != head_dim:
            raise BrickworkError(f"{path}: key and value head sizes differ; Qwen3-MoE has one head_dim")
        config = tf.Qwen3MoeConfig(
            **contents.config_fields(),
            head_dim=head_dim,
            num_experts=int(contents.field("expert_count")),
            norm_topk_prob=True,  # llama.cpp's qwen3moe
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=False,
            use_sliding_window=False,
        )
        return tf.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=torch.float32
        ).eval()
