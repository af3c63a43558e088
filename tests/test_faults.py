"""Fault injection: every command that writes an output, on tiny models, killed with SIGKILL at several points, run
under a file-size limit, and aimed at an existing output. Whatever happens: no partial output, an existing output
byte-identical, a clear error (never a traceback), and no temporary left once the next write has run.

Each command is first run once to make the existing output it must protect. The kill cases run the CLI in a
child process that kills itself at a chosen point:

- ``work``: once the model is loaded, before anything is written;
- ``write``: while the weights are written (a safetensors or GGUF file half written, a layer-by-layer carve's
  stream stopped after three tensors, a plot half drawn);
- ``swap``: at the rename that would put the finished output in place.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from brickwork.cli.main import main
from brickwork.io_utils import clean_stale
from brickwork.models.tiny import build_tiny_model, build_tiny_tokenizer
from conftest import synthetic_text

# Kills itself at FAULT_POINT, then runs `brickwork ARGS...`. The patches go in before transformers and brickwork
# are imported, so that every module binds the patched functions.
_DRIVER = r"""
import os, signal, sys

point, target = os.environ["FAULT_POINT"], os.path.realpath(os.environ["FAULT_TARGET"])


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


if point == "write":
    import gguf
    import matplotlib.figure
    import safetensors.torch

    def half_written(path):
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        die()

    save_file = safetensors.torch.save_file
    def save_half(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        half_written(filename)
    safetensors.torch.save_file = save_half

    write_tensors = gguf.GGUFWriter.write_tensors_to_file
    def tensors_half(self, *args, **kwargs):
        write_tensors(self, *args, **kwargs)
        self.fout[0].flush()
        half_written(self.fout[0].name)
    gguf.GGUFWriter.write_tensors_to_file = tensors_half

    savefig = matplotlib.figure.Figure.savefig
    def savefig_half(self, path, *args, **kwargs):
        savefig(self, path, *args, **kwargs)
        half_written(path)
    matplotlib.figure.Figure.savefig = savefig_half

    import brickwork.carving.stream_writer as stream  # a carve made layer by layer streams its weights

    add = stream.SafetensorsStreamWriter.add
    def add_then_die(self, *args, **kwargs):
        add(self, *args, **kwargs)
        if len(self.entries) == 3:
            self._file.flush()
            die()
    stream.SafetensorsStreamWriter.add = add_then_die
elif point == "swap":
    replace = os.replace
    def replace_or_die(src, dst, *args, **kwargs):
        if os.path.realpath(dst) == target:
            die()
        return replace(src, dst, *args, **kwargs)
    os.replace = replace_or_die
    import brickwork.io_utils
    brickwork.io_utils._exchange = die
import brickwork

if point == "work":
    load_model = brickwork.load_model
    def load_then_die(*args, **kwargs):
        load_model(*args, **kwargs)
        die()
    brickwork.load_model = load_then_die

from brickwork.cli.main import main

sys.exit(main(sys.argv[1:]))
"""


def _tree(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _temporaries(parent: Path) -> list[str]:
    return sorted(
        p.name for p in parent.iterdir() if ".brickwork-tmp-" in p.name or ".brickwork-old-" in p.name
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Inputs (a tiny Llama, texts, three carves for the export formats) and each command's argument line."""
    root = tmp_path_factory.mktemp("faults")
    tiny = root / "tiny"
    build_tiny_model("llama").save_pretrained(tiny)
    build_tiny_tokenizer().save_pretrained(tiny)
    text = root / "text.txt"
    text.write_text(synthetic_text(1500))
    domain = root / "domain.txt"
    domain.write_text(synthetic_text(1500, seed=1))
    carve = (
        f"carve {tiny} --experts 8 --active 2 --router fitted --router-option intercept=false --calib {text} "
        "--calib-tokens 512 --router-samples 256 --window 64 -q"
    )
    carves = {}
    for name, options in {
        "softmax": "--shared 1 --combine softmax",
        "sigmoid": "--shared 1 --combine sigmoid",
        "no-shared": "--shared 0 --combine softmax_topk",
    }.items():
        carves[name] = root / f"carved-{name}"
        assert main(shlex.split(f"{carve} {options} --out {carves[name]}")) == 0
    child = root / "child"
    shutil.copytree(carves["softmax"], child)
    carved = carves["softmax"]
    export = f"--data {text} --tokens 128 --window 64 -q"
    train = "--tokens 256 --window 32 --batch-size 4 -q"
    commands = {
        "carve": (f"{carve} --shared 1 --combine softmax", "dir"),
        "carve sequential": (f"{carve} --shared 1 --sequential", "dir"),
        "profile": (f"profile {tiny} --calib {text} --tokens 128 --window 32 -q", "dir"),
        "export qwen2_moe": (f"export {carved} --format qwen2_moe {export}", "dir"),
        "export mixtral": (f"export {carves['no-shared']} --format mixtral {export}", "dir"),
        "export glm4_moe": (f"export {carves['sigmoid']} --format glm4_moe {export}", "dir"),
        "export gguf": (f"export {carved} --format gguf {export}", "file"),
        "recover local": (f"recover {carved} --calib {text} --tokens 512 --window 64 -q", "dir"),
        "recover e2e": (
            f"recover {carved} --mode e2e --parent {tiny} --calib {text} --tokens 256 --window 32 --batch-size 4 -q",
            "dir",
        ),
        "grow": (f"grow {carved} --data {domain} --experts 2 --kind lora --rank 4 {train}", "dir"),
        "update": (f"update {carved} --data {domain} --bricks 2 {train}", "dir"),
        "merge": (f"merge {carved} {child} --average -q", "dir"),
        "prune": (f"prune {carved} --data {domain} --tokens 256 --window 64 --coverage 0.5 -q", "dir"),
        "bench speed": ("bench speed --quick --fractions 0.5 --repeats 1 -q", "dir"),
    }
    # each command's existing output, made by a first run: what every fault must leave as it was
    outputs = {}
    for name, (command, kind) in commands.items():
        parent = root / "out" / name.replace(" ", "-")
        parent.mkdir(parents=True)
        out = parent / ("existing.gguf" if kind == "file" else "existing")
        assert main([*shlex.split(command), "--out", str(out)]) == 0, name
        outputs[name] = out
    return {"root": root, "commands": commands, "outputs": outputs}


def _run(command: str, out: Path, env: dict, timeout: int = 240, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _DRIVER, *shlex.split(command), "--out", str(out)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
    )


# (command, point): every command is killed while writing. The swap is one function per kind of writer, so it is
# tried once per writer: brickwork.save (carve, and grow for the commands that change a carve: recover, update, merge
# and prune save through it too), the layer-by-layer carve's, the profile's, the stock exports' (one for every
# format), the GGUF file's and the benchmark's. The work point once per kind of command is enough (nothing is written
# yet).
WRITE = (
    "carve",
    "carve sequential",
    "profile",
    "export qwen2_moe",
    "export mixtral",
    "export glm4_moe",
    "export gguf",
    "recover local",
    "recover e2e",
    "grow",
    "update",
    "merge",
    "prune",
    "bench speed",
)
SWAP = ("carve", "carve sequential", "profile", "export qwen2_moe", "export gguf", "grow", "bench speed")
KILLS = [
    *[(name, "write") for name in WRITE],
    *[(name, "swap") for name in SWAP],
    ("carve", "work"),
    ("export gguf", "work"),
    ("recover e2e", "work"),
]


# killed while writing to a new name too (one of each way of writing: a carve, a profile, the two export writers,
# a benchmark)
FRESH_NAME = ("carve", "profile", "export qwen2_moe", "export gguf", "bench speed")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "point"), KILLS, ids=[f"{n}-{p}" for n, p in KILLS])
def test_a_killed_command_leaves_no_partial_output_and_loses_nothing(work, name, point):
    command, kind = work["commands"][name]
    existing = work["outputs"][name]
    parent = existing.parent
    before = _tree(existing)
    # the existing output is the target; a kill while writing is also tried against a new name beside it
    fresh = point == "write" and name in FRESH_NAME
    targets = [existing] + ([parent / ("new.gguf" if kind == "file" else "new")] if fresh else [])
    for out in targets:
        env = {"FAULT_POINT": point, "FAULT_TARGET": str(out)}
        result = _run(command, out, env)
        assert result.returncode == -9, (name, point, result.returncode, result.stderr[-2000:])
        assert _tree(existing) == before, f"{name} killed at {point} changed the existing output"
        if out != existing:
            assert not out.exists(), f"{name} killed at {point} left a partial output at {out}"
    clean_stale(parent)  # what the next write into this directory does first
    assert _temporaries(parent) == [], _temporaries(parent)
    assert sorted(p.name for p in parent.iterdir()) == [existing.name]


@pytest.mark.slow
def test_every_command_under_a_file_size_limit_fails_clearly_and_changes_nothing(work):
    """All commands in one child process (none is killed), each against its existing output and against a new name,
    with a 16 KiB limit on the size of a file written: enough for configs and records, too little for weights."""
    import resource

    cases = []
    for name, (command, kind) in work["commands"].items():
        existing = work["outputs"][name]
        cases.append({"name": name, "argv": [*shlex.split(command), "--out", str(existing)]})
        new = existing.parent / ("new.gguf" if kind == "file" else "new")
        cases.append({"name": name, "argv": [*shlex.split(command), "--out", str(new)]})
    script = r"""
import contextlib, io, json, sys
from brickwork.cli.main import main

results = []
for case in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(case["argv"])
        except BaseException as exc:  # a traceback the user would see
            code = f"{type(exc).__name__}: {exc}"
    results.append({"name": case["name"], "code": code, "err": err.getvalue()[-600:]})
print(json.dumps(results))
"""
    before = {name: _tree(out) for name, out in work["outputs"].items()}
    limit = 16 * 1024

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    wrong = [o for o in outcomes if o["code"] != 2 or "Traceback" in o["err"] or "could not" not in o["err"]]
    assert not wrong, wrong
    for name, out in work["outputs"].items():
        assert _tree(out) == before[name], f"{name} under a file-size limit changed the existing output"
        assert sorted(p.name for p in out.parent.iterdir()) == [out.name], (name, list(out.parent.iterdir()))


def test_an_existing_output_of_another_kind_is_refused_before_any_work(work, capsys):
    """Every command aimed at an unrelated non-empty directory (or, for GGUF, a file) refuses it, and the
    directory is byte-identical after."""
    unrelated = work["root"] / "unrelated"
    unrelated.mkdir(exist_ok=True)
    (unrelated / "notes.txt").write_text("a user's file")
    stranger = work["root"] / "stranger.gguf"
    stranger.write_bytes(b"not ours")
    for name, (command, kind) in work["commands"].items():
        target = stranger if kind == "file" else unrelated
        before = _tree(target)
        assert main([*shlex.split(command), "--out", str(target)]) == 2, name
        err = capsys.readouterr().err
        assert "refusing to replace" in err and "Traceback" not in err, (name, err)
        assert _tree(target) == before, name
