from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import brickwork as bw
from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError
from brickwork.recovery import LocalRecoveryConfig, recover_local_
from brickwork.recovery.e2e import E2EConfig, recover_e2e_
from conftest import CAUSAL_TYPES, carved_tiny, tiny

CONFIGS = {
    "experts+fitted": dict(experts=8, shared=1, active=2, router="fitted"),
    "experts+fitted+softmax": dict(experts=8, shared=1, active=2, router="fitted", combine="softmax"),
    "experts+centroid": dict(experts=8, shared=0, active=3, router="centroid"),
    "neurons+partial+down rows": dict(experts=64, shared=0, active=16, router="partial", down_fraction=0.15),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_local_recovery_lowers_every_layers_held_out_error(name, text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS[name])
    report = recover_local_(
        model, tokenizer, str(text_file), LocalRecoveryConfig(tokens=1024, window=64), progress=False
    )
    assert len(report.layers) == 2
    for layer in report.layers:
        assert layer.error_after < layer.error_before


def test_local_recovery_is_deterministic_and_saves(tmp_path, text_file, tokenizer):
    config = LocalRecoveryConfig(tokens=512, window=64)
    a, b = (carved_tiny(text_file, tokenizer, **CONFIGS["experts+fitted"]) for _ in range(2))
    recover_local_(a, tokenizer, str(text_file), config, progress=False)
    recover_local_(b, tokenizer, str(text_file), config, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    bw.save(a, tmp_path / "rec", tokenizer)
    again = bw.load(tmp_path / "rec")
    ids = torch.randint(3, 100, (1, 20))
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, a(input_ids=ids).logits, atol=1e-5)


def test_recovery_needs_a_carved_model(text_file, tokenizer):
    with pytest.raises(BrickworkError, match="no carved layer"):
        recover_local_(tiny(), tokenizer, str(text_file), LocalRecoveryConfig(tokens=512, window=64))
    with pytest.raises(ValueError, match="holdout"):
        LocalRecoveryConfig(holdout=0.7)


E2E = dict(tokens=64 * 4 * 6, window=64, batch_size=4, lr=1e-3)


def test_e2e_distillation_lowers_kl_to_the_parent(text_file, tokenizer):
    parent = tiny().eval()
    model = carved_tiny(text_file, tokenizer, **CONFIGS["experts+fitted"])
    report = recover_e2e_(model, parent, tokenizer, str(text_file), E2EConfig(**E2E), progress=False)
    assert report["steps"] == 6
    assert report["losses"][-1] < report["losses"][0]
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("combine", ["sum", "softmax_topk"])
def test_e2e_trains_routers_only_through_combination_weights(text_file, tokenizer, combine):
    parent = tiny().eval()
    model = carved_tiny(text_file, tokenizer, **CONFIGS["experts+fitted"], combine=combine)
    before = {i: b.router.weight.clone() for i, b in carved_layers(model).items()}
    report = recover_e2e_(model, parent, tokenizer, str(text_file), E2EConfig(**E2E), progress=False)
    assert report["losses"][-1] < report["losses"][0]
    moved = [not torch.equal(before[i], b.router.weight) for i, b in carved_layers(model).items()]
    assert all(moved) if combine != "sum" else not any(moved)
    load = report["expert_load"]
    if combine == "sum":
        assert load is None
    else:  # every selection of every step counted: 2 layers x 7 experts, min <= 1 <= max
        assert load["experts"] == 14 and load["min_vs_uniform"] <= 1 <= load["max_vs_uniform"]


def test_the_balance_loss_is_one_for_a_uniform_load_and_grows_as_experts_starve(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS["experts+fitted"], combine="softmax")
    brick = next(iter(carved_layers(model).values()))
    x = torch.randn(70, brick.d_model)
    with torch.no_grad():  # uniform probabilities: the loss is E * sum(f_e / E) = 1 whatever the load
        brick.router.weight.zero_()
        uniform = torch.arange(70).remainder(brick.num_experts)[:, None]
        assert float(brick.balance_loss(brick.scores(x), uniform)[0]) == pytest.approx(1.0)
        brick.router.weight.normal_()
        probs = brick.combine.probabilities(brick.scores(x))
        favourite = torch.full((70, 1), int(probs.mean(0).argmax()))
        assert float(brick.balance_loss(brick.scores(x), favourite)[0]) > float(
            brick.balance_loss(brick.scores(x), uniform)[0]
        )


def test_e2e_resume_matches_an_uninterrupted_run(tmp_path, text_file, tokenizer):
    parent = tiny().eval()
    carved = carved_tiny(text_file, tokenizer, **CONFIGS["experts+fitted"])
    whole, split = copy.deepcopy(carved), copy.deepcopy(carved)
    config = E2EConfig(**E2E, checkpoint_every=3)
    recover_e2e_(whole, parent, tokenizer, str(text_file), config, progress=False)
    recover_e2e_(
        split,
        parent,
        tokenizer,
        str(text_file),
        config,
        checkpoint_dir=tmp_path / "ck",
        stop_after=3,
        progress=False,
    )
    assert (tmp_path / "ck" / "step-0000003" / "brickwork-step.json").is_file()
    resumed = copy.deepcopy(carved)  # a fresh process would start from the carved model and the checkpoint
    report = recover_e2e_(
        resumed,
        parent,
        tokenizer,
        str(text_file),
        config,
        checkpoint_dir=tmp_path / "ck",
        resume=True,
        progress=False,
    )
    assert report["start_step"] == 3 and report["steps"] == 3
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


SCRIPT = """
import sys, json, hashlib, torch
sys.path.insert(0, {tests!r})
import brickwork as bw
from accelerate import PartialState
from brickwork.models.tiny import build_tiny_tokenizer
from brickwork.recovery.e2e import E2EConfig, recover_e2e_
from brickwork.bricks.state import carved_layers
from conftest import CAUSAL_TYPES, carved_tiny, tiny
tok = build_tiny_tokenizer()
parent = tiny().eval()
model = tiny().eval()
bw.carve_(model, bw.CarveConfig(experts=8, shared=1, active=2, method="random", router="fitted", calib_tokens=512,
          router_samples=256, window=64), calib={text!r}, tokenizer=tok, progress=False)
report = recover_e2e_(model, parent, tok, {text!r}, E2EConfig(tokens=64 * 4 * 4, window=64, batch_size=4, lr=1e-3),
                      progress=False)
digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
rank = PartialState().process_index
open({out!r} + f"/rank{{rank}}.json", "w").write(json.dumps({{"digest": digest, "processes": report["processes"]}}))
# gloo's threads must be joined before exit, or a rank can abort ("terminate called without an active exception")
PartialState().destroy_process_group()
"""


def test_e2e_with_two_cpu_processes(tmp_path, text_file):
    """Two processes (torchrun + accelerate's multi-CPU state; `accelerate launch --cpu` starts only one in
    accelerate 1.x) end with identical weights."""
    import os

    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), text=str(text_file), out=str(tmp_path)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    result = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["processes"] == ranks[1]["processes"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"]


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_layer_stream_gives_the_ffn_inputs_the_model_computes(model_type, text_file, tokenizer):
    from brickwork.data.sources import token_windows
    from brickwork.models.specs import find_ffns
    from brickwork.recovery.local import _LayerStream

    model = carved_tiny(text_file, tokenizer, model_type, experts=8, shared=1, active=2, router="fitted")
    windows = token_windows(tokenizer, str(text_file), 64, 64 * 6)
    bricks = carved_layers(model)
    seen = {i: [] for i in bricks}
    handles = [
        b.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1])))
        for i, b in bricks.items()
    ]
    with torch.no_grad():
        for batch in windows.split(4):
            model(input_ids=batch)
    for h in handles:
        h.remove()
    stream = _LayerStream(model, [f.block for f in find_ffns(model)], windows)
    for i in sorted(bricks):
        torch.testing.assert_close(stream.capture(i, bricks[i]), torch.cat(seen[i]), atol=1e-5, rtol=1e-5)
        stream.advance(i)


def test_local_recovery_refits_every_fitted_top_k(text_file, tokenizer):
    options = dict(CONFIGS["experts+fitted+softmax"], active=4, combine_budgets=(0.4,))
    model = carved_tiny(text_file, tokenizer, **options)
    before = {i: b.spec.combine_fits for i, b in carved_layers(model).items()}
    recover_local_(
        model, tokenizer, str(text_file), LocalRecoveryConfig(tokens=1024, window=64), progress=False
    )
    for index, brick in carved_layers(model).items():
        assert [k for k, _ in brick.spec.combine_fits] == [k for k, _ in before[index]]
        assert (
            brick.spec.fitted_combine(brick.active) == brick.combine
        )  # the own top-k's fit is the rule in use
