"""The domain corpora: Debian packages fetched over HTTP (here from a local server), verified, read without dpkg."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import socket
import tarfile
from dataclasses import replace

import pytest

from brickwork.data import corpora
from brickwork.data.debian import ar_members, read_deb_member
from brickwork.data.doc_markup import clean_plain_book, clean_rst
from brickwork.data.sources import iter_documents
from brickwork.errors import BrickworkError

SOURCES = "usr/share/doc/python3.11/html/_sources/"
BOOK = "usr/share/debian-reference/debian-reference.en.txt.gz"

TUTORIAL_RST = """\
.. _tut-intro:

*****************
An Informal Intro
*****************

.. index::
   single: comment

Use :func:`~json.dumps` or the :keyword:`!for` statement; see :ref:`the tutorial <tut-for>`,
:pep:`8` and `the site <https://python.org>`_.  A literal: ``x = 1``. **Bold** text.

.. This comment is not text.
   Neither is this line.

Some code::

   >>> print("hi")
   hi

.. function:: dumps(obj, *, \\
                    indent=None)

   Serialize *obj*.

   .. versionadded:: 3.2
      The *indent* argument.

.. note::
   Mind the gap.
"""

BOOK_TEXT = """\
Debian Reference

Table of Contents

1. Tutorials
    1.1. Console basics

Chapter 1. Tutorials

    The shell\u00a0prompt is where you type commands.

    +-----------------+
    |command|meaning  |
    |-------+---------|
    |ls     |list     |
    +-----------------+
"""


def make_deb(files: dict[str, bytes], compression: str = "xz") -> bytes:
    """A minimal .deb: an ar archive of debian-binary, control.tar.xz and data.tar.<compression>."""

    def tar(members: dict[str, bytes], mode: str) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode=mode) as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(f"./{name}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    data_mode = {"xz": "w:xz", "gz": "w:gz", "zst": "w"}[compression]
    members = {
        "debian-binary": b"2.0\n",
        "control.tar.xz": tar({"control": b"Package: fake\n"}, "w:xz"),
        f"data.tar.{compression}": tar(files, data_mode),
    }
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out += header.encode() + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def serve(local_index, monkeypatch, name: str, deb: bytes, pinned: bytes | None = None) -> str:
    """Serve ``deb`` from the local server and pin corpus ``name`` to it (or to ``pinned``); return its URL."""
    filename = os.path.basename(corpora.CORPORA[name].url)
    (local_index / filename).write_bytes(deb)
    url = os.environ["PIP_INDEX_URL"].removesuffix("/simple") + "/" + filename
    pin = deb if pinned is None else pinned
    corpus = replace(
        corpora.CORPORA[name], url=url, archive_sha256=hashlib.sha256(pin).hexdigest(), archive_size=len(pin)
    )
    monkeypatch.setitem(corpora.CORPORA, name, corpus)
    return url


def fake_python_docs() -> bytes:
    return make_deb(
        {
            SOURCES + "tutorial/introduction.rst.txt": TUTORIAL_RST.encode(),
            SOURCES + "library/json.rst.txt": b"json\n====\n\nThe :mod:`json` module encodes.\n",
            SOURCES + "whatsnew/3.11.rst.txt": b"Release notes are left out.\n",
            SOURCES + "library/diagram.png": b"\x89PNG not text",
            "usr/share/doc/python3.11/html/index.html": b"<html>not a source</html>",
        }
    )


def test_ar_members_are_read_with_their_padding():
    deb = make_deb({"a.txt": b"odd"})
    members = ar_members(deb)
    assert list(members) == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    assert members["debian-binary"] == b"2.0\n"
    with pytest.raises(BrickworkError, match="not an ar archive"):
        ar_members(b"PK\x03\x04 a zip file")
    with pytest.raises(BrickworkError, match="cut short"):
        ar_members(deb[:-100])


def test_python_docs_is_prepared_on_first_use_from_a_served_deb(local_index, monkeypatch, isolated_home):
    deb = fake_python_docs()
    url = serve(local_index, monkeypatch, "python-docs", deb)
    path = corpora.corpus_path("python-docs")  # not prepared yet: downloads, verifies, extracts, cleans
    text = path.read_text()
    assert text.startswith("json\n\nThe json module encodes.\n\nAn Informal Intro\n\n")  # sorted path order
    assert "Release notes" not in text and "PNG" not in text and "<html>" not in text
    for kept in (
        "Use json.dumps or the for statement; see the tutorial,\nPEP 8 and the site.",
        "A literal: `x = 1`. Bold text.",
        'Some code:\n\n   >>> print("hi")\n   hi',
        "dumps(obj, *, indent=None)\n\n   Serialize *obj*.",
        "New in version 3.2.\n      The *indent* argument.",
        "Note:\n   Mind the gap.",
    ):
        assert kept in text
    for markup in (".. ", ":func:", "tut-intro", "single: comment", "comment is not", "****", "::"):
        assert markup not in text
    record = json.loads((path.parent / "python-docs.json").read_text())
    assert record["url"] == url and record["archive_sha256"] == hashlib.sha256(deb).hexdigest()
    assert record["role"] == "domain" and record["characters"] == len(text)
    assert (isolated_home / "archives" / os.path.basename(url)).read_bytes() == deb  # kept for a re-prepare
    assert "".join(iter_documents("python-docs")).startswith("json")  # a source name like the others
    (local_index / os.path.basename(url)).unlink()
    assert (
        corpora.prepare_corpora(["python-docs"], force=True, progress=False)["python-docs"].read_text()
        == text
    )


def test_debian_reference_is_read_from_a_gzip_data_tar(local_index, monkeypatch, isolated_home):
    deb = make_deb({BOOK: gzip.compress(BOOK_TEXT.encode())}, compression="gz")
    serve(local_index, monkeypatch, "debian-reference", deb)
    text = corpora.prepare_corpora(["debian-reference"], progress=False)["debian-reference"].read_text()
    assert text == (
        "Debian Reference\n\nChapter 1. Tutorials\n\nThe shell prompt is where you type commands.\n\n"
        "|command|meaning  |\n|ls     |list     |\n"
    )


def test_a_wrong_checksum_is_refused_and_leaves_nothing(local_index, monkeypatch, isolated_home):
    url = serve(local_index, monkeypatch, "python-docs", fake_python_docs(), pinned=b"another file")
    with pytest.raises(BrickworkError, match=f"{re.escape(url)} downloaded with sha256 .* not the pinned"):
        corpora.corpus_path("python-docs")
    assert not list((isolated_home / "archives").iterdir())
    assert not (isolated_home / "corpora" / "python-docs.txt").exists()
    # A wrong copy put there by hand is refused too, with what to do about it.
    (isolated_home / "archives" / os.path.basename(url)).write_bytes(b"not it")
    with pytest.raises(BrickworkError, match="not the pinned .* delete it"):
        corpora.corpus_path("python-docs")


def test_offline_the_error_names_the_url_and_where_a_hand_downloaded_copy_goes(monkeypatch, isolated_home):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    deb = fake_python_docs()
    url = f"http://127.0.0.1:{port}/python3.11-doc_3.11.2-6+deb12u8_all.deb"
    pin = {"archive_sha256": hashlib.sha256(deb).hexdigest(), "archive_size": len(deb)}
    corpus = replace(corpora.CORPORA["python-docs"], url=url, **pin)
    monkeypatch.setitem(corpora.CORPORA, "python-docs", corpus)
    copy = isolated_home / "archives" / "python3.11-doc_3.11.2-6+deb12u8_all.deb"
    with pytest.raises(BrickworkError) as error:
        corpora.corpus_path("python-docs")
    message = str(error.value)
    assert f"Downloading {url} failed" in message
    assert "snapshot.debian.org/binary/python3.11-doc/" in message and f"put it at {copy}" in message
    copy.write_bytes(deb)  # the hand-downloaded copy is used without the network
    assert "An Informal Intro" in corpora.corpus_path("python-docs").read_text()


def test_a_missing_version_says_what_to_do(local_index, monkeypatch, isolated_home):
    url = serve(local_index, monkeypatch, "debian-reference", b"unused")
    (local_index / os.path.basename(url)).unlink()  # the archive no longer serves this version
    with pytest.raises(
        BrickworkError, match=f"Downloading {re.escape(url)} failed .*404.*download .* by hand"
    ):
        corpora.corpus_path("debian-reference")


def test_unsupported_compression_and_missing_member_are_clear(local_index, monkeypatch, isolated_home):
    serve(local_index, monkeypatch, "debian-reference", make_deb({BOOK: b""}, compression="zst"))
    with pytest.raises(
        BrickworkError, match="holds data.tar.zst; brickwork reads data.tar.xz and data.tar.gz"
    ):
        corpora.corpus_path("debian-reference")
    deb = isolated_home / "other.deb"
    deb.write_bytes(make_deb({"usr/share/doc/other.txt": b"x"}))
    with pytest.raises(BrickworkError, match=f"{BOOK} is not a file in other.deb"):
        read_deb_member(deb, BOOK)


def test_setup_does_not_fetch_the_domain_corpora(monkeypatch, isolated_home, capsys):
    from brickwork.cli.main import main as cli

    def no_deb(corpus, progress):
        raise AssertionError(f"setup fetched the domain corpus {corpus.name}")

    monkeypatch.setattr(corpora, "_extract_deb", no_deb)
    monkeypatch.setattr(corpora, "_extract_pip", lambda corpus, archives, tmp: ("Some text.\n", "fake.whl"))
    assert cli(["setup", "--models", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "wiki" in printed and "botchan" in printed and "lee-news" in printed
    assert "python-docs" not in printed and "debian-reference" not in printed
    assert set(corpora.prepare_corpora(progress=False)) == set(corpora.SETUP_CORPORA)
    domain = {name for name, corpus in corpora.CORPORA.items() if corpus.role == "domain"}
    assert domain == {"python-docs", "debian-reference"} and not domain & set(corpora.SETUP_CORPORA)


def test_rst_and_book_cleaning_keep_code_and_prose():
    assert clean_rst("Title\n=====\n\n.. _label:\n\nText with :rfc:`7159` and |version|.\n") == (
        "Title\n\nText with RFC 7159 and version."
    )
    assert (
        clean_rst(".. code-block:: python\n\n   def f():\n       return 1\n")
        == "   def f():\n       return 1"
    )
    assert clean_plain_book("  a\n  b\n\n---\n\nList of Tables\n\n1. x\n\nc\n") == "a\nb\n\nc"
