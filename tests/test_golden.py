"""What brickwork computes has not changed: every case of ``golden/record.py`` gives the digests of ``golden/golden.json``.

The digests are exact, so they hold on a machine like the one that recorded them (same CPU instruction sets and
library versions: float sums depend on both). On any other machine the reference is recorded here, by running the
same recorder against the recorded commit's source (a ``git worktree``), so that the comparison is always made on
one machine. A deliberate change of behaviour is listed in :data:`EXPLAINED` with its reason and its own test.

The two SmolLM2-135M cases (a real model's carve at the neuron-level and ``--stock`` presets) take as long as all
the tiny cases together, so the suite leaves them out; ``make golden`` (``BRICKWORK_GOLDEN_FULL=1``) records
every case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parents[1]

# "case/key" (or "case/*") -> why the digest differs from the recorded one, and which test holds the new behaviour.
EXPLAINED: dict[str, str] = {}


FULL = os.environ.get("BRICKWORK_GOLDEN_FULL") == "1"
REAL_MODEL_CASES = "smollm2/"  # the cases recorded only when FULL


def _record(out: Path, source: Path | None = None) -> dict:
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source / "src")
    env["PYTHONHASHSEED"] = "0"
    subprocess.run(
        [sys.executable, str(GOLDEN / "record.py"), "--out", str(out), *([] if FULL else ["--no-smollm2"])],
        check=True,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return json.loads(out.read_text())


def _reference(golden: dict, here: dict, tmp_path: Path) -> dict:
    """The recorded digests, or, on another kind of machine, the recorded commit's digests computed here."""
    if golden["machine"] == here:
        return golden["cases"]
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip(
            f"recorded on {golden['machine']}, this is {here}, and no git checkout to record the reference"
        )
    tree = tmp_path / "reference"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), golden["commit"]], check=True
    )
    try:
        return _record(tmp_path / "reference.json", tree)["cases"]
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def _explained(case: str, key: str) -> bool:
    return f"{case}/{key}" in EXPLAINED or f"{case}/*" in EXPLAINED


def test_every_golden_output_is_unchanged(tmp_path):
    sys.path.insert(0, str(GOLDEN))
    from record import machine

    golden = json.loads((GOLDEN / "golden.json").read_text())
    reference = _reference(golden, machine(), tmp_path)
    if not FULL:
        reference = {case: d for case, d in reference.items() if not case.startswith(REAL_MODEL_CASES)}
    current = _record(tmp_path / "current.json")["cases"]
    missing = sorted(set(reference) - set(current))
    assert not missing, f"cases no longer recorded: {missing}"
    changed = [
        f"{case}/{key}"
        for case, digests in sorted(reference.items())
        for key, value in sorted(digests.items())
        if current[case].get(key) != value and not _explained(case, key)
    ]
    assert not changed, f"{len(changed)} golden outputs changed: {changed[:20]}"
    stale = [name for name in EXPLAINED if name.rsplit("/", 1)[0] not in golden["cases"]]
    assert not stale, f"explanations for cases that are not recorded: {stale}"
