from __future__ import annotations

import pytest
import torch

from brickwork.errors import BrickworkError
from brickwork.models.specs import FFN_SPECS, find_ffns
from brickwork.models.tiny import TINY_FFN, TINY_HIDDEN, TINY_LAYERS, TINY_MODEL_TYPES
from brickwork.profiling import FFNCapture
from conftest import tiny


def test_every_spec_has_a_tiny_model():
    assert set(FFN_SPECS) == set(TINY_MODEL_TYPES)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_canonical_view_matches_the_model(model_type):
    model = tiny(model_type)
    ffns = find_ffns(model)
    assert [f.index for f in ffns] == list(range(TINY_LAYERS))
    seen_x, seen_h = {}, {}
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad(), FFNCapture(ffns, on_hidden=seen_h.__setitem__, on_input=seen_x.__setitem__):
        model(input_ids=ids)
    for ffn in ffns:
        w = ffn.read()
        assert w.up.shape == (TINY_FFN, TINY_HIDDEN) and w.down.shape == (TINY_HIDDEN, TINY_FFN)
        assert (w.gate is not None) == ffn.is_gated
        # h recomputed from the canonical weights equals what the model fed its down projection.
        torch.testing.assert_close(ffn.hidden(seen_x[ffn.index]), seen_h[ffn.index], rtol=0, atol=1e-6)
        # and the down projection in canonical form gives the module's output.
        expected = ffn.down_module(seen_h[ffn.index])
        got = torch.nn.functional.linear(seen_h[ffn.index], w.down, w.down_bias)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_write_round_trips_and_changes_the_model(model_type):
    model = tiny(model_type)
    ffn = find_ffns(model)[1]
    original = {k: (v.clone() if v is not None else None) for k, v in vars(ffn.read()).items()}
    ids = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    w = ffn.read()
    permutation = torch.randperm(ffn.d_ff, generator=torch.Generator().manual_seed(0))
    # Permuting neurons consistently leaves the function unchanged...
    w.up, w.down = w.up[permutation].clone(), w.down[:, permutation].clone()
    if w.gate is not None:
        w.gate = w.gate[permutation].clone()
    if w.up_bias is not None:
        w.up_bias = w.up_bias[permutation].clone()
    if w.gate_bias is not None:
        w.gate_bias = w.gate_bias[permutation].clone()
    ffn.write(w)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ffn.read().up, original["up"])
    # ...and zeroing the down projection changes it.
    w = ffn.read()
    w.down = torch.zeros_like(w.down)
    ffn.write(w)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, before)


def test_write_rejects_wrong_shapes():
    ffn = find_ffns(tiny("llama"))[0]
    w = ffn.read()
    w.up = torch.zeros(TINY_FFN + 1, TINY_HIDDEN)
    with pytest.raises(BrickworkError, match="does not fit"):
        ffn.write(w)


def test_moe_and_unsupported_models_are_refused():
    import transformers as tf

    moe = tf.MixtralForCausalLM(
        tf.MixtralConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=2,
            pad_token_id=0,
        )
    )
    with pytest.raises(BrickworkError, match="'mixtral' is already a mixture-of-experts"):
        find_ffns(moe)
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    )
    with pytest.raises(BrickworkError, match="model_type 't5' is not supported.*FFN_SPECS"):
        find_ffns(t5)
    with pytest.raises(BrickworkError, match="transformers models"):
        find_ffns(torch.nn.Linear(2, 2))
