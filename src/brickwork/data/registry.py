"""Files from the Python package registry, fetched the way every mirror serves them: the simple index.

The simple index (PEP 503) lists each release file as a link with a ``#sha256=`` fragment; it is what ``pip``
reads and what registry mirrors serve. PyPI's JSON API is *not* served by every mirror (it answers 404 on
some), so brickwork never uses it. A file is fetched only when a command needs it, verified against a
SHA-256 pinned in the code (and against the index's own fragment) by :mod:`brickwork.assets`, which never
leaves a broken download that looks complete.

The index is ``$PIP_INDEX_URL`` when set, else PyPI's. For a machine without access, every error says which
file to download by hand and how to hand it to brickwork.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from brickwork import assets
from brickwork.errors import BrickworkError

DEFAULT_INDEX = "https://pypi.org/simple/"
_LINK = re.compile(r"""<a\s[^>]*href=["']([^"']+)["'][^>]*>""", re.I)


@dataclass(frozen=True)
class RegistryFile:
    """One release file of a registry project, pinned by name and SHA-256."""

    project: str  # the registry project name, e.g. "bigbench"
    filename: str  # the exact file name, e.g. "bigbench-1.0.0.tar.gz"
    sha256: str
    size_hint: str = ""  # for messages, e.g. "358 MB"
    manual_env: str = ""  # environment variable naming a hand-downloaded copy, if the caller supports one


def index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
    return url if url.endswith("/") else url + "/"


def _normalise(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()


def _manual_hint(spec: RegistryFile) -> str:
    where = f"set {spec.manual_env} to its path" if spec.manual_env else "put it where the error says"
    return (
        f"To supply it by hand: download {spec.filename} (sha256 {spec.sha256}) from the '{spec.project}' "
        f"project's page of a PyPI mirror's simple index ({index_url()}{_normalise(spec.project)}/), and {where}."
    )


def file_url(spec: RegistryFile, timeout: float = 60) -> str:
    """The download URL of ``spec.filename`` from the simple index (its sha256 fragment checked)."""
    page = urljoin(index_url(), _normalise(spec.project) + "/")
    try:
        with urllib.request.urlopen(page, timeout=timeout) as response:
            html = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise BrickworkError(
            f"Could not read the package index page {page} ({exc}); {assets.NETWORK_NOTE}. {_manual_hint(spec)}"
        ) from exc
    for href in _LINK.findall(html):
        url = urljoin(page, unescape(href))
        if Path(urlsplit(url).path).name != spec.filename:
            continue
        fragment = urlsplit(url).fragment
        if fragment.startswith("sha256=") and fragment[7:] != spec.sha256:
            raise BrickworkError(
                f"The index {page} lists {spec.filename} with sha256 {fragment[7:]}, not the pinned "
                f"{spec.sha256}; refusing to use it. {_manual_hint(spec)}"
            )
        return url.split("#", 1)[0]
    raise BrickworkError(f"The index page {page} does not list {spec.filename}. {_manual_hint(spec)}")


def verify(spec: RegistryFile, path: Path) -> Path:
    """``path`` when it is the pinned file; a clear error otherwise."""
    return assets.verify_file(path, assets.Pin(spec.sha256), _manual_hint(spec), f"it is not {spec.filename}")


def download(spec: RegistryFile, into: Path, progress: bool = True, timeout: float = 600) -> Path:
    """Fetch ``spec`` into the directory ``into`` (verified, written under a temporary name, then renamed)."""
    pin = assets.Pin(spec.sha256)
    return assets.download(file_url(spec), into / spec.filename, pin, _manual_hint(spec), progress, timeout)
