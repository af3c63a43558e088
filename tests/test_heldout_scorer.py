"""One held-out scorer (brickwork.evaluation.perplexity.score_logprobs): the benchmarks' scorers give its numbers."""

from __future__ import annotations

import math

import torch

import brickwork as bw
from brickwork.benchmarks.quality import HeldOut, _dense_heldout
from brickwork.data.sources import token_windows
from brickwork.evaluation.perplexity import mean_nll, score_windows, window_logprobs
from conftest import carved_tiny, tiny


def test_the_old_scorers_equal_the_one_scorer(text_file, tokenizer):
    dense, carved = tiny().eval(), carved_tiny(text_file, tokenizer, experts=8, shared=1, active=3)
    windows = token_windows(tokenizer, str(text_file), 64, 512)
    cached = [window_logprobs(dense, b) for b in windows.split(4)]
    one = score_windows(carved, windows, reference=cached)
    # bw.evaluate: the same windows, its parent run live
    ev = bw.evaluate(carved, tokenizer, text_file, parent=dense, window=64, max_tokens=512, progress=False)
    assert (ev.tokens, ev.perplexity, ev.kl, ev.agreement) == (
        one.tokens,
        one.perplexity,
        one.kl,
        one.agreement,
    )
    assert ev.parent_perplexity == one.reference_perplexity
    assert score_windows(carved, windows, reference=dense).ratio == one.ratio
    # the quality benchmark's HeldOut, and its dense row from the cache
    held = HeldOut(tokenizer, str(text_file), 512, 64)
    held.cache_dense(dense)
    scored = held.score(carved)
    assert scored == {"perplexity": one.perplexity, "ratio": one.ratio, "kl": one.kl,
                      "agreement": one.agreement, "tokens": one.tokens}  # fmt: skip
    assert _dense_heldout(held)["perplexity"] == score_windows(dense, windows).perplexity
    # mean_nll (brick_ops' perplexity): cross-entropy in float32, the same to rounding
    assert math.isclose(math.exp(mean_nll(carved, windows)), one.perplexity, rel_tol=1e-6)
    # path_agreement's perplexity of one batch's log-probabilities
    lp = torch.cat(cached)
    assert math.isclose(
        float(torch.exp(-lp.gather(-1, windows[:, 1:, None]).mean())),
        score_windows(dense, windows).perplexity,
        rel_tol=1e-6,
    )
