"""One held-out scorer (brickwork.evaluation.perplexity.score_logprobs): every perplexity comes from it."""

from __future__ import annotations

import math

import pytest
import torch

import brickwork as bw
from brickwork.benchmarks.quality import HeldOut
from brickwork.data.sources import token_windows
from brickwork.evaluation.perplexity import mean_nll, score_logprobs, score_windows, window_logprobs
from conftest import carved_tiny, tiny


def _direct(model, reference, windows):
    """The protocol written out once over all windows, in float64."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), -1)
        ref = torch.log_softmax(reference(input_ids=windows).logits[:, :-1].double(), -1)
    targets = windows[:, 1:, None]
    nll, ref_nll = -lp.gather(-1, targets).mean().item(), -ref.gather(-1, targets).mean().item()
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    agreement = (ref.argmax(-1) == lp.argmax(-1)).double().mean().item()
    return math.exp(nll), math.exp(nll - ref_nll), kl, agreement


def test_the_one_scorer_is_the_protocol_and_every_caller_gives_its_numbers(text_file, tokenizer):
    dense, carved = tiny().eval(), carved_tiny(text_file, tokenizer, experts=8, shared=1, active=3)
    windows = token_windows(tokenizer, str(text_file), 64, 512)
    cached = [window_logprobs(dense, b) for b in windows.split(4)]
    one = score_windows(carved, windows, reference=cached)
    perplexity, ratio, kl, agreement = _direct(carved, dense, windows)
    assert one.tokens == windows[:, 1:].numel() and one.kl > 0  # the carve differs from dense
    for got, want in (
        (one.perplexity, perplexity),
        (one.ratio, ratio),
        (one.kl, kl),
        (one.agreement, agreement),
    ):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7), (got, want)
    # bw.evaluate (its parent run live), the quality benchmark's HeldOut and mean_nll go through it
    ev = bw.evaluate(carved, tokenizer, text_file, parent=dense, window=64, max_tokens=512, progress=False)
    assert (ev.tokens, ev.perplexity, ev.kl, ev.agreement) == (
        one.tokens,
        one.perplexity,
        one.kl,
        one.agreement,
    )
    assert ev.parent_perplexity == one.reference_perplexity
    assert score_windows(carved, windows, reference=dense).ratio == one.ratio
    held = HeldOut(tokenizer, str(text_file), 512, 64)
    held.cache_dense(dense)
    assert held.score(carved) == {"perplexity": one.perplexity, "ratio": one.ratio, "kl": one.kl,
                                  "agreement": one.agreement, "tokens": one.tokens}  # fmt: skip
    assert held.score_dense()["perplexity"] == one.reference_perplexity
    assert math.exp(mean_nll(carved, windows)) == one.perplexity


def test_a_reference_is_given_for_every_batch_or_none(tokenizer):
    ids = torch.randint(3, 100, (2, 8))
    lp = torch.log_softmax(torch.randn(2, 7, 128), -1)
    with pytest.raises(ValueError, match="every batch or for none"):
        score_logprobs([(ids, lp, lp), (ids, lp, None)])
    assert score_logprobs([(ids, lp, lp)]).ratio == 1.0
