from __future__ import annotations

import json

import pytest
import torch

import brickwork as bw
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.state import carved_layers, uncarve_
from brickwork.errors import BrickworkError
from brickwork.ops.grow import GrownExperts, GrownSpec, grow_, grown_layers, plan_grow, remove_grown_
from brickwork.ops.train import TrainConfig
from conftest import carved_tiny, cli_carved

CONFIG = TrainConfig(tokens=1024, window=32, batch_size=4, lr=1e-2)


@pytest.fixture
def new_text(tmp_path):
    """A "new domain": one short phrase over and over, which a few steps of training learn."""
    path = tmp_path / "new.txt"
    path.write_text(("salt rain over the stone river bread heavy light window. " * 400).strip())
    return path


def _carved(text_file, tokenizer, **config):
    return carved_tiny(text_file, tokenizer, **({"experts": 8, "shared": 1, "active": 2} | config))


def _ids():
    return torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, kernels: bool = True):
    BrickFFN.use_kernels = kernels
    try:
        return model(input_ids=_ids()).logits
    finally:
        BrickFFN.use_kernels = True


@torch.no_grad()
def _loss(model, tokenizer, path) -> float:
    from brickwork.data.sources import token_windows

    batch = token_windows(tokenizer, str(path), 32, 256)
    logits = model(input_ids=batch).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    ).item()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_a_fresh_bank_leaves_the_model_bit_for_bit_and_its_output_reaches_the_logits(
    text_file, tokenizer, kind
):
    model = _carved(text_file, tokenizer)
    before = {k: _logits(model, k) for k in (True, False)}
    generator = torch.Generator().manual_seed(0)
    for index, spec in plan_grow(model, experts=3, kind=kind, active=2).items():
        brick = carved_layers(model)[index]
        brick.grown = GrownExperts.for_brick(brick, spec).initialise_(generator)
    for kernels, logits in before.items():
        assert torch.equal(_logits(model, kernels), logits), kernels
    bank = grown_layers(model)[0]
    assert bank.gate is None if kind == "lora" else bank.gate is not None
    with torch.no_grad():
        bank.down_t.normal_(generator=generator)
    assert not torch.equal(_logits(model), before[True])
    assert torch.allclose(_logits(model), _logits(model, kernels=False), atol=1e-5)
    assert remove_grown_(model) == [0, 1] and grown_layers(model) == {}
    assert torch.equal(_logits(model), before[True])


def test_grow_trains_only_the_bank_lowers_the_loss_and_removes_to_the_original(
    text_file, new_text, tokenizer
):
    model = _carved(text_file, tokenizer)
    state, logits = _state(model), _logits(model)
    loss_before = _loss(model, tokenizer, new_text)
    report = grow_(model, tokenizer, str(new_text), experts=2, config=CONFIG, progress=False)
    assert report.steps == 8 and report.replay_losses is None and report.gate_replay is None
    assert set(report.layers) == {0, 1} and report.layers[0] == {
        "kind": "ffn",
        "experts": 2,
        "expert_size": carved_layers(model)[0].expert_size,
        "active": 1,
    }
    banks = grown_layers(model)
    assert report.trainable == sum(p.numel() for b in banks.values() for p in b.parameters())
    after = model.state_dict()
    for name, value in state.items():
        assert torch.equal(after[name], value), name
    assert all(bank.down_t.abs().sum() > 0 for bank in banks.values())
    assert not any(p.requires_grad for p in model.parameters())
    assert _loss(model, tokenizer, new_text) < loss_before - 0.05
    assert min(report.gate_new.values()) > 0 and max(report.gate_new.values()) < 1
    with pytest.raises(BrickworkError, match="grown experts"):
        uncarve_(model)
    remove_grown_(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(_logits(model), logits)


def test_replay_keeps_the_new_gates_closed_on_the_original_text(text_file, new_text, tokenizer):
    from brickwork.data.sources import token_windows
    from brickwork.ops.grow import mean_gates

    def grown(replay):
        model = _carved(text_file, tokenizer)
        report = grow_(
            model, tokenizer, str(new_text), experts=2, config=CONFIG, replay=replay, progress=False
        )
        return model, report

    model, report = grown(str(text_file))
    assert len(report.replay_losses) == report.steps
    assert report.replay_losses[-1] < report.replay_losses[0]
    for index in report.gate_new:
        assert report.gate_replay[index] < report.gate_new[index], index
    plain, plain_report = grown(None)
    assert plain_report.gate_replay is None
    windows = token_windows(tokenizer, str(text_file), 32, 512)
    closed = mean_gates(model, grown_layers(model), windows, 4)
    opened = mean_gates(plain, grown_layers(plain), windows, 4)
    assert sum(closed.values()) < 0.5 * sum(opened.values())


def test_grow_is_deterministic_and_saves_and_loads_bit_for_bit(tmp_path, text_file, new_text, tokenizer):
    def run(kind):
        model = _carved(text_file, tokenizer)
        grow_(
            model,
            tokenizer,
            str(new_text),
            experts=3,
            kind=kind,
            rank=4 if kind == "lora" else None,
            active=2,
            layers=[1],
            config=CONFIG,
            progress=False,
        )
        return model

    first, second = run("lora"), run("lora")
    assert list(grown_layers(first)) == [1]
    for a, b in zip(grown_layers(first)[1].parameters(), grown_layers(second)[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(_logits(first), _logits(second))
    bw.save(first, tmp_path / "grown", tokenizer)
    meta = json.loads((tmp_path / "grown" / "brickwork.json").read_text())
    assert "grown" not in meta["layers"][0]
    assert meta["layers"][1]["grown"] == {"kind": "lora", "experts": 3, "rank": 4, "active": 2}
    loaded = bw.load(tmp_path / "grown")
    assert torch.equal(_logits(loaded), _logits(first))
    assert torch.equal(_logits(loaded, kernels=False), _logits(first, kernels=False))
    for name, value in first.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    ffn = run("ffn")
    bw.save(ffn, tmp_path / "ffn")
    assert torch.equal(_logits(bw.load(tmp_path / "ffn")), _logits(ffn))
    # a carve saved before grow (no "grown" key) loads as before; damaged or dropped records are refused
    plain = _carved(text_file, tokenizer)
    bw.save(plain, tmp_path / "plain")
    assert grown_layers(bw.load(tmp_path / "plain")) == {}
    path = tmp_path / "grown" / "brickwork.json"
    for damage, message in (
        ({"kind": "lora", "experts": 3, "rank": 0, "active": 2}, "'grown' record is damaged.*rank"),
        ({"kind": "moe", "experts": 3}, "'grown' record is damaged.*kind"),
        ({"kind": "lora", "experts": 3, "expert_size": 4, "active": 2}, "'grown' record is damaged.*keys"),
        ({"kind": "lora", "experts": 2, "rank": 4, "active": 2}, "does not match"),
        (None, "does not match"),
    ):
        broken = json.loads(json.dumps(meta))
        if damage is None:
            del broken["layers"][1]["grown"]
        else:
            broken["layers"][1]["grown"] = damage
        path.write_text(json.dumps(broken))
        with pytest.raises(BrickworkError, match=message):
            bw.load(tmp_path / "grown")


def test_bad_arguments_are_refused_and_a_failed_grow_leaves_the_model_as_it_was(
    tmp_path, text_file, new_text, tokenizer
):
    model = _carved(text_file, tokenizer)
    data = str(new_text)
    for kwargs, error, message in (
        ({"kind": "moe"}, ValueError, "kind must be"),
        ({"rank": 4}, ValueError, "rank is the size of a low-rank expert"),
        ({"kind": "lora", "expert_size": 4}, ValueError, "low-rank experts take rank"),
        ({"experts": 0}, ValueError, "experts must be"),
        ({"experts": 2, "active": 3}, ValueError, "active"),
        ({"kind": "lora", "rank": 0}, ValueError, "rank must be"),
        ({"layers": [5]}, ValueError, "not carved"),
        ({"layers": []}, ValueError, "empty"),
        ({"layers": [0, 0]}, ValueError, "twice"),
        ({"replay_weight": -1.0}, ValueError, "replay_weight"),
        ({"replay_tokens": 8}, ValueError, "replay_tokens"),
    ):
        with pytest.raises(error, match=message):
            grow_(model, tokenizer, data, config=CONFIG, progress=False, **kwargs)
        assert grown_layers(model) == {}
    with pytest.raises(BrickworkError):
        grow_(model, tokenizer, str(tmp_path / "missing.txt"), config=CONFIG, progress=False)
    assert grown_layers(model) == {}
    with pytest.raises(BrickworkError, match="carve it first"):
        grow_(bw.models.tiny.build_tiny_model("llama"), tokenizer, data, config=CONFIG, progress=False)
    grow_(model, tokenizer, data, experts=2, layers=[0], config=CONFIG, progress=False)
    with pytest.raises(BrickworkError, match="already have grown bricks"):
        grow_(model, tokenizer, data, layers=[0], config=CONFIG, progress=False)
    from brickwork.io.export import plan_export

    with pytest.raises(BrickworkError, match="grown bricks"):
        plan_export(model, "qwen2_moe")
    with pytest.raises(ValueError, match="keys"):
        GrownSpec.from_dict({"kind": "ffn", "experts": 2, "rank": 4, "active": 1})


def test_grow_command(tmp_path, tiny_dir, text_file, new_text, tokenizer, capsys):
    from brickwork.cli.main import main as cli

    carved = cli_carved(tmp_path, tiny_dir, text_file)
    out = tmp_path / "grown"
    command = (
        f"grow {carved} --data {new_text} --experts 2 --kind lora --rank 4 --replay {text_file} --tokens 256 "
        f"--window 32 --batch-size 4 --lr 0.01 --out {out} -q"
    )
    assert cli(command.split()) == 0
    assert "mean gate on --data" in capsys.readouterr().out
    model = bw.load(out)
    assert {i: b.spec.to_dict() for i, b in grown_layers(model).items()} == {
        i: {"kind": "lora", "experts": 2, "rank": 4, "active": 1} for i in (0, 1)
    }
    report = json.loads((out / "grow.json").read_text())
    assert report["steps"] == 2 and set(report["gate_replay"]) == {"0", "1"}
    wrong = f"grow {carved} --data {new_text} --rank 4 --out {tmp_path / 'x'} -q"
    assert cli(wrong.split()) == 2
    assert "rank is the size" in capsys.readouterr().err
    assert cli(f"grow {carved} --data {tmp_path / 'none.txt'} --out {tmp_path / 'y'} -q".split()) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_what_reads_only_the_carved_bricks_refuses_a_grown_model(text_file, new_text, tokenizer):
    from brickwork.bricks.token_budget import ReadCounter
    from brickwork.ops.prune import prune_for_domain_
    from brickwork.ops.usage import expert_usage
    from brickwork.recovery.local import recover_local_

    model = _carved(text_file, tokenizer)
    usage = expert_usage(model, tokenizer, str(new_text), tokens=128, window=32, progress=False)
    grow_(model, tokenizer, str(new_text), experts=1, config=TrainConfig(64, 32, 2, 1e-3), progress=False)
    for call in (
        lambda: bw.set_budget(model, 0.5),
        lambda: bw.set_token_budget(model, 0.9),
        lambda: ReadCounter(model),
        lambda: prune_for_domain_(model, usage),
        lambda: recover_local_(model, tokenizer, str(text_file), progress=False),
    ):
        with pytest.raises(BrickworkError, match="does not handle grown experts"):
            call()
