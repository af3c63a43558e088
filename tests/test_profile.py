from __future__ import annotations

import math

import pytest
import torch

import brickwork as bw
from brickwork.data import token_windows
from brickwork.errors import BrickworkError
from brickwork.models.tiny import TINY_MODEL_TYPES
from brickwork.profiling import FFNCapture
from brickwork.profiling.report import summary_table, write_plots
from conftest import tiny


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_profile_equals_brute_force_over_the_same_tokens(model_type, tokenizer, text_file):
    model = tiny(model_type)
    config = bw.ProfileConfig(tokens=32 * 7, window=32, batch_size=3, top_fraction=0.25, share_stride=1)
    prof = bw.profile(model, tokenizer, text_file, config, progress=False)
    assert _hooks(model) == 0
    assert prof.tokens == 32 * 7 and prof.num_layers == 2 and prof.meta["model_type"] == model_type

    # Capture every h over the same windows, then compute the statistics directly.
    ids = token_windows(tokenizer, text_file, 32, 32 * 7)
    seen = {0: [], 1: []}
    with torch.no_grad(), FFNCapture(bw.find_ffns(model), on_hidden=lambda i, h: seen[i].append(h)):
        model(input_ids=ids)
    for layer in range(2):
        h = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[layer]]).double()
        k = math.ceil(0.25 * h.shape[1])
        indicator = torch.zeros_like(h).scatter_(1, h.abs().topk(k, dim=1).indices, 1.0)
        stats = prof.layers[layer]
        torch.testing.assert_close(stats["topk_rate"].double(), indicator.mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(stats["mean_abs"].double(), h.abs().mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats["coactivation"].double(), indicator.t() @ indicator, rtol=0, atol=0)


def test_hooks_are_removed_even_on_error(tokenizer, text_file):
    model = tiny("llama")
    ffns = bw.find_ffns(model)

    def explode(layer, h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), FFNCapture(ffns, on_hidden=explode):
        model(input_ids=torch.randint(3, 100, (1, 8)))
    assert _hooks(model) == 0


def test_save_load_round_trip_and_report(tmp_path, tokenizer, text_file):
    model = tiny("qwen2")
    prof = bw.profile(model, tokenizer, text_file, bw.ProfileConfig(tokens=128, window=32), progress=False)
    out = prof.save(tmp_path / "prof")
    again = bw.Profile.load(out)
    assert again.meta == prof.meta
    for a, b in zip(prof.layers, again.layers, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name])
    assert "dead %" in summary_table(again)
    for path in write_plots(again, tmp_path / "plots"):
        assert path.stat().st_size > 1000
    assert not list(tmp_path.glob(".prof*")), "temporary directories left behind"


def test_approximate_coactivation_above_the_exact_limit(tokenizer, text_file):
    model = tiny("llama")
    config = bw.ProfileConfig(tokens=96, window=32, coactivation_exact_max=16, sample_size=1000)
    prof = bw.profile(model, tokenizer, text_file, config, progress=False)
    exact = bw.profile(model, tokenizer, text_file, bw.ProfileConfig(tokens=96, window=32), progress=False)
    assert "pattern_sample" in prof.layers[0] and "coactivation" not in prof.layers[0]
    torch.testing.assert_close(prof.coactivation(0), exact.coactivation(0).double(), rtol=0, atol=0)


def test_profile_is_deterministic(tokenizer, text_file):
    model = tiny("gpt2")
    config = bw.ProfileConfig(tokens=128, window=32)
    a = bw.profile(model, tokenizer, text_file, config, progress=False)
    b = bw.profile(model, tokenizer, text_file, config, progress=False)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_bad_inputs_give_clear_errors(tmp_path, tokenizer, text_file, isolated_home):
    model = tiny("llama")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(BrickworkError, match="gave no window"):
        bw.profile(model, tokenizer, empty, bw.ProfileConfig(tokens=64, window=32), progress=False)
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    with pytest.raises(BrickworkError, match="gave no window of 64 tokens"):
        bw.profile(model, tokenizer, short, bw.ProfileConfig(tokens=128, window=64), progress=False)
    with pytest.raises(BrickworkError, match="neither a built-in corpus"):
        bw.profile(model, tokenizer, "no-such-corpus", progress=False)
    with pytest.raises(BrickworkError, match="not prepared yet.*brickwork setup"):
        bw.profile(model, tokenizer, "wiki", progress=False)
    with pytest.raises(ValueError, match="top_fraction must be in"):
        bw.ProfileConfig(top_fraction=0)
    with pytest.raises(ValueError, match="at least one window"):
        bw.ProfileConfig(tokens=10, window=32)
    with pytest.raises(BrickworkError, match="not a brickwork profile"):
        bw.Profile.load(tmp_path)
