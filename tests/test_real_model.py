"""Smoke tests on the real default model (SmolLM2-135M-Instruct); `make setup` provides it and the corpora."""

from __future__ import annotations

import pytest
import torch

import brickwork as bw

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return bw.load_model("smollm2-135m")


def test_default_model_loads_and_answers(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.intermediate_size == 1536
    assert len(bw.find_ffns(model)) == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_default_model_evaluates_two_windows(smollm2):
    model, tokenizer = smollm2
    result = bw.evaluate(model, tokenizer, "botchan", window=512, max_tokens=1024, progress=False)
    assert result.windows == 2
    # A working 135M model on English prose: far below uniform (vocab 49,152) and above a perfect score.
    assert 5 < result.perplexity < 200
