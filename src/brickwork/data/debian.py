"""Debian binary packages (``.deb``) as corpus archives: fetched over HTTP, pinned by SHA-256, read in pure Python.

A ``.deb`` is an ``ar`` archive ("!<arch>\\n", then members behind 60-byte headers) whose ``data.tar.xz`` (or
``.gz``) holds the installed files; brickwork reads it with ``tarfile``, so it needs neither dpkg nor ar.

Each file is kept at ``$BRICKWORK_HOME/archives/<file>.deb``: a copy already there (downloaded by hand on a
machine without access, say) is used when its SHA-256 is the pinned one, and a download lands there only
verified (:mod:`brickwork.assets`).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from brickwork import assets
from brickwork.errors import BrickworkError

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60
# Compressions of data.tar that tarfile reads without extra packages; Debian also uses zstd and bzip2.
_TAR_MODES = {".xz": "r:xz", ".gz": "r:gz", "": "r:"}


@dataclass(frozen=True)
class DebFile:
    """One ``.deb`` of the Debian archive, pinned by URL, size and SHA-256."""

    url: str
    sha256: str
    size: int = 0

    @property
    def filename(self) -> str:
        return Path(unquote(urlsplit(self.url).path)).name


def _manual_hint(deb: DebFile, path: Path) -> str:
    package = deb.filename.split("_")[0]
    return (
        f"Offline, or once Debian no longer serves this version, download {deb.filename} (sha256 "
        f"{deb.sha256}) by hand, from a Debian mirror or https://snapshot.debian.org/binary/{package}/, "
        f"and put it at {path}."
    )


def fetch_deb(deb: DebFile, progress: bool = True, timeout: float = 60) -> Path:
    """The verified local copy of ``deb`` in ``$BRICKWORK_HOME/archives``: the one there if any, else a download."""
    target = assets.cache_folder("archives") / deb.filename
    pin = assets.Pin(deb.sha256, deb.size or None)
    return assets.fetch(deb.url, target, pin, _manual_hint(deb, target), progress, timeout)


def ar_members(data: bytes) -> dict[str, bytes]:
    """The members of an ``ar`` archive (the common format of ``.deb`` files), by name."""
    if not data.startswith(_AR_MAGIC):
        raise BrickworkError("not an ar archive (a .deb starts with '!<arch>')")
    members: dict[str, bytes] = {}
    offset = len(_AR_MAGIC)
    while offset + _AR_HEADER <= len(data):
        header = data[offset : offset + _AR_HEADER]
        if header[58:60] != b"`\n":
            raise BrickworkError(f"damaged ar header at byte {offset}")
        name = header[:16].decode("ascii", errors="replace").rstrip().removesuffix("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError as exc:
            raise BrickworkError(f"damaged ar header at byte {offset} (size field)") from exc
        start = offset + _AR_HEADER
        if start + size > len(data):
            raise BrickworkError(f"ar member {name} is cut short (truncated archive)")
        members[name] = data[start : start + size]
        offset = start + size + size % 2  # members are padded to an even length
    return members


def _data_tar(path: Path) -> tarfile.TarFile:
    try:
        members = ar_members(path.read_bytes())
    except BrickworkError as exc:
        raise BrickworkError(f"{path} is not a readable .deb: {exc}") from exc
    names = [name for name in members if name.startswith("data.tar")]
    if not names:
        raise BrickworkError(f"{path} holds no data.tar member (members: {', '.join(members)})")
    compression = names[0].removeprefix("data.tar")
    if compression not in _TAR_MODES:
        raise BrickworkError(
            f"{path} holds {names[0]}; brickwork reads data.tar.xz and data.tar.gz only "
            f"(unpack it with dpkg-deb and pass the text file instead)"
        )
    return tarfile.open(fileobj=io.BytesIO(members[names[0]]), mode=_TAR_MODES[compression])


def _normal(name: str) -> str:
    return name.removeprefix("./")


def read_deb_files(path: Path, select: Callable[[str], bool]) -> dict[str, bytes]:
    """The regular files of the ``.deb`` at ``path`` whose path (without a leading ``./``) ``select`` accepts."""
    files: dict[str, bytes] = {}
    with _data_tar(path) as tar:
        for info in tar:
            if info.isfile() and select(_normal(info.name)):
                handle = tar.extractfile(info)
                if handle is not None:
                    files[_normal(info.name)] = handle.read()
    return files


def read_deb_member(path: Path, member: str) -> bytes:
    """One file of the ``.deb`` at ``path``."""
    files = read_deb_files(path, lambda name: name == _normal(member))
    if not files:
        raise BrickworkError(f"{member} is not a file in {path.name}")
    return files[_normal(member)]
