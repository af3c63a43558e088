"""Carved models on a CUDA device: the same results as on the CPU, generation, recovery, save and load.

Skipped where no GPU is present (CI); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

import brickwork as bw
from brickwork.benchmarks.quality import HeldOut
from brickwork.bricks.paths import supports_fast_path
from brickwork.bricks.state import carved_layers
from brickwork.recovery import LocalRecoveryConfig, recover_local_
from brickwork.recovery.e2e import E2EConfig, recover_e2e_
from conftest import carved_tiny, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
CONFIGS = {
    "experts+fitted": dict(experts=8, shared=1, active=2, router="fitted"),
    "neurons+partial+down rows": dict(experts=64, shared=0, active=16, router="partial", down_fraction=0.15),
    "experts+centroid": dict(experts=8, shared=0, active=3, router="centroid"),
}


@pytest.fixture(autouse=True)
def _exact_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("name", CONFIGS)
def test_a_carve_moved_to_cuda_matches_the_cpu(name, text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS[name])
    ids = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model(input_ids=ids).logits
        gpu = model.to(CUDA)(input_ids=ids.to(CUDA)).logits.cpu()
    assert not any(supports_fast_path(b) for b in carved_layers(model).values())
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_carving_a_model_on_cuda_gives_the_cpu_carve(text_file, tokenizer):
    options = dict(experts=8, shared=1, active=2, router="fitted", method="random", calib_tokens=512)
    options |= dict(router_samples=256, window=64)
    on_cpu = carved_tiny(text_file, tokenizer, **options)
    on_gpu = tiny().eval().to(CUDA)
    bw.carve_(on_gpu, bw.CarveConfig(**options), calib=str(text_file), tokenizer=tokenizer, progress=False)
    for (name, a), (_, b) in zip(on_cpu.state_dict().items(), on_gpu.state_dict().items(), strict=True):
        assert b.device.type == "cuda", name
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4, msg=name)


def test_greedy_generation_on_cuda_equals_the_cpu(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["experts+fitted"])
    prompt = tokenizer("the quick brown fox", return_tensors="pt").input_ids

    def generate(m, device):
        out = m.generate(prompt.to(device), max_new_tokens=12, do_sample=False, pad_token_id=0)
        return out.cpu().tolist()

    cpu = generate(model, "cpu")
    assert generate(model.to(CUDA), CUDA) == cpu


def test_recovery_and_scoring_on_cuda(text_file, tokenizer):
    parent = tiny().eval().to(CUDA)
    model = carved_tiny(text_file, tokenizer, **CONFIGS["experts+fitted"]).to(CUDA)
    heldout = HeldOut(tokenizer, str(text_file), 256, 64)
    heldout.cache_dense(parent)
    before = heldout.score(model)
    seen = []
    e2e = recover_e2e_(
        model,
        parent,
        tokenizer,
        str(text_file),
        E2EConfig(tokens=64 * 4 * 6, window=64, batch_size=4, lr=1e-3),
        progress=False,
        callback=lambda done, m: seen.append((done, next(m.parameters()).device.type)),
    )
    assert seen == [(i, "cuda") for i in range(1, 7)]
    assert e2e["losses"][-1] < e2e["losses"][0]
    assert heldout.score(model)["kl"] < before["kl"]
    other = carved_tiny(text_file, tokenizer, **CONFIGS["experts+fitted"]).to(CUDA)
    report = recover_local_(
        other, tokenizer, str(text_file), LocalRecoveryConfig(tokens=1024, window=64), progress=False
    )
    assert all(layer.error_after < layer.error_before for layer in report.layers)
    assert next(other.parameters()).device.type == "cuda"


def test_local_recovery_of_a_weighted_carve_on_cuda(text_file, tokenizer):
    """The combine rule's temperature and scale are refitted from GPU tensors (fitted on the CPU)."""
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2, combine="sigmoid").to(CUDA)
    report = recover_local_(
        model, tokenizer, str(text_file), LocalRecoveryConfig(tokens=1024, window=64), progress=False
    )
    assert all(layer.error_after < layer.error_before for layer in report.layers)
    assert all(b.combine.rule == "sigmoid" for b in carved_layers(model).values())


def test_save_on_cuda_and_load_to_cuda(tmp_path, text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["neurons+partial+down rows"]).to(CUDA)
    bw.save(model, tmp_path / "carved", tokenizer)
    loaded = bw.load(tmp_path / "carved", device=CUDA)
    ids = torch.arange(20, device=CUDA)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert next(bw.load(tmp_path / "carved").parameters()).device.type == "cpu"
