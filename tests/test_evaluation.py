from __future__ import annotations

import math

import pytest
import torch

import brickwork as bw
from brickwork.data import token_windows
from brickwork.errors import BrickworkError
from conftest import CAUSAL_TYPES, tiny


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_perplexity_matches_the_models_own_loss(model_type, tokenizer, text_file):
    model = tiny(model_type)
    result = bw.evaluate(
        model, tokenizer, text_file, window=24, max_tokens=24 * 5, batch_size=2, progress=False
    )
    windows = token_windows(tokenizer, text_file, 24, 24 * 5)
    with torch.no_grad():
        # transformers' own causal-LM loss, one window at a time, averaged over all predicted tokens.
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert result.windows == 5 and result.tokens == 5 * 23
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert result.kl is None and result.agreement is None


def test_kl_and_agreement_against_a_parent(tokenizer, text_file):
    model, other = tiny("llama", seed=0), tiny("llama", seed=1)
    same = bw.evaluate(model, tokenizer, text_file, parent=model, window=32, max_tokens=128, progress=False)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.agreement == 1.0
    diff = bw.evaluate(model, tokenizer, text_file, parent=other, window=32, max_tokens=128, progress=False)
    assert diff.kl > 1e-3 and diff.agreement < 1.0
    alone = bw.evaluate(other, tokenizer, text_file, window=32, max_tokens=128, progress=False)
    assert diff.parent_perplexity == pytest.approx(alone.perplexity, rel=1e-6)
    # Brute force KL(parent || model) over the same positions.
    ids = token_windows(tokenizer, text_file, 32, 128)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
        lq = torch.log_softmax(other(input_ids=ids).logits[:, :-1].double(), -1)
    assert diff.kl == pytest.approx((lq.exp() * (lq - lp)).sum(-1).mean().item(), rel=1e-4)


def test_evaluation_is_deterministic_across_batch_sizes(tokenizer, text_file):
    model = tiny("qwen3")
    a = bw.evaluate(model, tokenizer, text_file, window=32, max_tokens=160, batch_size=1, progress=False)
    b = bw.evaluate(model, tokenizer, text_file, window=32, max_tokens=160, batch_size=4, progress=False)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6)


def test_bad_evaluation_inputs(tmp_path, tokenizer, text_file):
    with pytest.raises(BrickworkError, match="causal language model"):
        bw.evaluate(tiny("bert"), tokenizer, text_file, window=16, progress=False)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(BrickworkError, match="no window of 64 tokens"):
        bw.evaluate(tiny("llama"), tokenizer, short, window=64, progress=False)
    with pytest.raises(BrickworkError, match="smaller than one window of 64"):
        bw.evaluate(tiny("llama"), tokenizer, text_file, window=64, max_tokens=32, progress=False)
