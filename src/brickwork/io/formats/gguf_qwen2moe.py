"""llama.cpp's ``qwen2moe`` architecture: the ``gguf`` format of Llama-style carves with combine ``softmax`` (or
``sum``) and shared neurons (llama.cpp ``src/models/qwen2moe.cpp``; ``convert_hf_to_gguf.py``'s Qwen2MoeModel).

Every block is MoE (``ffn_gate_inp`` is required, there are no dense FFN tensors) with a gated shared expert
(``ffn_{gate,up,down}_shexp``, its gate ``ffn_gate_inp_shexp`` a vector); q/k/v biases are loaded where present;
``output.weight`` is required, so it is written even when the source ties it. The router is a softmax over all
experts whose top-k probabilities are never renormalised, so ``softmax`` carves export exactly and ``sum`` carves
through the temperature (experts scaled by the number of experts). llama.cpp evaluates the shared gate as
silu(z)/z, NaN at z = 0, so the gate is a tiny vector (|w . x| about 1e-7 on the validation tokens) rather than
zero; the shared expert is then off by about that much, relative. Loaded back with transformers' GGUF reader.
"""

from __future__ import annotations

from pathlib import Path

import torch

from brickwork.errors import BrickworkError
from brickwork.io.formats.base import ExportPlan, require_every_layer
from brickwork.io.formats.qwen2_moe import Qwen2Moe, require_shared
from brickwork.io.gguf import ATTENTION_TENSORS, GgufContents, LlamaCppArchitecture

# Typical |w . x| of the shared expert's gate (see shared_gate_directions). At 1e-7, sigmoid(w . x) rounds to 1/2
# in fp32 for most tokens (the spacing of fp32 near 1/2 is 6e-8), yet w . x stays far from zero and from fp32's
# smallest normal numbers (the gate is stored f32 even in f16 files).
_SHARED_GATE_LOGIT = 1e-7


class LlamaCppQwen2Moe(LlamaCppArchitecture, Qwen2Moe):
    """The Qwen2-MoE model of a qwen2moe GGUF file."""

    name = "gguf"
    rules = ("softmax",)
    rule_hint = (
        "llama.cpp's qwen2moe does not renormalise the top-k weights: carve with --combine softmax "
        "(or sigmoid, for its glm4moe)"
    )
    renormalises_sum = False
    gguf_name = "qwen2moe"
    gguf_layer_tensors = ATTENTION_TENSORS | {
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    }
    gguf_vectors = ("ffn_gate_inp_shexp.weight",)

    def check(self, plan: ExportPlan, num_layers: int) -> None:
        require_every_layer(self.name, plan, num_layers)
        require_shared(self.name, plan)

    def needs_inputs(self, plan: ExportPlan) -> bool:
        return True  # the shared gate is set on them

    def shared_gates(self, plan: ExportPlan, inputs: dict | None) -> dict[int, torch.Tensor]:
        if inputs is None:
            raise BrickworkError(
                "a GGUF export needs validation windows (validate_data) to set the shared gate"
            )
        return shared_gate_directions(inputs)

    def check_gguf(self, stock) -> None:
        if stock.config.mlp_only_layers:
            raise BrickworkError(f"llama.cpp's {self.gguf_name} export needs every layer to be MoE")

    def add_gguf_metadata(self, writer, config) -> None:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)

    def read_gguf(self, path: Path):
        import transformers as tf

        # transformers' GGUF reader (5.x) maps no expert or shared-expert sizes for qwen2moe, so the config is
        # rebuilt from the file's own metadata (nothing here comes from brickwork's side)
        contents = GgufContents(path, self.gguf_name)
        config = tf.Qwen2MoeConfig(
            **contents.config_fields(),
            num_experts=int(contents.field("expert_count")),
            shared_expert_intermediate_size=int(contents.field("expert_shared_feed_forward_length")),
            norm_topk_prob=False,  # llama.cpp's qwen2moe
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,
            torch_dtype=torch.float32,
        )
        return tf.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=torch.float32
        ).eval()


@torch.no_grad()
def shared_gate_directions(inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
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
