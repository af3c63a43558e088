"""Issue 15: never lose a user's data; refuse bad input before the work starts (one test per item)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import brickwork as bw
from brickwork.carving.config import CarveConfig
from brickwork.cli.main import main
from brickwork.data.sources import iter_documents
from brickwork.errors import BrickworkError
from brickwork.io.export import export
from brickwork.models.tiny import build_tiny_model


def cli(command: str) -> int:
    """``brickwork <command>`` in-process; argparse's own refusals (exit 2) count as exit codes too."""
    try:
        return main(shlex.split(command))
    except SystemExit as exc:
        return int(exc.code)


@pytest.fixture
def carved_dir(tmp_path, tiny_dir, text_file):
    out = tmp_path / "carved"
    command = (
        f"carve {tiny_dir} --experts 8 --shared 1 --active 2 --router fitted --router-option intercept=false "
        f"--calib {text_file} --calib-tokens 512 --window 64 --out {out} -q"
    )
    assert cli(command) == 0
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: the refusals under test must come before any loading."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(bw, "load_model", refuse)
    monkeypatch.setattr("brickwork.models.loading.load_model", refuse)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- 1. data loss ----------------------------------------------------------------------------------------------
def test_an_unrelated_directory_is_never_replaced_without_overwrite(tmp_path, tiny_dir, text_file, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    common = f"--experts 8 --shared 1 --active 2 --calib {text_file} --calib-tokens 512 --window 64 -q"
    assert cli(f"carve {tiny_dir} {common} --out {precious}") == 2
    assert "not empty" in capsys.readouterr().err and (precious / "thesis.tex").read_text() == "years of work"
    assert cli(f"profile {tiny_dir} --calib {text_file} --tokens 128 --window 32 --out {precious} -q") == 2
    assert (precious / "thesis.tex").is_file()
    assert cli(f"carve {tiny_dir} {common} --out {precious} --overwrite") == 0
    assert not (precious / "thesis.tex").exists() and (precious / "brickwork.json").is_file()
    assert cli(f"carve {tiny_dir} {common} --out {precious}") == 0  # a carve replaces a carve


def test_the_input_is_never_the_output(tmp_path, tiny_dir, carved_dir, text_file, capsys):
    before = _tree(tiny_dir)
    common = f"--experts 8 --shared 1 --active 2 --calib {text_file} --calib-tokens 512 --window 64 -q"
    assert cli(f"carve {tiny_dir} {common} --out {tiny_dir} --overwrite") == 2
    assert "destroy the input" in capsys.readouterr().err and _tree(tiny_dir) == before
    assert cli(f"carve {tiny_dir} {common} --out {tmp_path} --overwrite") == 2  # holds the input
    carved = _tree(carved_dir)
    assert cli(f"export {carved_dir} --out {carved_dir} --no-validate --overwrite -q") == 2
    assert cli(f"recover {carved_dir} --calib {text_file} --out {carved_dir} --overwrite -q") == 2
    assert _tree(carved_dir) == carved


def test_the_python_api_refuses_unrelated_directories_too(tmp_path, text_file, tokenizer):
    from conftest import carved_tiny

    model = carved_tiny(text_file, tokenizer)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    with pytest.raises(BrickworkError, match="not empty"):
        bw.save(model, tmp_path / "notes")
    with pytest.raises(BrickworkError, match="not empty"):
        export(model, tmp_path / "notes", validate_data=None)
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"


# --- 2. silent wrong model -------------------------------------------------------------------------------------
def test_a_carve_without_brickwork_json_is_refused(carved_dir, capsys):
    (carved_dir / "brickwork.json").unlink()
    with pytest.raises(BrickworkError, match="brickwork.json is missing"):
        bw.load_model(carved_dir)
    assert cli(f"eval {carved_dir} -q") == 2
    assert "brickwork.json" in capsys.readouterr().err


def test_missing_or_unexpected_weights_are_refused(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "dense"
    build_tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BrickworkError, match="missing keys"):
        bw.load_model(path)
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 32)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BrickworkError, match="unexpected keys"):
        bw.load_model(path)


# --- 3. options honoured or refused ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("--experts 0", "experts must be >= 1"),
        ("--shared -1", "shared must be"),
        ("--router lowrank --rank 0", "rank must be an integer >= 1"),
        ("--router lowrank --rank -5", "rank must be an integer >= 1"),
        ("--active-fraction 0.5 --active 3", "disagree"),
        ("--router-option nope=1", "takes no option 'nope'"),
        ("--active-fraction 0.5 --router-option intercept=false", "takes no option 'intercept'"),
        ("--router lowrank --rank 4 --router-option rank=8", "disagree"),
        ("--reads 0.5 --active-fraction 0.5", "older name of --reads and --neuron-share"),
        ("--reads 0.5 --experts 16", "give --neuron-share"),
        ("--reads 0.5 --neuron-share 0.5", "not both"),
        ("--stock --neuron-share 0.5", "give --reads too"),
    ],
)
def test_carve_options_are_refused_before_loading(
    tmp_path, tiny_dir, text_file, options, message, capsys, no_loading
):
    out = tmp_path / "c"
    assert cli(f"carve {tiny_dir} {options} --calib {text_file} --out {out} -q") == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_options_given_with_a_reads_budget_are_honoured(tmp_path, tiny_dir, text_file):
    out = tmp_path / "c"
    command = (
        f"carve {tiny_dir} --reads 0.5 --shared 2 --router-option input_fraction=0.5 --calib {text_file} "
        f"--calib-tokens 512 --window 64 --out {out} -q"
    )
    assert cli(command) == 0
    config = json.loads((out / "brickwork.json").read_text())["carve_config"]
    assert config["shared"] == 2 and config["router_options"] == {"input_fraction": 0.5}
    out2 = tmp_path / "c2"
    command = (
        f"carve {tiny_dir} --active-fraction 0.5 --router lowrank --rank 3 --calib {text_file} "
        f"--calib-tokens 512 --window 64 --out {out2} -q"
    )
    assert cli(command) == 0
    config = json.loads((out2 / "brickwork.json").read_text())["carve_config"]
    assert config["router"] == "lowrank" and config["router_options"] == {"rank": 3}


def test_recover_tokens_zero_is_refused(carved_dir, text_file, tmp_path, capsys, no_loading):
    assert cli(f"recover {carved_dir} --calib {text_file} --tokens 0 --out {tmp_path / 'r'} -q") == 2
    assert "tokens must be an integer >= 1" in capsys.readouterr().err


# --- issue 14: one source of defaults --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        "",
        "--experts 8 --shared 1 --active 3 --method random --router centroid --seed 3",
        "--experts 16 --active-fraction 0.5",
        "--experts 16 --neuron-share 0.5",
    ],
)
def test_the_cli_carves_exactly_what_carve_config_says(tmp_path, tiny_dir, text_file, tokenizer, options):
    out = tmp_path / "cli"
    fixed = f"--calib {text_file} --calib-tokens 512 --window 64"
    assert cli(f"carve {tiny_dir} {options} {fixed} --out {out} -q") == 0
    given = {"calib_tokens": 512, "window": 64}
    for flag, value in zip(options.split()[::2], options.split()[1::2], strict=True):
        name = flag[2:].replace("-", "_")
        given[name] = value if name in ("method", "router") else float(value) if "." in value else int(value)
    config = CarveConfig(**given)
    saved = json.loads((out / "brickwork.json").read_text())["carve_config"]
    assert saved == config.to_dict()
    model, _ = bw.load_model(tiny_dir)
    bw.carve_(model, config, calib=str(text_file), tokenizer=tokenizer, progress=False)
    api = bw.save(model, tmp_path / "api", tokenizer)
    assert (api / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_cli_help_comes_from_the_config():
    from brickwork.cli.main import build_parser

    carve = build_parser()._subparsers._group_actions[0].choices["carve"]
    helps = {a.dest: a.help for a in carve._actions}
    assert helps["shared"] == "slices run for every token (default 2)"
    assert CarveConfig.__dataclass_fields__["shared"].metadata["help"] in helps["shared"]


# --- 4. non-finite training ------------------------------------------------------------------------------------
def test_non_finite_settings_losses_and_weights_are_refused(
    carved_dir, tiny_dir, text_file, tmp_path, capsys
):
    from brickwork.bricks.state import carved_layers
    from brickwork.recovery.e2e import E2EConfig, recover_e2e_

    out = tmp_path / "e2e"
    for lr in ("inf", "nan", "0", "-1"):
        command = f"recover {carved_dir} --mode e2e --parent {tiny_dir} --calib {text_file} --lr {lr} --out {out} -q"
        assert cli(command) == 2
        assert "lr must be a finite number > 0" in capsys.readouterr().err
    model = bw.load(carved_dir)
    parent, tokenizer = bw.load_model(tiny_dir)
    with torch.no_grad():
        next(iter(carved_layers(model).values())).up.fill_(float("nan"))
    config = E2EConfig(tokens=64, window=32, batch_size=2)
    with pytest.raises(BrickworkError, match="training diverged"):
        recover_e2e_(model, parent, tokenizer, str(text_file), config, progress=False)
    with pytest.raises(BrickworkError, match="NaN or infinite"):
        bw.save(model, out, tokenizer)
    assert not out.exists()


# --- 5. garbage text -------------------------------------------------------------------------------------------
def test_text_that_is_not_utf8_is_refused(tmp_path, tiny_dir, capsys, no_loading):
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    assert cli(f"eval {tiny_dir} --data {binary} -q") == 2
    assert f"{binary} is not UTF-8 text" in capsys.readouterr().err
    replaced = tmp_path / "lossy.txt"
    replaced.write_text("\ufffd" * 100 + " some words")
    with pytest.raises(BrickworkError, match="replacement characters"):
        list(iter_documents(replaced))


# --- 6. the shared battery: every command's bad inputs, refused before any model is loaded ---------------------
def _battery(tmp_path: Path, tiny_dir: Path, text_file: Path) -> list[tuple[str, str]]:
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_dir / "config.json").read_text())
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((tiny_dir / "config.json").read_text()[:40])
    (truncated / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    carved = tmp_path / "carved"  # made by the test
    calib = f"--calib {text_file}"
    return [
        (f"profile {no_weights} {calib} --out {tmp_path / 'o'}", "holds no weights"),
        (f"profile {truncated} {calib} --out {tmp_path / 'o'}", "damaged or truncated"),
        (f"profile {tiny_dir} {calib} --batch-size 0 --out {tmp_path / 'o'}", "batch_size must be >= 1"),
        (f"profile {tiny_dir} {calib} --out {a_file}", "is not a directory"),
        (f"profile {tiny_dir} --calib no-such-corpus --out {tmp_path / 'o'}", "neither a built-in corpus"),
        (f"carve {no_weights} {calib} --out {tmp_path / 'o'}", "holds no weights"),
        (f"carve {tiny_dir} {calib} --out {a_file}", "is not a directory"),
        (f"carve {tiny_dir} {calib} --out .", "current or root directory"),
        (
            f"carve {tiny_dir} {calib} --eval no-such-corpus --out {tmp_path / 'o'}",
            "neither a built-in corpus",
        ),
        (f"carve {tiny_dir} {calib} --router-option colour=red --out {tmp_path / 'o'}", "takes no option"),
        (f"carve {tiny_dir} {calib} --window 1 --out {tmp_path / 'o'}", "window must be >= 2"),
        (f"eval {tiny_dir} --data {text_file} --batch-size 0", ""),
        (f"eval {tiny_dir} --data {text_file} --batch-size -1", ""),
        (f"eval {tiny_dir} --data {text_file} --json {a_dir}", "is a directory"),
        (f"eval {truncated} --data {text_file}", "damaged or truncated"),
        (f"eval tmp/no-such/model --data {text_file}", "Model path not found"),
        (f"export {carved} --format gguf --out {a_dir}", "must end in .gguf"),
        (f"export {carved} --format gguf --out {tmp_path / 'x.gguf'} --tokens 0", ""),
        (f"export {carved} --out {a_file}", "is not a directory"),
        (f"export {carved} --out {tmp_path / 's'} --json {a_dir}", "is a directory"),
        (f"export {tiny_dir} --out {tmp_path / 's'} --data {text_file}", "not a carved model"),
        (f"recover {carved} {calib} --device cuda:7 --out {tmp_path / 'o'}", "CUDA device(s)"),
        (f"recover {carved} {calib} --mode e2e --batch-size 0 --out {tmp_path / 'o'}", "batch_size must be"),
        (f"recover {carved} {calib} --lr 1e-3 --out {tmp_path / 'o'}", "option(s) of --mode e2e"),
        (f"recover {carved} {calib} --out {carved}", "destroy the input"),
        (f"recover {tiny_dir} {calib} --out {tmp_path / 'o'}", "not a carved model"),
        ("bench quality --experts 8 --shared 20", "shared in [0, experts - 1]"),
        ("bench quality --experts 8 --shared 7 --fractions 0.25", "grid would be empty"),
    ]


def test_every_command_refuses_bad_input_before_loading(
    tmp_path, tiny_dir, text_file, carved_dir, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    cases = _battery(tmp_path, tiny_dir, text_file)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(bw, "load_model", refuse)
    monkeypatch.setattr("brickwork.models.loading.load_model", refuse)
    for command, message in cases:
        code = cli(f"{command} -q")
        err = capsys.readouterr().err
        assert code == 2, (command, err)
        assert message in err and "Traceback" not in err, (command, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_a_window_longer_than_the_positions_is_refused_and_carve_takes_a_window(
    tmp_path, tokenizer, text_file, capsys
):
    path = tmp_path / "gpt2"
    build_tiny_model("gpt2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    common = f"--experts 8 --shared 1 --active 2 --calib {text_file} --calib-tokens 512"
    assert cli(f"carve {path} {common} --window 512 --out {tmp_path / 'c'} -q") == 2
    assert "longer than the model's 256 positions" in capsys.readouterr().err
    assert cli(f"eval {path} --data {text_file} --window 512 -q") == 2
    assert cli(f"carve {path} {common} --window 64 --out {tmp_path / 'c'} -q") == 0


# --- 7. brickwork.json is validated, never trusted -------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(model_class="AutoModel"), "not one transformers uses"),
        (lambda m: m.update(model_class="pipeline"), "not one transformers uses"),
        (lambda m: m["layers"][0].update(layer=-1), "is not a layer of the base model"),
        (lambda m: m["layers"][0].update(active=99), "active 99 is not in"),
        (lambda m: m["layers"][0].update(router="evil"), "unknown router"),
        (lambda m: m["layers"][0].update(router_config={"__class__": 1}), "takes no option"),
        (lambda m: m["layers"][0].update(accumulate="float16"), "accumulate"),
        (lambda m: m.update(layers=[m["layers"][0], m["layers"][0]]), "appears twice"),
        (lambda m: m["carve_config"].update(experts=-1), "carve_config is invalid"),
        (lambda m: m.update(format_version=99), "format 99"),
    ],
)
def test_brickwork_json_is_validated(carved_dir, edit, message):
    meta = json.loads((carved_dir / "brickwork.json").read_text())
    edit(meta)
    (carved_dir / "brickwork.json").write_text(json.dumps(meta))
    with pytest.raises(BrickworkError, match=message) as caught:
        bw.load(carved_dir)
    assert str(caught.value).count(bw.__version__) <= 1  # the future-version message names each version once


# --- 8. atomic writes ------------------------------------------------------------------------------------------
def test_stale_temporaries_are_cleaned_and_an_interrupted_swap_is_repaired(tmp_path):
    from brickwork.io_utils import atomic_directory, clean_stale

    dead = _dead_pid()
    stale = tmp_path / f".out.brickwork-tmp-{dead}-abc"
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"0" * 100)
    alive = tmp_path / f".out.brickwork-tmp-{os.getpid()}-abc"  # a live run's: left alone
    alive.mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("new")
    assert not stale.exists() and alive.exists() and (tmp_path / "out" / "a").read_text() == "new"
    # a crash between the two renames of the fallback: the output is absent, the old copy hidden
    old = tmp_path / f".model.brickwork-old-{dead}-xyz"
    (old / "d").mkdir(parents=True)
    (old / "d" / "weights").write_text("old")
    clean_stale(tmp_path)
    assert (tmp_path / "model" / "weights").read_text() == "old" and not old.exists()


def test_replacing_swaps_once_and_leaves_nothing_behind(tmp_path, monkeypatch):
    from brickwork import io_utils

    target = tmp_path / "out"
    for text in ("one", "two"):
        with io_utils.atomic_directory(target, overwrite=True) as tmp:
            (tmp / "f").write_text(text)
    assert (target / "f").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(io_utils, "_exchange", lambda a, b: False)  # the fallback
    with io_utils.atomic_directory(target, overwrite=True) as tmp:
        (tmp / "f").write_text("three")
    assert (target / "f").read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_everything_is_written_before_the_swap(tmp_path, tiny_dir, text_file, monkeypatch):
    import brickwork.profiling.report as report

    def broken(prof, directory):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "write_plots", broken)
    out = tmp_path / "prof"
    with pytest.raises(RuntimeError):
        cli(f"profile {tiny_dir} --calib {text_file} --tokens 128 --window 32 --out {out} -q")
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- 9. smaller ------------------------------------------------------------------------------------------------
def test_carving_twice_gives_byte_identical_files_with_umask_modes(tmp_path, tokenizer, text_file):
    path = tmp_path / "gpt2"  # tied embeddings
    build_tiny_model("gpt2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        command = (
            f"carve {path} --experts 8 --calib {text_file} --calib-tokens 512 --window 64 --out {out} -q"
        )
        assert cli(command) == 0
    assert _tree(outs[0]) == _tree(outs[1])
    mask = os.umask(0)
    os.umask(mask)
    for file in outs[0].iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~mask, file.name
    assert outs[0].stat().st_mode & 0o777 == 0o777 & ~mask


def test_a_mistyped_relative_path_is_not_a_hub_name(tmp_path, monkeypatch):
    from brickwork.models.loading import resolve_model_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("models/tinyy", "runs/a/b", "./x", "name with spaces"):
        with pytest.raises(BrickworkError, match="not found"):
            resolve_model_source(name)
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")


def test_evaluate_refuses_a_batch_size_below_one(tiny_dir, text_file):
    model, tokenizer = bw.load_model(tiny_dir)
    with pytest.raises(BrickworkError, match="batch_size must be"):
        bw.evaluate(model, tokenizer, text_file, window=32, batch_size=0, progress=False)
