"""Tiny random models of every supported architecture, built locally from configs (tests, quick benchmarks)."""

from __future__ import annotations

import torch

TINY_VOCAB = 128
TINY_HIDDEN = 32
TINY_FFN = 64
TINY_LAYERS = 2


def _config(model_type: str):
    import transformers as tf

    common = dict(
        vocab_size=TINY_VOCAB, num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    decoder = dict(
        common,
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_FFN,
        num_hidden_layers=TINY_LAYERS,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    builders = {
        "llama": lambda: tf.LlamaConfig(**decoder),
        "mistral": lambda: tf.MistralConfig(**decoder),
        "qwen2": lambda: tf.Qwen2Config(**decoder),
        "qwen3": lambda: tf.Qwen3Config(**decoder, head_dim=8),
        "gemma": lambda: tf.GemmaConfig(**decoder, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**decoder, head_dim=8),
        # one sliding-window and one global layer, with a window shorter than the test sequences
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            **decoder,
            head_dim=8,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "phi3": lambda: tf.Phi3Config(**decoder),
        "gpt2": lambda: tf.GPT2Config(
            **common, n_embd=TINY_HIDDEN, n_inner=TINY_FFN, n_layer=TINY_LAYERS, n_head=4, n_positions=256
        ),
        "opt": lambda: tf.OPTConfig(
            **common,
            hidden_size=TINY_HIDDEN,
            ffn_dim=TINY_FFN,
            num_hidden_layers=TINY_LAYERS,
            word_embed_proj_dim=TINY_HIDDEN,
            max_position_embeddings=256,
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            **common,
            hidden_size=TINY_HIDDEN,
            intermediate_size=TINY_FFN,
            num_hidden_layers=TINY_LAYERS,
            max_position_embeddings=256,
        ),
        "bert": lambda: tf.BertConfig(
            **common,
            hidden_size=TINY_HIDDEN,
            intermediate_size=TINY_FFN,
            num_hidden_layers=TINY_LAYERS,
            max_position_embeddings=256,
        ),
    }
    if model_type not in builders:
        raise ValueError(f"no tiny config for '{model_type}'; available: {sorted(builders)}")
    return builders[model_type]()


TINY_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "opt",
    "gpt_neox",
    "bert",
)


def build_tiny_model(model_type: str = "llama", seed: int = 0):
    """A randomly initialised model of ``model_type`` (causal LM, or masked LM for bert), in eval mode.

    Biases are randomised too, so that tests exercise them (most inits set them to zero).
    """
    import transformers as tf

    config = _config(model_type)
    torch.manual_seed(seed)
    model_class = tf.BertForMaskedLM if model_type == "bert" else tf.AutoModelForCausalLM
    model = model_class.from_config(config) if model_class is tf.AutoModelForCausalLM else model_class(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def build_tiny_tokenizer():
    """A character-level fast tokenizer over printable ASCII (ids < TINY_VOCAB), built without any download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
