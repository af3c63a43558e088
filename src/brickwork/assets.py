"""Files brickwork downloads (Debian packages, registry archives, model parts): where they are cached, how they
are fetched and verified.

Every such file is pinned by SHA-256, and by size where known. A file reaches its path only verified: it is
written to a temporary file beside it (:func:`brickwork.io_utils.atomic_file`) and renamed once its bytes are
the pinned ones, so an interrupted, truncated or tampered download never leaves a file that looks complete; the
next write into the same folder removes the temporaries of killed runs. A file already in the cache is checked
again each time it is used.

Each error names the URL or file that failed and ends with the caller's ``hint``: how to supply the file by hand
on a machine that cannot download it.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_file
from brickwork.settings import cache_dir

CHUNK = 1 << 20
NETWORK_NOTE = "brickwork needs network access only to the package registries (PyPI and Debian)"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Pin:
    """What a file must be: its SHA-256 (lower-case hex) and, where known, its size in bytes."""

    sha256: str
    size: int | None = None

    def __post_init__(self):
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"sha256 must be 64 lower-case hex digits, not {self.sha256!r}")
        if self.size is not None and self.size < 0:
            raise ValueError(f"size must be None or at least 0 bytes, not {self.size}")

    def refusal(self, subject: str, size: int, sha256: str, advice: str, hint: str) -> BrickworkError | None:
        """None when a file of ``size`` bytes and ``sha256`` is the pinned one; else the error to raise:
        '<subject> sha256 ..., not the pinned ...; <advice>. <hint>'."""
        if sha256 == self.sha256 and self.size in (None, size):
            return None
        sizes = "" if self.size is None else f" ({size:,} bytes; pinned: {self.size:,})"
        return BrickworkError(
            f"{subject} sha256 {sha256}, not the pinned {self.sha256}{sizes}; {advice}. {hint}".rstrip()
        )


def cache_folder(kind: str) -> Path:
    """Where downloaded files of one kind are kept: ``$BRICKWORK_HOME/<kind>`` (``archives``: Debian packages)."""
    return cache_dir() / kind


def _bar(total: int | None, desc: str, progress: bool):
    from tqdm.auto import tqdm  # the CLI's progress bars; imported where a bar is drawn

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False)


def file_digest(path: Path, progress: bool = False, desc: str | None = None) -> tuple[int, str]:
    """The size and SHA-256 of a file, read in 1 MiB blocks (with a progress bar when ``progress``)."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle, _bar(path.stat().st_size, desc or path.name, progress) as bar:
        while block := handle.read(CHUNK):
            digest.update(block)
            size += len(block)
            bar.update(len(block))
    return size, digest.hexdigest()


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file."""
    return file_digest(path)[1]


def verify_file(
    path: Path,
    pin: Pin,
    hint: str,
    advice: str = "not using it",
    progress: bool = False,
    desc: str | None = None,
    subject: str | None = None,
) -> Path:
    """``path`` when it is the pinned file; a BrickworkError otherwise ('<subject> sha256 ..., not the pinned ...;
    <advice>. <hint>', the subject being '<path> has' unless given)."""
    if not path.is_file():
        raise BrickworkError(f"{path} does not exist. {hint}".rstrip())
    size, sha256 = file_digest(path, progress, desc)
    refusal = pin.refusal(subject or f"{path} has", size, sha256, advice, hint)
    if refusal:
        raise refusal
    return path


class VerifiedWriter:
    """The file that :func:`verified_file` is writing: each block is counted and hashed as it is written."""

    def __init__(self, handle: IO[bytes], bar):
        self._handle, self._bar, self._digest = handle, bar, hashlib.sha256()
        self.size = 0

    def write(self, block: bytes) -> None:
        self._handle.write(block)
        self._digest.update(block)
        self.size += len(block)
        self._bar.update(len(block))

    def describe(self, text: str) -> None:
        """Set the progress bar's description (what is being written now)."""
        self._bar.set_description(text)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


@contextmanager
def verified_file(
    target: Path,
    pin: Pin,
    subject: str,
    hint: str,
    progress: bool = True,
    desc: str | None = None,
    total: int | None = None,
) -> Iterator[VerifiedWriter]:
    """Write ``target`` from the blocks given to the yielded writer, into a temporary file beside it that is
    renamed over ``target`` only when its bytes are ``pin``; on a mismatch ('<subject> sha256 ..., not the pinned
    ...; not using it. <hint>') or any other error the temporary is removed. ``total``: bytes expected, for the
    progress bar (the pinned size when not given)."""
    with (
        atomic_file(target) as tmp,
        tmp.open("wb") as handle,
        _bar(total or pin.size, desc or target.name, progress) as bar,
    ):
        writer = VerifiedWriter(handle, bar)
        yield writer
        refusal = pin.refusal(subject, writer.size, writer.sha256, "not using it", hint)
        if refusal:
            raise refusal


def network_failure(what: str, reason: object, hint: str) -> BrickworkError:
    """The error for a download that could not be made: what failed and why (an exception or a sentence), where
    brickwork needs to connect, and ``hint``."""
    return BrickworkError(f"{what} failed ({reason}); {NETWORK_NOTE}. {hint}".rstrip())


def download(
    url: str, target: Path, pin: Pin, hint: str, progress: bool = True, timeout: float = 600
) -> Path:
    """Download ``url`` to ``target``, verified against ``pin`` (:func:`verified_file`); a BrickworkError naming
    the URL when the network or the server fails or the connection closes early."""
    target.parent.mkdir(parents=True, exist_ok=True)  # where a hint says to put a copy made by hand
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            announced = int(response.headers.get("Content-Length") or 0) or None
            subject = f"{url} downloaded with"
            with verified_file(target, pin, subject, hint, progress, total=announced) as out:
                while block := response.read(CHUNK):
                    out.write(block)
                if announced is not None and out.size != announced:
                    cut = f"the connection closed after {out.size:,} of the {announced:,} bytes announced"
                    raise network_failure(f"Downloading {url}", cut, hint)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # a 404 is a URLError
        raise network_failure(f"Downloading {url}", exc, hint) from exc
    return target


def fetch(url: str, target: Path, pin: Pin, hint: str, progress: bool = True, timeout: float = 600) -> Path:
    """The verified file at ``target``: the one there (checked again, a hand-placed copy included), else
    downloaded from ``url``."""
    if target.is_file():
        advice = f"delete it (brickwork then downloads {url} again) or replace it with the right file"
        return verify_file(target, pin, hint, advice)
    return download(url, target, pin, hint, progress, timeout)
