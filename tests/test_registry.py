"""Registry files come from the simple index, verified; errors say how to supply the file by hand."""

from __future__ import annotations

import pytest

from brickwork.data import registry
from brickwork.errors import BrickworkError
from conftest import publish


def test_download_from_the_simple_index_is_verified(local_index, tmp_path):
    data = b"archive bytes" * 1000
    spec = registry.RegistryFile(
        "Some_Project", "some-1.0.tar.gz", publish(local_index, "some-project", "some-1.0.tar.gz", data)
    )
    path = registry.download(spec, tmp_path / "out", progress=False)
    assert path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == ["some-1.0.tar.gz"]  # no temporary left
    assert registry.verify(spec, path) == path


def test_wrong_checksums_and_missing_files_are_refused_with_a_way_out(local_index, tmp_path):
    data = b"payload"
    good = publish(local_index, "proj", "proj-1.0.tar.gz", data)
    wrong = registry.RegistryFile("proj", "proj-1.0.tar.gz", "0" * 64, manual_env="PROJ_ARCHIVE")
    with pytest.raises(BrickworkError, match="not the pinned.*set PROJ_ARCHIVE to its path"):
        registry.download(wrong, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "proj-1.0.tar.gz").exists()
    # the index's fragment agrees with the pin, but the served bytes do not
    publish(local_index, "proj", "proj-1.0.tar.gz", b"tampered", fragment=good)
    with pytest.raises(BrickworkError, match="downloaded with sha256"):
        registry.download(
            registry.RegistryFile("proj", "proj-1.0.tar.gz", good), tmp_path / "out", progress=False
        )
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(BrickworkError, match="does not list proj-2.0.tar.gz"):
        registry.file_url(registry.RegistryFile("proj", "proj-2.0.tar.gz", good))
    with pytest.raises(BrickworkError, match="Could not read the package index page"):
        registry.file_url(registry.RegistryFile("absent", "absent-1.0.tar.gz", good))
    (tmp_path / "hand.tar.gz").write_bytes(b"other")
    with pytest.raises(BrickworkError, match="has sha256"):
        registry.verify(registry.RegistryFile("proj", "proj-1.0.tar.gz", good), tmp_path / "hand.tar.gz")


def test_index_url_comes_from_pip_settings(monkeypatch):
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    assert registry.index_url() == registry.DEFAULT_INDEX
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    assert registry.index_url() == "https://mirror.example/simple/"
