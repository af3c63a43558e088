"""Nothing lost and nothing silently wrong: one test per path that lost data, saved a broken model or answered with a
traceback (the file-size, kill and hostile-file batteries are test_faults.py and test_hostile_artefacts.py)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import torch

import brickwork as bw
from brickwork.cli.main import main
from brickwork.errors import BrickworkError
from brickwork.models.tiny import build_tiny_model
from conftest import carved_tiny


def cli(command: str) -> int:
    try:
        return main(shlex.split(command))
    except SystemExit as exc:
        return int(exc.code)


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def carved(tmp_path, tiny_dir, text_file):
    """A weighted carve every export format but mixtral takes (softmax, one shared expert)."""
    out = tmp_path / "carved"
    assert (
        cli(
            f"carve {tiny_dir} --experts 8 --shared 1 --active 2 --router fitted --router-option intercept=false "
            f"--combine softmax --calib {text_file} --calib-tokens 512 --router-samples 256 --window 64 --out {out} -q"
        )
        == 0
    )
    return out


# --- a GGUF export is validated before it replaces anything ---------------------------------------------------
def test_a_gguf_export_that_fails_validation_replaces_nothing_and_leaves_nothing(
    carved, tmp_path, text_file, monkeypatch, capsys
):
    good = tmp_path / "good.gguf"
    export = f"export {carved} --format gguf --data {text_file} --tokens 128 --window 64 -q"
    assert cli(f"{export} --out {good}") == 0
    before = good.read_bytes()

    def fail(*args, **kwargs):
        raise BrickworkError("the export does not compute what the carve computes")

    monkeypatch.setattr("brickwork.io.export.compare_logits", fail)
    assert cli(f"{export} --out {good}") == 2
    assert good.read_bytes() == before
    fresh = tmp_path / "fresh.gguf"
    assert cli(f"{export} --out {fresh}") == 2
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf") == ["good.gguf"]
    assert not [p for p in tmp_path.iterdir() if "brickwork-tmp" in p.name]


def test_a_glm4moe_gguf_without_shared_experts_is_refused_before_any_work(
    tmp_path, tiny_dir, text_file, capsys
):
    out = tmp_path / "noshared"
    assert (
        cli(
            f"carve {tiny_dir} --experts 8 --shared 0 --active 2 --router fitted --router-option intercept=false "
            f"--combine sigmoid --calib {text_file} --calib-tokens 512 --router-samples 256 --window 64 --out {out} -q"
        )
        == 0
    )
    capsys.readouterr()
    assert cli(f"export {out} --format gguf --data {text_file} --out {tmp_path / 'x.gguf'} -q") == 2
    assert "glm4moe expects shared experts" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


# --- an export recognises its own output ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["qwen2_moe", "gguf"])
def test_an_export_replaces_its_own_earlier_export_without_overwrite(carved, tmp_path, text_file, fmt):
    out = tmp_path / ("e.gguf" if fmt == "gguf" else "e")
    command = f"export {carved} --format {fmt} --data {text_file} --tokens 128 --window 64 --out {out} -q"
    assert cli(command) == 0
    assert cli(command) == 0
    if fmt != "gguf":
        record = json.loads((out / "brickwork-export.json").read_text())
        assert record["format"] == "brickwork-export" and record["export_format"] == fmt


# --- one divergence guard for every training loop -------------------------------------------------------------
def test_grow_with_an_absurd_learning_rate_stops_and_saves_nothing(tmp_path, carved, text_file, capsys):
    out = tmp_path / "grown"
    command = f"grow {carved} --data {text_file} --experts 2 --tokens 256 --window 32 --batch-size 4 --lr 1e30 --out {out} -q"
    assert cli(command) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "Traceback" not in err
    assert not out.exists()


def test_update_with_an_absurd_learning_rate_stops_and_saves_nothing(tmp_path, carved, text_file, capsys):
    out = tmp_path / "updated"
    assert (
        cli(
            f"update {carved} --data {text_file} --bricks 2 --tokens 256 --window 32 --lr 1e30 --out {out} -q"
        )
        == 2
    )
    assert "training diverged" in capsys.readouterr().err
    assert not out.exists()


def test_the_guard_stops_exploding_weights_and_a_climbing_loss_and_passes_a_sound_run():
    from brickwork.divergence import DivergenceGuard

    weight = torch.nn.Parameter(torch.full((4, 4), 0.5))
    guard = DivergenceGuard([("w", weight)])
    for step, loss in enumerate([3.0, 2.9, 2.8, 2.7], start=1):  # a run that learns
        guard.check_loss(loss, step)
        guard.check_weights(step)
    with torch.no_grad():
        weight.mul_(1e4)  # 5000 > 1000 x max(0.5, 1)
    with pytest.raises(BrickworkError, match="w grew to 5e\\+03"):
        guard.check_weights(5)
    with torch.no_grad():
        weight.fill_(float("nan"))
    with pytest.raises(BrickworkError, match="NaN or infinite"):
        guard.check_weights(6)

    climbing = DivergenceGuard([])
    climbing.check_loss(3.0, 1)
    climbing.check_loss(9.0, 2)  # one bad batch is not yet a trend
    with pytest.raises(BrickworkError, match="rose from 3 to"):
        climbing.check_loss(10.8, 3)  # the mean of the last three: 7.6 > 3 + 3
    with pytest.raises(BrickworkError, match="loss is nan"):
        DivergenceGuard([]).check_loss(float("nan"), 1)
    small = DivergenceGuard([])  # a distillation loss near zero may rise by min_rise
    for step, loss in enumerate([0.05, 0.5, 0.9, 1.0], start=1):
        small.check_loss(loss, step)


def test_the_trained_router_refuses_a_diverged_fit():
    from brickwork.routing.trained import train_linear_router

    x = torch.randn(256, 8)
    mass = torch.rand(256, 4)
    with pytest.raises(BrickworkError, match="router option lr"):
        train_linear_router(x, mass, active=2, intercept=True, steps=20, lr=1e30, seed=0)


# --- recover --mode e2e takes the carve's own parent only -----------------------------------------------------
def test_e2e_recovery_refuses_a_teacher_that_is_not_the_parent(
    carved, tmp_path, tiny_dir, text_file, tokenizer, capsys
):
    from brickwork.recovery.e2e import check_teacher

    model = bw.load(carved)
    parent, _ = bw.load_model(tiny_dir)
    check_teacher(model, parent)  # the real parent passes
    with pytest.raises(BrickworkError, match="differs from the carve's"):
        check_teacher(model, build_tiny_model("llama", seed=1))  # same shapes, other weights
    with pytest.raises(BrickworkError, match="architecture differs"):
        check_teacher(model, build_tiny_model("qwen2"))
    with pytest.raises(BrickworkError, match="itself a carved model"):
        check_teacher(model, bw.load(carved))

    other = tmp_path / "other"
    build_tiny_model("llama", seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    out = tmp_path / "recovered"
    command = f"recover {carved} --mode e2e --parent {other} --calib {text_file} --tokens 128 --window 32 --out {out} -q"
    assert cli(command) == 2
    assert "pass the dense model the carve was made from" in capsys.readouterr().err
    assert not out.exists()


# --- per-layer budgets keep their promise ---------------------------------------------------------------------
def test_a_layer_step_that_leaves_the_budget_range_is_refused(tmp_path, tiny_dir, text_file, capsys):
    with pytest.raises(ValueError, match="layer_step 0.9 must leave"):
        bw.CarveConfig(experts=8, shared=1, active=3, layer_budgets="sensitivity", layer_step=0.9)
    with pytest.raises(ValueError, match="less than one routed expert"):
        bw.CarveConfig(experts=8, shared=1, active=3, layer_budgets="sensitivity", layer_step=0.05)
    base = f"carve {tiny_dir} --experts 8 --shared 1 --active 3 --calib {text_file} --out {tmp_path / 'c'} -q"
    assert cli(f"{base} --layer-step 0.2") == 2
    assert "--layer-step is an option of --layer-budgets sensitivity" in capsys.readouterr().err
    assert cli(f"{base} --layer-budgets sensitivity --layer-step 0.9") == 2
    assert "must leave" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_per_layer_budgets_of_an_expert_level_carve_keep_the_average(text_file, tokenizer):
    """A step of one expert moves whole experts; a step of one and a half could raise a layer by one expert and
    lower another by two: such pairs are not made, and the average stays exactly the uniform one."""
    from brickwork.bricks import allocate_budgets
    from brickwork.bricks.state import carved_layers

    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2)
    bricks = carved_layers(model)
    uniform = sum(b.read_fraction() for b in bricks.values()) / len(bricks)
    first = next(iter(bricks.values()))
    one_expert = first.routed_fraction(3) - first.routed_fraction(2)
    options = {"tokens": 256, "window": 64, "progress": False}
    with pytest.raises(BrickworkError, match="less than one routed expert"):
        allocate_budgets(model, tokenizer, str(text_file), uniform, step=one_expert / 2, **options)
    for step, moved in ((one_expert, True), (one_expert * 1.5, False)):
        chosen = allocate_budgets(model, tokenizer, str(text_file), uniform, step=step, **options)
        after = sum(b.read_fraction() for b in bricks.values()) / len(bricks)
        assert after == pytest.approx(uniform, abs=1e-12), (step, chosen, uniform, after)
        assert (len(set(chosen.values())) > 1) == moved, chosen


# --- clear errors, never tracebacks ---------------------------------------------------------------------------
def test_bench_speed_refuses_a_carved_model_and_an_unrelated_out(carved, tmp_path, capsys):
    assert cli(f"bench speed {carved} --quick --out {tmp_path / 'b'} -q") == 2
    assert "bench speed takes the dense parent" in capsys.readouterr().err
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    assert cli(f"bench speed --quick --out {unrelated} -q") == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert cli(f"bench quality --quick --out {unrelated} -q") == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert [p.name for p in unrelated.iterdir()] == ["notes.txt"]


def test_a_token_budget_is_fitted_on_windows_the_model_has_positions_for(
    tmp_path, tokenizer, text_file, capsys
):
    path = tmp_path / "gpt2"
    build_tiny_model("gpt2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    carved = tmp_path / "carved"
    common = f"--experts 8 --shared 1 --active 3 --calib {text_file} --calib-tokens 512 --window 128"
    assert cli(f"carve {path} {common} --out {carved} -q") == 0
    command = f"eval {carved} --data {text_file} --window 128 --max-tokens 256 --token-budget 0.4 --token-calib {text_file}"
    assert cli(f"{command} -q") == 0, capsys.readouterr().err


def test_a_full_disk_is_a_clear_error(carved, tmp_path):
    """ENOSPC as the user meets it: a write fails, the CLI says so in one line, the earlier output stays."""
    out = tmp_path / "recovered"
    script = (
        "import errno, sys\n"
        "import safetensors.torch\n"
        "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device', a[1])\n"
        "safetensors.torch.save_file = full\n"
        "from brickwork.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "recover",
            str(carved),
            "--calib",
            str(carved / "README.md"),
            "--tokens",
            "64",
        ]
        + ["--window", "32", "--out", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "brickwork-tmp" in p.name]


def test_prune_refuses_more_experts_than_a_layer_has(carved, tmp_path, text_file, capsys):
    out = tmp_path / "pruned"
    assert (
        cli(f"prune {carved} --data {text_file} --tokens 256 --window 64 --min-experts 9 --out {out} -q") == 2
    )
    assert "min_experts 9 is more than the 7 routed experts" in capsys.readouterr().err
    assert not out.exists()


def test_merge_refuses_one_child_and_a_child_given_twice(carved, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli(f"merge {carved} --average --out {out} -q") == 2
    assert "two or more children" in capsys.readouterr().err
    assert cli(f"merge {carved} {carved}/ --average --out {out} -q") == 2
    assert "given more than once" in capsys.readouterr().err
    assert not out.exists()


def test_a_write_cleans_the_temporaries_of_dead_runs_beside_it_whatever_they_were_for(tmp_path):
    from brickwork.io_utils import atomic_directory, atomic_write_text

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [
        tmp_path / f".other.brickwork-tmp-{dead.pid}-abc",
        tmp_path / f".model.gguf.brickwork-tmp-{dead.pid}-xyz.gguf",
    ]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"x" * 1000)
    stale[1].write_bytes(b"half a gguf")
    with atomic_directory(tmp_path / "new") as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
    stale[1].write_bytes(b"half a gguf")
    atomic_write_text(tmp_path / "file.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json", "new"]
