"""The ``lowbit`` router: its quantized copies, the reads it counts, and what it selects."""

from __future__ import annotations

import math

import pytest
import torch

import brickwork as bw
from brickwork.bricks.state import carved_layers
from brickwork.models.tiny import build_tiny_model
from brickwork.routing.lowbit import dequantize_rows, neuron_level_active, predictor_weights, quantize_rows


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 70])  # 70: a last group shorter than the others
def test_codes_round_to_the_nearest_level_of_their_group(bits, d):
    w = torch.randn(9, d, generator=torch.Generator().manual_seed(bits))
    codes, scales = quantize_rows(w, bits, 16)
    top = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and codes.abs().max() <= top
    assert scales.shape == (9, math.ceil(d / 16)) and scales.dtype == torch.float16
    step = scales.float().repeat_interleave(16, dim=1)[:, :d]
    error = (dequantize_rows(codes, scales, 16) - w).abs()
    # half a level, plus the float16 rounding of the scale at the group's largest code
    assert (error <= step / 2 + top * step * 2**-10 + 1e-6).all()


def test_one_bit_keeps_the_signs_and_each_groups_mean_magnitude():
    w = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    codes, scales = quantize_rows(w, 1, 16)
    assert torch.equal(codes, torch.where(w >= 0, 1, -1).to(torch.int8))
    means = torch.stack([w[:, :16].abs().mean(1), w[:, 16:32].abs().mean(1), w[:, 32:].abs().mean(1)], 1)
    torch.testing.assert_close(scales.float(), means.half().float())


def test_the_reads_counted_are_the_packed_copies_at_the_carves_dtype():
    # 4-bit codes of 2 x 1536 rows of 576 inputs, a float16 scale per 32, then 2 biases and a down norm per neuron
    expected = math.ceil(2 * 1536 * (576 / 2 + 18 * 2) / 4) + 3 * 1536
    assert predictor_weights(2 * 1536, 576, 4, 32, 3 * 1536, 4) == expected
    k = neuron_level_active(0.25, 1536, 576)
    assert (expected + 3 * 576 * k) <= 0.25 * 3 * 1536 * 576 < expected + 3 * 576 * (k + 1)


def test_a_neuron_level_carve_reads_what_the_budget_says_and_beats_chance(text_file, tokenizer):
    model = build_tiny_model("llama")
    d_ff, d_model = model.config.intermediate_size, model.config.hidden_size
    k = neuron_level_active(0.5, d_ff, d_model)
    config = bw.CarveConfig(
        experts=d_ff, shared=0, active=k, method="activation", router="lowbit", calib_tokens=256, window=32
    )
    report = bw.carve_(model, config, calib=str(text_file), tokenizer=tokenizer, progress=False)
    assert report.reads <= 0.5 + 1e-9
    brick = carved_layers(model)[0]
    x = torch.randn(64, d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = brick.hidden(x, 0, brick.d_ff).abs() * brick.down_t.norm(dim=1)
        chosen = brick.select(x)
    captured = h.gather(1, chosen).sum() / h.topk(k, dim=1).values.sum()
    chance = k / d_ff
    assert captured > 0.9 and captured > chance + 0.3, captured.item()


def test_the_copies_refit_from_the_bricks_rows(text_file, tokenizer):
    model = build_tiny_model("llama")
    config = bw.CarveConfig(experts=16, shared=2, active=4, router="lowbit", calib_tokens=256, window=32)
    bw.carve_(model, config, calib=str(text_file), tokenizer=tokenizer, progress=False)
    brick = carved_layers(model)[0]
    with torch.no_grad():
        brick.gate.mul_(2)
        assert brick.router.refit(brick, None, None)
    s = brick.num_shared
    torch.testing.assert_close(
        dequantize_rows(brick.router.gate_codes, brick.router.gate_scales, 32),
        brick.gate[s:].detach(),
        atol=float(brick.router.gate_scales.float().max()),
        rtol=0,
    )
