from __future__ import annotations

import pytest
import torch

import brickwork as bw
from brickwork.errors import BrickworkError
from brickwork.evaluation.baselines import BASELINES, NeuronSparsity, reads_fraction
from brickwork.models.tiny import TINY_MODEL_TYPES
from conftest import tiny


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("kind", BASELINES)
def test_baselines_keep_about_the_requested_fraction(model_type, kind, tokenizer, text_file):
    model = tiny(model_type)
    ids = torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    sparsity = NeuronSparsity(model, kind, keep_fraction=0.5).calibrate(
        tokenizer, text_file, tokens=256, window=32
    )
    seen = []
    ffn = bw.find_ffns(model)[0]
    with sparsity, torch.no_grad():
        handle = ffn.down_module.register_forward_pre_hook(
            lambda m, a: seen.append((a[0] != 0).float().mean())
        )
        sparse = model(input_ids=ids).logits
        handle.remove()
    assert _hooks(model) == 0
    assert not torch.allclose(sparse, dense)
    # Thresholds come from other text, so the kept share is near, not exactly, one half (TEAL keeps fewer:
    # sparse inputs also make some h smaller).
    assert 0.2 < seen[0].item() < 0.75
    with (
        sparsity.__class__(model, kind, keep_fraction=1.0).calibrate(tokenizer, text_file, 64, 32),
        torch.no_grad(),
    ):
        torch.testing.assert_close(model(input_ids=ids).logits, dense)


def test_oracle_keeps_exactly_the_top_neurons(tokenizer):
    model = tiny("llama")
    ffn = bw.find_ffns(model)[0]
    seen = []
    with NeuronSparsity(model, "oracle", keep_fraction=0.25), torch.no_grad():
        handle = ffn.down_module.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        model(input_ids=torch.randint(3, 100, (1, 10)))
        handle.remove()
    assert ((seen[0] != 0).sum(-1) == 16).all()


def test_read_fractions():
    assert reads_fraction("cats", 0.5, gated=True) == pytest.approx(2 / 3)  # 68% in the issue: keep 0.52
    assert reads_fraction("teal", 0.5, gated=True) == pytest.approx(0.5)
    assert reads_fraction("oracle", 0.5, gated=True) == pytest.approx(2.5 / 3)
    assert reads_fraction("cats", 0.5, gated=False) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown baseline"):
        reads_fraction("nope", 0.5, True)


def test_baselines_refuse_bad_use(tokenizer, text_file):
    model = tiny("llama")
    with pytest.raises(ValueError, match="keep_fraction must be in"):
        NeuronSparsity(model, "cats", 0)
    with pytest.raises(BrickworkError, match="calibrate"), NeuronSparsity(model, "cats", 0.5):
        pass
    assert _hooks(model) == 0
