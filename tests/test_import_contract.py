"""The import contract (pyproject's ``[tool.importlinter]``, run by ``make lint``) holds, and fails on an upward
import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    return subprocess.run([str(LINT)], cwd=root, env=env, capture_output=True, text=True)


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")
def test_the_import_contract_holds_and_catches_an_upward_import(tmp_path):
    assert _lint(ROOT).returncode == 0
    shutil.copytree(
        ROOT / "src" / "brickwork",
        tmp_path / "src" / "brickwork",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    errors = tmp_path / "src" / "brickwork" / "routing" / "oracle.py"
    errors.write_text(errors.read_text() + "\nfrom brickwork.io import saving  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0 and "brickwork.routing.oracle -> brickwork.io" in result.stdout
