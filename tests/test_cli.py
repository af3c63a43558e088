from __future__ import annotations

import json
import shlex

import pytest

from brickwork.cli.main import main


def cli(command: str) -> int:
    """Run ``brickwork <command>`` in-process; returns the exit code."""
    return main(shlex.split(command))


def test_profile_and_eval_commands(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "prof"
    assert cli(f"profile {tiny_dir} --calib {text_file} --tokens 128 --window 32 --out {out} -q") == 0
    printed = capsys.readouterr().out
    assert "top10% mass" in printed and "profiled 128 tokens" in printed
    for name in (
        "profile.safetensors",
        "profile.json",
        "summary.txt",
        "activation_rate_hist.png",
        "activation_rate_heatmap.png",
        "mass_share_by_layer.png",
    ):
        assert (out / name).is_file(), name

    report = tmp_path / "eval.json"
    command = f"eval {tiny_dir} --data {text_file} --parent {tiny_dir} --window 32 --max-tokens 96 --json {report} -q"
    assert cli(command) == 0
    assert "perplexity" in capsys.readouterr().out
    result = json.loads(report.read_text())["results"][0]
    assert result["windows"] == 3 and result["kl"] == pytest.approx(0, abs=1e-6)


def test_cli_errors_are_short_and_clear(tmp_path, tiny_dir, text_file, capsys, isolated_home):
    assert cli(f"eval {tiny_dir} --data no-such-corpus -q") == 2
    assert "neither a built-in corpus" in capsys.readouterr().err
    assert cli(f"eval {tmp_path / 'missing-model'} -q") == 2
    assert "Model path not found" in capsys.readouterr().err
    assert cli(f"profile {tiny_dir} --calib {text_file} --tokens 8 --window 32 -q") == 2
    assert "at least one window" in capsys.readouterr().err
    not_a_model = tmp_path / "plain-dir"
    not_a_model.mkdir()
    assert cli(f"eval {not_a_model} -q") == 2
    assert "holds no config.json" in capsys.readouterr().err


def test_carve_command_saves_evaluates_and_reloads(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "carved"
    command = (
        f"carve {tiny_dir} --experts 8 --shared 1 --active 2 --method activation --router fitted "
        f"--calib {text_file} --calib-tokens 512 --window 64 --out {out} --eval {text_file} --eval-tokens 1024 "
        "--samples 1 -q"
    )
    assert cli(command) == 0
    printed = capsys.readouterr().out
    assert "carved 2 FFN layers" in printed and "KL(dense||carved)" in printed and "dense :" in printed
    assert (out / "brickwork.json").is_file()
    # A carved directory is a model argument like any other.
    assert cli(f"eval {out} --data {text_file} --parent {tiny_dir} --window 32 --max-tokens 96 -q") == 0
    assert "top-1 agreement" in capsys.readouterr().out


def test_carve_command_with_only_a_fraction_uses_the_measured_default(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "carved"
    assert (
        cli(
            f"carve {tiny_dir} --active-fraction 0.5 --calib {text_file} --calib-tokens 512 --window 64 --out {out} "
            "--accumulate float64 -q"
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "the measured default is 64 experts of 1 neuron(s)" in printed and "router partial" in printed
    saved = json.loads((out / "brickwork.json").read_text())
    assert saved["carve_config"]["down_fraction"] is not None
    assert {layer["accumulate"] for layer in saved["layers"]} == {"float64"}


def test_carve_command_rejects_bad_shapes(tmp_path, tiny_dir, text_file, capsys):
    command = f"carve {tiny_dir} --experts 7 --active 2 --calib {text_file} --calib-tokens 512 --window 64 --out {tmp_path / 'c'} -q"
    assert cli(command) == 2
    assert "not divisible by experts = 7" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_carve_with_router_options_then_export(tmp_path, tiny_dir, text_file, capsys):
    carved, stock = tmp_path / "carved", tmp_path / "stock"
    command = (
        f"carve {tiny_dir} --experts 8 --shared 1 --active 2 --router fitted --router-option intercept=false "
        f"--calib {text_file} --calib-tokens 512 --window 64 --out {carved} -q"
    )
    assert cli(command) == 0
    config = json.loads((carved / "brickwork.json").read_text())["carve_config"]
    assert config["router_options"] == {"intercept": False}
    export = (
        f"export {carved} --format qwen2_moe --out {stock} --data {text_file} --tokens 128 --window 64 -q"
    )
    assert cli(export) == 0
    assert "KL(brickwork||exported)" in capsys.readouterr().out
    assert cli(f"carve {tiny_dir} --router-option oops --calib {text_file} --out {tmp_path / 'x'} -q") == 2
    assert "--router-option takes key=value" in capsys.readouterr().err


def test_recover_command_local_and_e2e(tmp_path, tiny_dir, text_file):
    carved = tmp_path / "carved"
    common = f"--calib {text_file} --calib-tokens 512 --window 64 -q"
    assert (
        cli(f"carve {tiny_dir} --experts 8 --shared 1 --active 2 --router fitted {common} --out {carved}")
        == 0
    )
    local = tmp_path / "local"
    assert cli(f"recover {carved} --calib {text_file} --tokens 512 --window 64 --out {local} -q") == 0
    summary = json.loads((local / "recovery.json").read_text())
    assert summary["mode"] == "local"
    assert all(layer["error_after"] < layer["error_before"] for layer in summary["layers"])
    e2e = tmp_path / "e2e"
    command = f"recover {local} --mode e2e --parent {tiny_dir} --calib {text_file} --tokens 256 --window 32"
    assert cli(f"{command} --batch-size 2 --out {e2e} -q") == 0
    assert json.loads((e2e / "recovery.json").read_text())["steps"] == 4
    assert cli(f"{command} --device cuda --out {tmp_path / 'x'} -q") == 2
    assert not (tmp_path / "x").exists()
