"""Carving layer by layer (brickwork.carving.sequential): the same carve as carve_ + save, in bounded memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import brickwork as bw
from brickwork.carving import sequential
from brickwork.carving.sequential import carve_sequential
from brickwork.carving.stream_writer import SafetensorsStreamWriter
from brickwork.errors import BrickworkError
from brickwork.models.lazy import is_materialised
from brickwork.models.tiny import build_tiny_model

SMALL = dict(method="activation", calib_tokens=512, router_samples=256, window=64)


def _model_dir(tmp_path, tokenizer, model_type: str):
    path = tmp_path / f"tiny-{model_type}"
    build_tiny_model(model_type).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _reference(path, config, text_file, tokenizer, out):
    model, _ = bw.load_model(path, progress=False)
    bw.carve_(model, config, calib=str(text_file), tokenizer=tokenizer, progress=False)
    bw.save(model, out, tokenizer)
    return out


@pytest.mark.parametrize(
    "model_type, options",
    [
        ("llama", {}),
        ("gemma3_text", {}),  # per-layer masks and rotary tables (sliding and global layers)
        ("qwen2", {"combine": "softmax", "router_options": {"intercept": False}}),
        ("llama", {"layers": [1], "router": "partial", "method": "random"}),
        ("opt", {"experts": 8, "shared": 1}),  # an FFN spread over the block
    ],
)
def test_float32_sequential_carve_is_carve_and_save(tmp_path, tokenizer, text_file, model_type, options):
    path = _model_dir(tmp_path, tokenizer, model_type)
    config = bw.CarveConfig(**(SMALL | options))
    report = carve_sequential(
        path, config, text_file, tmp_path / "seq", dtype=torch.float32, tokenizer=tokenizer, progress=False
    )
    reference = _reference(path, config, text_file, tokenizer, tmp_path / "ref")

    got, want = bw.load(tmp_path / "seq"), bw.load(reference)
    got_state, want_state = got.state_dict(), want.state_dict()
    assert sorted(got_state) == sorted(want_state)
    for name, tensor in want_state.items():  # the same statistics, batches and seeds: bit for bit
        assert torch.equal(got_state[name], tensor), name
    got_meta = json.loads((tmp_path / "seq" / "brickwork.json").read_text())
    want_meta = json.loads((reference / "brickwork.json").read_text())
    assert got_meta.pop("sequential") == {"weights_dtype": "float32", "compute_dtype": "float32"}
    got_meta.pop("base_model"), want_meta.pop("base_model")
    assert got_meta == want_meta
    ids = torch.randint(4, 100, (2, 24))
    assert torch.equal(got(ids).logits, want(ids).logits)
    assert report.layers == [layer["layer"] for layer in want_meta["layers"]]
    assert report.calibration_tokens == want_meta["calibration_tokens"]
    steps = {s.step for s in report.steps}
    assert {"open", "capture", "load", "profile", "carve", "write", "finish"} <= steps
    assert all(s.seconds >= 0 and s.peak_rss > 0 for s in report.steps)


def test_bfloat16_carve_is_stored_in_bfloat16_and_loads_and_runs(tmp_path, tokenizer, text_file):
    path = _model_dir(tmp_path, tokenizer, "llama")
    config = bw.CarveConfig(**SMALL)
    carve_sequential(path, config, text_file, tmp_path / "bf16", tokenizer=tokenizer, progress=False)
    carve_sequential(
        path, config, text_file, tmp_path / "f32", dtype="float32", tokenizer=tokenizer, progress=False
    )
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as handle:
        dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    assert dtypes["model.layers.0.mlp.up"] == "BF16" and dtypes["model.embed_tokens.weight"] == "BF16"
    assert dtypes["model.layers.0.mlp.neuron_order"] == "I64"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # brickwork.load upcasts to float32 modules: the bf16 values exactly
    model, loaded_tokenizer = bw.load_model(tmp_path / "bf16", progress=False)
    full = bw.load(tmp_path / "f32")
    for name, tensor in full.state_dict().items():
        got = model.state_dict()[name]
        if tensor.is_floating_point():
            assert torch.equal(got, tensor.to(torch.bfloat16).float()), name
        else:
            assert torch.equal(got, tensor), name
    ids = torch.tensor([loaded_tokenizer("the quick brown fox").input_ids])
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, full(ids).logits, atol=0.05, rtol=0.05)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_at_most_one_layer_is_materialised_at_a_time(tmp_path, tokenizer, text_file, monkeypatch):
    path = _model_dir(tmp_path, tokenizer, "gemma3_text")
    seen = []
    real = sequential.materialise

    def checked(lazy, module, *args):
        blocks = lazy.model.model.layers
        assert not any(is_materialised(block) for block in blocks), "a layer was still materialised"
        assert not is_materialised(lazy.model.model.embed_tokens)  # freed after capturing the inputs
        real(lazy, module, *args)
        seen.append(next(i for i, block in enumerate(blocks) if block is module))

    monkeypatch.setattr(sequential, "materialise", checked)
    carve_sequential(
        path, bw.CarveConfig(**SMALL), text_file, tmp_path / "out", tokenizer=tokenizer, progress=False
    )
    assert seen == [0, 1]


def test_a_failure_leaves_no_output(tmp_path, tokenizer, text_file, monkeypatch):
    path = _model_dir(tmp_path, tokenizer, "llama")

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(sequential, "carve_layer", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        carve_sequential(
            path, bw.CarveConfig(**SMALL), text_file, tmp_path / "out", tokenizer=tokenizer, progress=False
        )
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_inputs_are_refused_clearly(tmp_path, tokenizer, text_file):
    path = _model_dir(tmp_path, tokenizer, "llama")
    config = bw.CarveConfig(**SMALL)

    def carve(model=path, config=config, calib=text_file, out=tmp_path / "out", **kwargs):
        return carve_sequential(model, config, calib, out, tokenizer=tokenizer, progress=False, **kwargs)

    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        carve(dtype="int8")
    with pytest.raises(ValueError, match="not divisible by experts"):
        carve(config=bw.CarveConfig(**SMALL | {"experts": 7, "shared": 1}))
    with pytest.raises(BrickworkError, match="longer than the model's 256 positions"):
        carve(config=bw.CarveConfig(**SMALL | {"window": 512, "calib_tokens": 512}))
    with pytest.raises(BrickworkError, match="GGUF file"):
        (tmp_path / "m.gguf").write_bytes(b"GGUF")
        carve(model=tmp_path / "m.gguf")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(BrickworkError, match="gave no window"):
        carve(calib=short)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(BrickworkError, match="not empty"):
        carve(out=tmp_path / "taken")
    with pytest.raises(BrickworkError, match="is .* the input"):
        carve(out=path)
    carve(out=tmp_path / "carved")
    with pytest.raises(BrickworkError, match="already carved"):
        carve(model=tmp_path / "carved", out=tmp_path / "again")
    big = tmp_path / "big"
    model = build_tiny_model("llama")
    torch.nn.init.constant_(model.model.norm.weight, 1e6)
    model.save_pretrained(big)
    with pytest.raises(BrickworkError, match="overflows torch.float16; store the carve in bfloat16"):
        carve(model=big, out=tmp_path / "big-out", dtype="float16")
    assert not (tmp_path / "big-out").exists()
    neox = _model_dir(tmp_path, tokenizer, "gpt_neox")  # transformers renames its head on load
    with pytest.raises(BrickworkError, match="under the model's own names"):
        carve(model=neox, out=tmp_path / "neox")
    assert not (tmp_path / "neox").exists()


@pytest.mark.parametrize("reserve", [8, 1 << 16])
def test_stream_writer_round_trips_whatever_the_header_reserve(tmp_path, reserve):
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),  # odd byte counts before wider types
        "b": torch.arange(7),
        "c": torch.randn(2, 3),
        "empty": torch.empty(0, 4),
        "mask": torch.tensor([True, False, True]),
    }
    path = tmp_path / "x.safetensors"
    with SafetensorsStreamWriter(path, {"format": "test"}, reserve=reserve) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "test"}
    with pytest.raises(BrickworkError, match="written twice"), SafetensorsStreamWriter(tmp_path / "y") as w:
        w.add("a", torch.ones(1))
        w.add("a", torch.ones(1))
    assert not (tmp_path / "y").exists()


def test_carve_command_sequential(tmp_path, tiny_dir, text_file, capsys):
    import shlex

    from brickwork.cli.main import main

    out = tmp_path / "carved"
    common = f"--calib {text_file} --calib-tokens 512 --window 64 -q"
    assert main(shlex.split(f"carve {tiny_dir} --active-fraction 0.5 --sequential --out {out} {common}")) == 0
    printed = capsys.readouterr().out
    assert (
        "the measured default is" in printed
        and "layer by layer" in printed
        and "weights stored in bfloat16" in printed
    )
    assert "peak RSS" in printed and "profile" in printed
    meta = json.loads((out / "brickwork.json").read_text())
    assert meta["sequential"]["weights_dtype"] == "bfloat16" and len(meta["layers"]) == 2
    assert main(shlex.split(f"eval {out} --data {text_file} --window 32 --max-tokens 96 -q")) == 0
    capsys.readouterr()

    f32 = tmp_path / "f32"
    command = f"carve {tiny_dir} --experts 8 --shared 1 --active 2 --sequential --dtype float32 --out {f32} {common}"
    assert main(shlex.split(command)) == 0
    assert json.loads((f32 / "brickwork.json").read_text())["sequential"]["weights_dtype"] == "float32"
    capsys.readouterr()

    assert (
        main(shlex.split(f"carve {tiny_dir} --experts 8 --dtype bfloat16 --out {tmp_path / 'x'} {common}"))
        == 2
    )
    assert "give --sequential too" in capsys.readouterr().err
    command = f"carve {tiny_dir} --experts 8 --sequential --eval {text_file} --out {tmp_path / 'x'} {common}"
    assert main(shlex.split(command)) == 2
    assert "brickwork eval OUT --parent MODEL" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_carve_in_memory_bench_runs_on_a_small_shape(tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    out = tmp_path / "results"
    argv = (
        "carve_in_memory.py --skip-real --simulate-hidden 64 --simulate-dff 128 --simulate-vocab 256 --layers 2 "
        f"--calib-tokens 512 --experts 8 --shared 1 --out {out} -q"
    )
    monkeypatch.setattr(sys, "argv", argv.split())
    runpy.run_path(str(Path(__file__).parents[1] / "bench" / "carve_in_memory.py"), run_name="__main__")
    results = json.loads((out / "results.json").read_text())
    simulated = results["simulated"]
    assert [row["layer"] for row in simulated["layers"]] == [0, 1]
    assert (
        simulated["projected_layers"] == 32
        and simulated["projected_seconds"] > simulated["seconds_per_layer"]
    )
    assert simulated["config"]["experts"] == 8 and simulated["dtype"] == "bfloat16"
    assert "Projected 32-layer carve" in (out / "results.md").read_text()


def test_sharded_checkpoints_are_read_shard_by_shard(tmp_path, tokenizer, text_file):
    model = build_tiny_model("qwen2")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    config = bw.CarveConfig(**SMALL)
    for path in (single, sharded):
        tokenizer.save_pretrained(path)
        carve_sequential(
            path, config, text_file, tmp_path / f"{path.name}-out", tokenizer=tokenizer, progress=False
        )
    a, b = bw.load(tmp_path / "single-out").state_dict(), bw.load(tmp_path / "sharded-out").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
