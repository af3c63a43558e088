"""GGUF files for llama.cpp, written with the ``gguf`` package: what every llama.cpp MoE architecture brickwork
writes shares (metadata, tensor layout, tokenizer); each architecture's own facts are its class in
:mod:`brickwork.io.formats` (a :class:`LlamaCppArchitecture`).

Names and keys follow llama.cpp's loaders (``src/llama-arch.cpp``, ``src/llama-model.cpp``, ``src/models/*.cpp``;
``gguf-py/gguf/constants.py``): blocks ``blk.N.*``, attention ``attn_{norm,q,k,v,output}``, the router
``ffn_gate_inp``, the routed experts stacked as ``ffn_{gate,up,down}_exps`` ([experts, rows, columns]); the
router, norms and biases stay f32 in f16 files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_file
from brickwork.models.loading import open_gguf

logger = logging.getLogger(__name__)

# Attention tensors under the names every llama.cpp architecture here uses (q/k/v biases only where the model has
# them)
ATTENTION_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
}
_KEEP_F32 = ("norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", ".bias")


class LlamaCppArchitecture:
    """What one llama.cpp architecture holds: its name, where each transformers weight goes, its own metadata and
    how brickwork reads its files back. Mixed into the export format whose transformers model it writes."""

    # ``general.architecture`` (llama.cpp's LLM_ARCH_NAMES) and the prefix of its metadata keys
    gguf_name: ClassVar[str]
    # per block: the stock model's name under ``model.layers.N.`` -> llama.cpp's under ``blk.N.`` (besides the
    # routed experts); absent or empty tensors are skipped
    gguf_layer_tensors: ClassVar[dict[str, str]]
    # tensors llama.cpp holds as vectors although transformers keeps a [1, n] matrix
    gguf_vectors: ClassVar[tuple[str, ...]] = ()
    # whether the file stores ``output.weight`` when the source ties it to the embeddings (the loader needs it)
    writes_tied_output: ClassVar[bool] = True

    def check_gguf(self, stock) -> None:
        """Refuse (BrickworkError) a stock model this architecture cannot write."""

    def add_gguf_metadata(self, writer, config) -> None:
        """The architecture's own keys, after the ones every architecture writes."""
        raise NotImplementedError

    def read_gguf(self, path: Path):
        """The file as a float32 transformers model (how the export is validated)."""
        raise NotImplementedError


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


def write_gguf(
    stock, path: str | Path, architecture: LlamaCppArchitecture, tokenizer=None, dtype="float32"
) -> Path:
    """Write a stock transformers MoE model as a GGUF file in ``architecture``; atomic (temporary file, rename). To
    validate a file before it replaces anything, write it with :func:`write_gguf_file` inside
    :func:`brickwork.io_utils.atomic_file`."""
    path = Path(path)
    if path.suffix != ".gguf":
        raise BrickworkError(f"a GGUF output path must end in .gguf, got {path}")
    with atomic_file(path) as tmp:
        write_gguf_file(stock, tmp, architecture, tokenizer, dtype)
    return path


def write_gguf_file(
    stock, path: Path, architecture: LlamaCppArchitecture, tokenizer=None, dtype: str = "float32"
) -> None:
    """Write ``stock`` as a GGUF file at ``path`` itself (no temporary: the caller's :func:`atomic_file` is one)."""
    import gguf

    architecture.check_gguf(stock)
    config = stock.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise BrickworkError(
            f"the model's rotary embedding is scaled ('{rope['rope_type']}'); brickwork's GGUF export writes "
            "unscaled rotary embeddings only"
        )
    writer = gguf.GGUFWriter(str(path), architecture.gguf_name)
    writer.add_name("brickwork export")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    architecture.add_gguf_metadata(writer, config)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "float16" else gguf.LlamaFileType.ALL_F32)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, config.vocab_size)
    for name, tensor in _tensors(stock, architecture):
        array = tensor.detach().float().cpu().numpy()
        if dtype == "float16" and not name.endswith(_KEEP_F32):
            array = array.astype(np.float16)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensors(stock, architecture: LlamaCppArchitecture):
    state = stock.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    for layer in range(stock.config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for hf, name in architecture.gguf_layer_tensors.items():
            if prefix + hf not in state or state[prefix + hf].numel() == 0:  # optional q/k/v biases and
                continue  # shared experts
            tensor = state[prefix + hf]
            if name in architecture.gguf_vectors:
                tensor = tensor.reshape(-1)
            yield f"blk.{layer}.{name}", tensor
        gate, up = state[prefix + "mlp.experts.gate_up_proj"].chunk(2, dim=1)
        yield f"blk.{layer}.ffn_gate_exps.weight", gate
        yield f"blk.{layer}.ffn_up_exps.weight", up
        yield f"blk.{layer}.ffn_down_exps.weight", state[prefix + "mlp.experts.down_proj"]
    yield "output_norm.weight", state["model.norm.weight"]
    if architecture.writes_tied_output or not stock.config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]


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


class GgufContents:
    """A GGUF file of one architecture as brickwork's readers need it: its metadata (:meth:`field`) and tensors."""

    def __init__(self, path: str | Path, architecture: str):
        self.path = Path(path)
        self.architecture = architecture
        self.reader = open_gguf(path)
        found = self.reader.fields["general.architecture"].contents()
        if found != architecture:
            raise BrickworkError(f"{path} is a '{found}' GGUF file, not {architecture}")
        self.names = {t.name for t in self.reader.tensors}

    def field(self, key: str):
        """The value of ``ARCHITECTURE.key`` (BrickworkError when the file has none)."""
        found = self.reader.fields.get(f"{self.architecture}.{key}")
        if found is None:
            raise BrickworkError(
                f"{self.path} has no '{self.architecture}.{key}' metadata; was it written by brickwork?"
            )
        return found.contents()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, as float32 torch tensors in transformers' orientation."""
        return {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in self.reader.tensors}

    def config_fields(self) -> dict:
        """The transformers config entries every architecture here stores under the same keys."""
        vocab = next(t for t in self.reader.tensors if t.name == "token_embd.weight").shape[-1]
        return dict(
            vocab_size=int(vocab),
            hidden_size=int(self.field("embedding_length")),
            intermediate_size=int(self.field("feed_forward_length")),
            num_hidden_layers=int(self.field("block_count")),
            num_attention_heads=int(self.field("attention.head_count")),
            num_key_value_heads=int(self.field("attention.head_count_kv")),
            max_position_embeddings=int(self.field("context_length")),
            rms_norm_eps=float(self.field("attention.layer_norm_rms_epsilon")),
            rope_parameters={"rope_type": "default", "rope_theta": float(self.field("rope.freq_base"))},
            moe_intermediate_size=int(self.field("expert_feed_forward_length")),
            num_experts_per_tok=int(self.field("expert_used_count")),
            tie_word_embeddings="output.weight" not in self.names,
        )


def load_gguf_state(model, contents: GgufContents, layer_tensors: dict[str, str]):
    """``model`` (a stock transformers MoE model of the file's shape) with the file's tensors, mapped back by the
    writer's names (``layer_tensors``, as :attr:`LlamaCppArchitecture.gguf_layer_tensors`); tied when the file
    has no ``output.weight``."""
    tensors = contents.tensors()
    state = {
        "model.embed_tokens.weight": tensors["token_embd.weight"],
        "model.norm.weight": tensors["output_norm.weight"],
        "lm_head.weight": tensors.get("output.weight", tensors["token_embd.weight"]),
    }
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for hf, name in layer_tensors.items():
            if f"blk.{layer}.{name}" in tensors:
                state[prefix + hf] = tensors[f"blk.{layer}.{name}"]
        gate, up = (tensors[f"blk.{layer}.ffn_{p}_exps.weight"] for p in ("gate", "up"))
        state[prefix + "mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        state[prefix + "mlp.experts.down_proj"] = tensors[f"blk.{layer}.ffn_down_exps.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BrickworkError(
            f"{contents.path}: tensors do not match a {contents.architecture} model ({sorted(missing)[:3]} missing)"
        )
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model
