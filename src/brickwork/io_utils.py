"""Writing outputs so that an interrupted write never leaves a half-written output and never loses a user's data.

- An output directory is built in a temporary directory beside it (``.NAME.brickwork-tmp-PID-XXXX``) and swapped
  into place once: ``renameat2(RENAME_EXCHANGE)`` on Linux, else two renames whose interruption the next write
  into the same parent repairs (the old copy, ``.NAME.brickwork-old-PID-XXXX``, is put back).
- Temporaries of runs that were killed (their pid is no longer alive) are removed by the next write into the same
  directory, whatever output they were for.
- An existing, non-empty output is replaced only when it is a brickwork output of the same kind (its marker file
  says so) or ``overwrite`` is given; an output is never the input, nor a directory holding the input.
- Files are written with the umask's permissions (``mkstemp`` and safetensors make them private).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from brickwork.errors import BrickworkError

_TMP = "brickwork-tmp"
_OLD = "brickwork-old"
_STALE = re.compile(rf"^\.(?P<name>.+)\.(?P<what>{_TMP}|{_OLD})-(?P<pid>\d+)-[^/]+$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_carve(path: Path) -> bool:
    try:
        return json.loads((path / "brickwork.json").read_text()).get("format") == "brickwork-carved"
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def _is_profile(path: Path) -> bool:
    return (path / "profile.json").is_file() and (path / "profile.safetensors").is_file()


def _is_export(path: Path) -> bool:
    try:
        return json.loads((path / "brickwork-export.json").read_text()).get("format") == "brickwork-export"
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def _is_bench(path: Path) -> bool:
    return (path / "results.json").is_file()


# Output kinds and how to recognise an existing output of that kind (its marker).
OUTPUT_KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "carve": ("a carved model (brickwork.json)", _is_carve),
    "profile": ("a profile (profile.json)", _is_profile),
    "export": ("an export (brickwork-export.json)", _is_export),
    "bench": ("a benchmark's results (results.json)", _is_bench),
}


def _inside(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def check_output_dir(
    path: str | os.PathLike,
    kind: str | None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Refuse, before any work is done, an output directory that cannot or may not be written.

    ``kind`` names the output (see :data:`OUTPUT_KINDS`); an existing, non-empty directory that is not an output
    of that kind is replaced only with ``overwrite``. ``inputs`` are paths the command reads: the output may be
    neither one of them nor a directory holding one.
    """
    path = Path(path).expanduser()
    if path.resolve() == Path.cwd().resolve() or path.resolve() == Path(path.resolve().anchor):
        raise BrickworkError(f"the output directory {path} is the current or root directory; name a new one")
    for source in inputs:
        if source is None:
            continue
        source_path = Path(source).expanduser()
        if source_path.exists() and _inside(source_path, path):
            raise BrickworkError(
                f"the output {path} is (or holds) the input {source}; writing it would destroy the input: "
                "choose another --out"
            )
    if path.exists() and not path.is_dir():
        raise BrickworkError(f"the output {path} exists and is not a directory; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        description, is_kind = OUTPUT_KINDS.get(kind, ("a brickwork output", lambda _: False))
        if not is_kind(path):
            raise BrickworkError(
                f"the output directory {path} is not empty and is not {description}; refusing to replace it. "
                "Choose another --out, or pass --overwrite to replace it and everything in it"
            )
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, name: str | None = None) -> None:
    """Remove temporaries of dead runs in ``parent`` (of output ``name`` only, when given), and put back an old
    copy whose replacement was interrupted between its two renames."""
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        match = _STALE.match(entry.name)
        if not match or (name is not None and match["name"] != name) or _pid_alive(int(match["pid"])):
            continue
        target = parent / match["name"]
        if match["what"] == _OLD and not target.exists() and (entry / "d").exists():
            os.replace(entry / "d", target)  # the crash came between the renames: the old copy is the output
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the system cannot."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def public_modes(root: Path) -> None:
    """Give ``root`` and everything in it the permissions the umask gives new files and directories."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(Path(directory) / name, 0o777 & ~mask)
        for name in files:
            os.chmod(Path(directory) / name, 0o666 & ~mask)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file beside ``path`` (``.NAME.brickwork-tmp-PID-XXXX.SUFFIX``, so readers that go by the
    suffix take it); on success it is renamed over ``path``, on error removed. Whatever is validated inside the
    block is validated before anything is replaced."""
    path = Path(path)
    if path.is_dir():
        raise BrickworkError(f"{path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    fd, name = tempfile.mkstemp(
        prefix=f".{path.name}.{_TMP}-{os.getpid()}-", suffix=path.suffix, dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; outputs follow the umask
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_directory(
    path: str | os.PathLike,
    kind: str | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in one swap, on error it is
    removed. What may be replaced is checked first (:func:`check_output_dir`)."""
    path = check_output_dir(path, kind, overwrite, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_TMP}-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        public_modes(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old copy
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_OLD}-{os.getpid()}-", dir=path.parent))
            os.replace(path, old / "d")
            os.replace(tmp, path)  # a crash before this line: clean_stale puts old/d back
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def updated_directory(
    path: str | os.PathLike,
    kind: str | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """:func:`atomic_directory` whose temporary starts as a copy of the existing directory: the files the block
    writes replace theirs, the others (a results directory's README) are kept, and the whole set appears at once."""
    path = Path(path)
    with atomic_directory(path, kind, overwrite, inputs) as tmp:
        if path.is_dir():
            shutil.copytree(path, tmp, symlinks=True, dirs_exist_ok=True)
        yield tmp
