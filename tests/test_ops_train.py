from __future__ import annotations

import pytest
import torch

from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError
from brickwork.ops.train import TrainConfig, batches, train_lm_
from brickwork.ops.usage import expert_usage
from conftest import carved_tiny


def test_masked_rows_stay_bit_identical_and_chosen_rows_train(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2)
    brick = next(iter(carved_layers(model).values()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = torch.zeros(brick.d_ff, dtype=torch.bool)
    mask[:4] = True
    config = TrainConfig(tokens=512, window=32, batch_size=4, lr=1e-2)
    report = train_lm_(
        model, [brick.up], tokenizer, str(text_file), config, masks={brick.up: mask}, progress=False
    )
    assert report["steps"] == 4 and report["trainable"] == 4 * brick.d_model
    assert not torch.equal(brick.up[:4], before[_name(model, brick.up)][:4])
    assert torch.equal(brick.up[4:], before[_name(model, brick.up)][4:])
    for name, p in model.named_parameters():
        if p is not brick.up:
            assert torch.equal(p, before[name]), name
        assert not p.requires_grad


def _name(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


def test_training_is_deterministic_and_refuses_bad_settings(text_file, tokenizer):
    def run():
        model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2)
        brick = next(iter(carved_layers(model).values()))
        train_lm_(
            model, [brick.down_t], tokenizer, str(text_file), TrainConfig(256, 32, 2, 1e-3), progress=False
        )
        return brick.down_t.detach().clone()

    assert torch.equal(run(), run())
    with pytest.raises(ValueError, match="at least one batch"):
        TrainConfig(tokens=10, window=32, batch_size=2)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))
    assert [len(b) for b in batches(torch.zeros(3, 8), TrainConfig(64, 8, 2))] == [2] * 4
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2)
    with pytest.raises(BrickworkError, match="nothing to train"):
        train_lm_(model, [], tokenizer, str(text_file), progress=False)


def test_expert_usage_counts_every_selection(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2)
    usage = expert_usage(model, tokenizer, str(text_file), tokens=256, window=64, progress=False)
    for layer, counts in usage.counts.items():
        assert int(counts.sum()) == usage.tokens * 2, layer
        assert usage.shares(layer).sum().item() == pytest.approx(1.0)
        every = usage.covering(layer, 1.0)
        assert set(every.tolist()) == set(torch.nonzero(counts).flatten().tolist())
        top = usage.covering(layer, 0.5)
        assert usage.shares(layer)[top].sum() >= 0.5 - 1e-9 and len(top) <= len(every)


def test_a_trained_weighted_carve_keeps_no_graph(text_file, tokenizer):
    import copy

    model = carved_tiny(
        text_file, tokenizer, experts=8, shared=1, active=2, router="fitted", combine="sigmoid"
    )
    brick = next(iter(carved_layers(model).values()))
    train_lm_(model, [brick.up], tokenizer, str(text_file), TrainConfig(128, 32, 2), progress=False)
    copy.deepcopy(model)  # a tensor holding a graph cannot be deep-copied


def test_training_with_dropout_is_deterministic(text_file, tokenizer):
    from brickwork.models.tiny import build_tiny_model

    def run():
        model = build_tiny_model("gpt2")
        model.config.resid_pdrop = model.config.embd_pdrop = 0.1
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.1
        train_lm_(
            model,
            list(model.parameters()),
            tokenizer,
            str(text_file),
            TrainConfig(128, 32, 2),
            progress=False,
        )
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(v, second[k]) for k, v in first.items())
