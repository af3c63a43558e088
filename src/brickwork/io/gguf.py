"""GGUF files in llama.cpp's ``qwen2moe`` or ``glm4moe`` architecture, written with the ``gguf`` package.

Tensor names and metadata keys follow llama.cpp's loaders. qwen2moe: every block is MoE with a gated shared
expert, the output projection is stored even when the source ties it to the embeddings, q/k/v have biases, and
the routed experts are stacked as ``ffn_{gate,up,down}_exps`` ([experts, rows, columns]); llama.cpp does not
renormalise the top-k router probabilities. glm4moe (GLM-4.5, DeepSeek-V3's gate): sigmoid gating with a
selection bias (``exp_probs_b``, zero here), ungated shared experts, the post-attention norm named
``post_attention_norm``, NeoX rotary embedding over the whole head, q/k/v biases only where the source has them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_file
from brickwork.models.loading import open_gguf

logger = logging.getLogger(__name__)
ARCH = "qwen2moe"
GLM_ARCH = "glm4moe"

# Attention tensors: the same names in both architectures (q/k/v biases only where the model has them)
_ATTENTION = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
}
_PER_LAYER = _ATTENTION | {
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
_GLM_PER_LAYER = _ATTENTION | {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
_KEEP_F32 = ("norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", ".bias")

# llama.cpp picks its BPE pre-tokenizer (how text is split before merges) from ``tokenizer.ggml.pre``. Its converter
# names it by the SHA-256 of the token ids of one test string (_PRE_TOKENIZER_TEXT); these are the values of that
# table (llama.cpp's conversion/base.py, as vendored by llama-cpp-python 0.3.36) for the BPE families brickwork
# exports. With "default", llama.cpp splits SmolLM text differently from transformers (1.4-2% more tokens).
_PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for ``tokenizer``'s BPE pre-tokenizer, or ``"default"`` (with a warning) when unknown."""
    from hashlib import sha256

    ids = tokenizer.encode(_PRE_TOKENIZER_TEXT)  # as llama.cpp's converter encodes it (BOS included)
    name = _PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest())
    if name is None:
        logger.warning(
            "llama.cpp does not know this tokenizer's pre-tokenizer: the GGUF says 'default', and llama.cpp may "
            "split text differently from transformers"
        )
    return name or "default"


def check_gguf_source(stock) -> None:
    """Refuse (BrickworkError) a stock model that :func:`write_gguf` cannot write."""
    config = stock.config
    glm = config.model_type == "glm4_moe"
    if not glm and config.model_type != "qwen2_moe":
        raise BrickworkError(f"GGUF export writes Qwen2-MoE or GLM-4-MoE models, not {config.model_type}")
    if config.first_k_dense_replace if glm else config.mlp_only_layers:
        raise BrickworkError(f"llama.cpp's {GLM_ARCH if glm else ARCH} export needs every layer to be MoE")


def write_gguf(stock, path: str | Path, tokenizer=None, dtype: str = "float32") -> Path:
    """Write a ``Qwen2MoeForCausalLM`` or ``Glm4MoeForCausalLM`` (every layer MoE) as a GGUF file in llama.cpp's
    qwen2moe or glm4moe architecture; atomic (temporary file, rename). To validate a file before it replaces
    anything, write it with :func:`write_gguf_file` inside :func:`brickwork.io_utils.atomic_file`."""
    path = Path(path)
    if path.suffix != ".gguf":
        raise BrickworkError(f"a GGUF output path must end in .gguf, got {path}")
    with atomic_file(path) as tmp:
        write_gguf_file(stock, tmp, tokenizer, dtype)
    return path


def write_gguf_file(stock, path: Path, tokenizer=None, dtype: str = "float32") -> None:
    """Write ``stock`` as a GGUF file at ``path`` itself (no temporary: the caller's :func:`atomic_file` is one)."""
    import gguf

    check_gguf_source(stock)
    config = stock.config
    glm = config.model_type == "glm4_moe"
    writer = gguf.GGUFWriter(str(path), GLM_ARCH if glm else ARCH)
    writer.add_name("brickwork export")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if glm:
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
    else:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "float16" else gguf.LlamaFileType.ALL_F32)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, config.vocab_size)
    for name, tensor in _tensors(stock):
        array = tensor.detach().float().cpu().numpy()
        if dtype == "float16" and not name.endswith(_KEEP_F32):
            array = array.astype(np.float16)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensors(stock):
    state = stock.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    per_layer = _GLM_PER_LAYER if stock.config.model_type == "glm4_moe" else _PER_LAYER
    for layer in range(stock.config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for hf, name in per_layer.items():
            if prefix + hf not in state or state[prefix + hf].numel() == 0:  # glm4moe: optional q/k/v biases
                continue  # and shared experts
            tensor = state[prefix + hf]
            if name == "ffn_gate_inp_shexp.weight":
                tensor = tensor.reshape(-1)  # llama.cpp holds it as a vector
            yield f"blk.{layer}.{name}", tensor
        gate, up = state[prefix + "mlp.experts.gate_up_proj"].chunk(2, dim=1)
        yield f"blk.{layer}.ffn_gate_exps.weight", gate
        yield f"blk.{layer}.ffn_up_exps.weight", up
        yield f"blk.{layer}.ffn_down_exps.weight", state[prefix + "mlp.experts.down_proj"]
    yield "output_norm.weight", state["model.norm.weight"]
    yield "output.weight", state["lm_head.weight"]  # llama.cpp's qwen2moe needs it even when tied


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """BPE tokenizers (GPT-2 style, as Llama-3, SmolLM and Qwen use) as llama.cpp's ``gpt2`` tokenizer model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        logger.warning(
            "tokenizer is not BPE: the GGUF file carries no tokenizer (transformers still loads it)"
        )
        return
    tokens = [tokenizer.convert_ids_to_tokens(i) or f"[PAD{i}]" for i in range(vocab_size)]
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(vocab_size)])  # 3 = control, 1 = normal
    merges = model.get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key, value in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("pad", tokenizer.pad_token_id),
        ("unk", tokenizer.unk_token_id),
    ):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    # Whether a BOS/EOS is put around encoded text: as the transformers tokenizer does (llama.cpp's own default
    # differs by tokenizer family), so that llama.cpp sees the token sequences transformers sees.
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    writer.add_add_bos_token(len(full) > len(plain) and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` of a GGUF file."""
    return open_gguf(path).fields["general.architecture"].contents()


def read_glm4moe_gguf(path: str | Path):
    """A ``Glm4MoeForCausalLM`` (float32) from a glm4moe GGUF file that :func:`write_gguf` wrote: its metadata and
    tensors mapped back by the writer's names (transformers has no glm4moe GGUF reader). It checks the file's
    contents round trip; what llama.cpp computes from them is checked by bench/llama_cpp_serving.py."""
    import transformers as tf

    reader = open_gguf(path)
    arch = reader.fields["general.architecture"].contents()
    if arch != GLM_ARCH:
        raise BrickworkError(f"{path} is a '{arch}' GGUF file, not {GLM_ARCH}")

    def field(key: str):
        f = reader.fields.get(f"{GLM_ARCH}.{key}")
        if f is None:
            raise BrickworkError(f"{path} has no '{GLM_ARCH}.{key}' metadata; was it written by brickwork?")
        return f.contents()

    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    vocab, hidden = tensors["token_embd.weight"].shape
    heads, layers = int(field("attention.head_count")), int(field("block_count"))
    expert_size = int(field("expert_feed_forward_length"))
    config = tf.Glm4MoeConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(field("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(field("attention.head_count_kv")),
        head_dim=int(field("attention.key_length")),
        max_position_embeddings=int(field("context_length")),
        rms_norm_eps=float(field("attention.layer_norm_rms_epsilon")),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(field("rope.freq_base")),
            "partial_rotary_factor": int(field("rope.dimension_count")) / int(field("attention.key_length")),
        },
        attention_bias="blk.0.attn_q.bias" in tensors,
        moe_intermediate_size=expert_size,
        n_shared_experts=int(field("expert_shared_count")),
        n_routed_experts=int(field("expert_count")),
        num_experts_per_tok=int(field("expert_used_count")),
        routed_scaling_factor=float(field("expert_weights_scale")),
        norm_topk_prob=bool(field("expert_weights_norm")),
        n_group=1,
        topk_group=1,
        first_k_dense_replace=int(field("leading_dense_block_count")),
        use_qk_norm=False,
        num_nextn_predict_layers=0,
        tie_word_embeddings="output.weight" not in tensors,
    )
    model = tf.Glm4MoeForCausalLM(config).float().eval()
    state = {
        "model.embed_tokens.weight": tensors["token_embd.weight"],
        "model.norm.weight": tensors["output_norm.weight"],
    }
    state["lm_head.weight"] = tensors.get("output.weight", tensors["token_embd.weight"])
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for hf, name in _GLM_PER_LAYER.items():
            if f"blk.{layer}.{name}" in tensors:
                state[prefix + hf] = tensors[f"blk.{layer}.{name}"]
        gate, up = (tensors[f"blk.{layer}.ffn_{p}_exps.weight"] for p in ("gate", "up"))
        state[prefix + "mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        state[prefix + "mlp.experts.down_proj"] = tensors[f"blk.{layer}.ffn_down_exps.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BrickworkError(f"{path}: tensors do not match a glm4moe model ({sorted(missing)[:3]} missing)")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def read_qwen2moe_config(path: str | Path):
    """A ``Qwen2MoeConfig`` from a qwen2moe GGUF file's metadata (and whether it stores ``output.weight``)."""
    import transformers as tf

    reader = open_gguf(path)

    def field(key: str):
        f = reader.fields.get(f"{ARCH}.{key}")
        if f is None:
            raise BrickworkError(f"{path} has no '{ARCH}.{key}' metadata; is it a qwen2moe GGUF file?")
        return f.contents()

    arch = reader.fields["general.architecture"].contents()
    if arch != ARCH:
        raise BrickworkError(f"{path} is a '{arch}' GGUF file, not {ARCH}")
    names = {t.name for t in reader.tensors}
    vocab = next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1]
    return tf.Qwen2MoeConfig(
        vocab_size=int(vocab),
        hidden_size=int(field("embedding_length")),
        intermediate_size=int(field("feed_forward_length")),
        num_hidden_layers=int(field("block_count")),
        num_attention_heads=int(field("attention.head_count")),
        num_key_value_heads=int(field("attention.head_count_kv")),
        max_position_embeddings=int(field("context_length")),
        rms_norm_eps=float(field("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(field("rope.freq_base"))},
        num_experts=int(field("expert_count")),
        num_experts_per_tok=int(field("expert_used_count")),
        moe_intermediate_size=int(field("expert_feed_forward_length")),
        shared_expert_intermediate_size=int(field("expert_shared_feed_forward_length")),
        norm_topk_prob=False,  # llama.cpp's qwen2moe
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=True,
        tie_word_embeddings="output.weight" not in names,
        torch_dtype=torch.float32,
    )
