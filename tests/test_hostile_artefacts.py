"""A catalogue of hostile artefacts: carved models, profiles and GGUF files edited field by field, stored in the
wrong dtypes, holding NaNs, truncated. Loading each one is a BrickworkError that names what is wrong, never a
traceback from inside torch, safetensors or numpy, and never a model that loads and computes something else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import brickwork as bw
from brickwork.errors import BrickworkError
from brickwork.models.tiny import build_tiny_model, build_tiny_tokenizer
from conftest import synthetic_text


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A carved tiny Llama (saved with its tokenizer), a profile of it, and a GGUF export of it."""
    root = tmp_path_factory.mktemp("hostile")
    text = root / "text.txt"
    text.write_text(synthetic_text(1500))
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama").eval()
    config = bw.CarveConfig(
        experts=8, shared=1, active=2, method="random", calib_tokens=512, router_samples=256, window=64,
        combine="softmax", router_options={"intercept": False},
    )  # fmt: skip
    bw.carve_(model, config, calib=str(text), tokenizer=tokenizer, progress=False)
    carved = root / "carved"
    bw.save(model, carved, tokenizer)
    profile = bw.profile(
        build_tiny_model("llama"),
        tokenizer,
        str(text),
        bw.ProfileConfig(tokens=128, window=32),
        progress=False,
    )
    profiled = root / "profile"
    profile.save(profiled)
    from brickwork.io.export import export

    gguf = root / "carved.gguf"
    export(model, gguf, "gguf", tokenizer, validate_data=str(text), validate_tokens=128, window=64)
    return {"carved": carved, "profile": profiled, "gguf": gguf}


def _json(name: str, edit):
    def apply(directory: Path) -> None:
        path = directory / name
        data = json.loads(path.read_text())
        edited = edit(data)
        path.write_text(json.dumps(data if edited is None else edited))

    return apply


def _text(name: str, text: str | bytes):
    def apply(directory: Path) -> None:
        path = directory / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return apply


def _truncate(name: str, keep: float = 0.5):
    def apply(directory: Path) -> None:
        path = directory / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return apply


def _tensors(edit):
    """Edit model.safetensors' tensors (a dict), keeping its metadata."""

    def apply(directory: Path) -> None:
        path = directory / "model.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata={"format": "brickwork-carved"})

    return apply


def _brick_name(tensors: dict) -> str:
    return next(name for name in sorted(tensors) if ".mlp." in name and tensors[name].is_floating_point())


def _set(tensors: dict, name: str, tensor: torch.Tensor) -> None:
    tensors[name] = tensor


def _poison(value: float, brick: bool):
    def edit(tensors: dict) -> None:
        name = _brick_name(tensors) if brick else "model.embed_tokens.weight"
        tensor = tensors[name].clone()
        tensor.view(-1)[0] = value
        tensors[name] = tensor

    return edit


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


CARVE_CASES = {
    # brickwork.json: every kind of field
    "model_class a list": (
        _json("brickwork.json", lambda m: m.update(model_class=["LlamaForCausalLM"])),
        "model_class",
    ),
    "model_type a number": (_json("brickwork.json", lambda m: m.update(model_type=5)), "model_type"),
    "nested 100,000 deep": (_text("brickwork.json", _deep(100_000)), "damaged"),
    "object nested 100,000 deep": (
        _text("brickwork.json", '{"format": "brickwork-carved", "layers": ' + _deep(100_000) + "}"),
        "damaged",
    ),
    "format_version -1": (_json("brickwork.json", lambda m: m.update(format_version=-1)), "format_version"),
    "format_version true": (
        _json("brickwork.json", lambda m: m.update(format_version=True)),
        "format_version",
    ),
    "format_version a string": (
        _json("brickwork.json", lambda m: m.update(format_version="1")),
        "format_version",
    ),
    "format_version 99": (
        _json("brickwork.json", lambda m: m.update(format_version=99)),
        "upgrade brickwork",
    ),
    "format not ours": (
        _json("brickwork.json", lambda m: m.update(format="other")),
        "not a carved-model record",
    ),
    "not an object": (_text("brickwork.json", "[1, 2]"), "not a carved-model record"),
    "truncated brickwork.json": (_truncate("brickwork.json"), "damaged"),
    "brickwork.json not UTF-8": (_text("brickwork.json", b"\xff\xfe\x00{"), "damaged"),
    "base_settings a string": (
        _json("brickwork.json", lambda m: m.update(base_settings="silu")),
        "base_settings",
    ),
    "recorded activation differs": (
        _json("brickwork.json", lambda m: m["base_settings"].update(hidden_act="gelu")),
        "hidden_act",
    ),
    "recorded eps differs": (
        _json("brickwork.json", lambda m: m["base_settings"].update(rms_norm_eps=0.5)),
        "rms_norm_eps",
    ),
    "weights_dtype unknown": (
        _json("brickwork.json", lambda m: m.update(weights_dtype="int8")),
        "weights_dtype",
    ),
    "weights_dtype a number": (_json("brickwork.json", lambda m: m.update(weights_dtype=4)), "weights_dtype"),
    "calibration_tokens negative": (
        _json("brickwork.json", lambda m: m.update(calibration_tokens=-5)),
        "calibration_tokens",
    ),
    "calibration a number": (_json("brickwork.json", lambda m: m.update(calibration=3)), "calibration"),
    "base_model a list": (_json("brickwork.json", lambda m: m.update(base_model=[])), "base_model"),
    "layers an object": (_json("brickwork.json", lambda m: m.update(layers={})), "lists no carved layer"),
    "layer record a string": (_json("brickwork.json", lambda m: m.update(layers=["x"])), "is not an object"),
    "layer d_ff a float": (_json("brickwork.json", lambda m: m["layers"][0].update(d_ff=64.0)), "d_ff"),
    "layer active negative": (_json("brickwork.json", lambda m: m["layers"][0].update(active=-1)), "active"),
    "carve_config not an object": (
        _json("brickwork.json", lambda m: m.update(carve_config=[])),
        "carve_config is invalid",
    ),
    # config.json
    "activation changed to relu": (_json("config.json", lambda c: c.update(hidden_act="relu")), "hidden_act"),
    "unknown activation": (_json("config.json", lambda c: c.update(hidden_act="no_such_act")), "hidden_act"),
    "activation a number": (_json("config.json", lambda c: c.update(hidden_act=3)), "hidden_act"),
    "rms_norm_eps NaN": (_json("config.json", lambda c: c.update(rms_norm_eps=float("nan"))), "rms_norm_eps"),
    "rms_norm_eps negative": (_json("config.json", lambda c: c.update(rms_norm_eps=-1e-6)), "rms_norm_eps"),
    "negative intermediate_size": (
        _json("config.json", lambda c: c.update(intermediate_size=-64)),
        "intermediate_size",
    ),
    "num_hidden_layers a string": (
        _json("config.json", lambda c: c.update(num_hidden_layers="2")),
        "num_hidden_layers",
    ),
    "vocab_size zero": (_json("config.json", lambda c: c.update(vocab_size=0)), "vocab_size"),
    "truncated config.json": (_truncate("config.json"), "damaged"),
    "config.json a list": (_text("config.json", "[]"), "config.json"),
    # model.safetensors: dtypes, values, shapes, truncation
    "brick tensor stored as int32": (
        _tensors(lambda t: _set(t, _brick_name(t), t[_brick_name(t)].to(torch.int32))),
        "stored as int32",
    ),
    "brick tensor stored as float16": (
        _tensors(lambda t: _set(t, _brick_name(t), t[_brick_name(t)].half())),
        "stored as float16",
    ),
    "embedding stored as bfloat16": (
        _tensors(lambda t: _set(t, "model.embed_tokens.weight", t["model.embed_tokens.weight"].bfloat16())),
        "stored as bfloat16",
    ),
    "NaN in a brick": (_tensors(_poison(float("nan"), brick=True)), "NaN or infinite"),
    "inf in the embedding": (_tensors(_poison(float("inf"), brick=False)), "NaN or infinite"),
    "a brick tensor of another shape": (
        _tensors(lambda t: _set(t, _brick_name(t), t[_brick_name(t)][:1].clone())),
        "does not match",
    ),
    "a brick tensor missing": (_tensors(lambda t: t.pop(_brick_name(t))), "does not match"),
    "an unexpected tensor": (_tensors(lambda t: _set(t, "model.extra", torch.zeros(2))), "does not match"),
    "truncated model.safetensors": (_truncate("model.safetensors"), "damaged"),
    "empty model.safetensors": (_truncate("model.safetensors", 0.0), "damaged"),
}


@pytest.mark.parametrize("case", sorted(CARVE_CASES))
def test_a_hostile_carve_is_refused_naming_what_is_wrong(sources, tmp_path, case):
    edit, message = CARVE_CASES[case]
    directory = tmp_path / "carved"
    shutil.copytree(sources["carved"], directory)
    bw.load(directory)  # the copy itself loads
    edit(directory)
    with pytest.raises(BrickworkError, match=message):
        bw.load(directory)
    with pytest.raises(BrickworkError):  # and through the loader every command uses
        bw.load_model(directory)


PROFILE_CASES = {
    "truncated profile.json": (_truncate("profile.json"), "damaged"),
    "num_layers a string": (_json("profile.json", lambda m: m.update(num_layers="2")), "num_layers"),
    "num_layers too few": (_json("profile.json", lambda m: m.update(num_layers=1)), "not a statistic"),
    "format_version a list": (_json("profile.json", lambda m: m.update(format_version=[])), "format_version"),
    "profile.json nested deep": (_text("profile.json", _deep(100_000)), "damaged"),
    "truncated profile.safetensors": (_truncate("profile.safetensors"), "damaged"),
}


@pytest.mark.parametrize("case", sorted(PROFILE_CASES))
def test_a_hostile_profile_is_refused(sources, tmp_path, case):
    edit, message = PROFILE_CASES[case]
    directory = tmp_path / "profile"
    shutil.copytree(sources["profile"], directory)
    bw.Profile.load(directory)
    edit(directory)
    with pytest.raises(BrickworkError, match=message):
        bw.Profile.load(directory)


def test_a_profile_holding_nan_is_refused(sources, tmp_path):
    directory = tmp_path / "profile"
    shutil.copytree(sources["profile"], directory)
    tensors = load_file(str(directory / "profile.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(directory / "profile.safetensors"))
    with pytest.raises(BrickworkError, match="NaN"):
        bw.Profile.load(directory)


@pytest.mark.parametrize("keep", [0.0, 0.02, 0.5, 0.99])
def test_a_truncated_gguf_is_refused(sources, tmp_path, keep):
    from brickwork.io.export import load_exported

    path = tmp_path / "carved.gguf"
    data = sources["gguf"].read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BrickworkError, match="not a readable GGUF file"):
        load_exported(path, "gguf")
    with pytest.raises(BrickworkError, match="not a readable GGUF file"):
        bw.load_model(path)


def test_a_gguf_of_garbage_is_refused(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(BrickworkError, match="not a readable GGUF file"):
        bw.load_model(path)
