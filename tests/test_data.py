from __future__ import annotations

import json

import pytest
import torch

from brickwork.data import iter_documents, token_windows
from brickwork.data.corpora import CORPORA, _clean_gutenberg, clean_wiki_markup, corpus_path
from brickwork.errors import BrickworkError


def test_windows_are_consecutive_non_overlapping_slices_of_the_stream(tokenizer, text_file):
    windows = token_windows(tokenizer, text_file, window=50)
    stream = []
    for document in iter_documents(text_file):
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert windows.shape[1] == 50
    assert windows.shape[0] == len(stream) // 50
    assert torch.equal(windows.flatten(), torch.tensor(stream[: windows.numel()]))


def test_max_tokens_stops_early(tokenizer, text_file):
    assert token_windows(tokenizer, text_file, window=40, max_tokens=130).shape == (3, 40)


def test_jsonl_source(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} " * 5}) for i in range(20)) + "\n")
    windows = token_windows(tokenizer, path, window=32)
    assert windows.shape[0] > 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(BrickworkError, match="bad.jsonl:2.*'text' field"):
        token_windows(tokenizer, bad, window=4)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(BrickworkError, match="broken.jsonl:1 is not valid JSON"):
        token_windows(tokenizer, broken, window=4)


def test_bad_sources(tmp_path, tokenizer, isolated_home):
    with pytest.raises(BrickworkError, match="neither a built-in corpus"):
        token_windows(tokenizer, "nope", window=8)
    with pytest.raises(BrickworkError, match="is a directory"):
        token_windows(tokenizer, tmp_path, window=8)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(BrickworkError, match="yields 0 window"):
        token_windows(tokenizer, empty, window=8)
    with pytest.raises(BrickworkError, match="smaller than one window"):
        token_windows(tokenizer, empty, window=8, max_tokens=4)
    with pytest.raises(BrickworkError, match="Unknown corpus 'x'"):
        corpus_path("x")
    with pytest.raises(BrickworkError, match="not prepared yet"):
        corpus_path("botchan")


def test_builtin_corpora_roles_are_disjoint():
    calibration = {c.member for c in CORPORA.values() if c.role == "calibration"}
    evaluation = {c.member for c in CORPORA.values() if c.role == "evaluation"}
    assert calibration and len(evaluation) >= 2 and not calibration & evaluation
    assert len({c.domain for c in CORPORA.values()}) == len(CORPORA)


def test_wiki_markup_is_stripped():
    markup = (
        "{{Infobox person|name=X|born={{birth date|1900|1|1}}}}\n'''Ada Lovelace''' was an English "
        "[[mathematician]] and [[Writer|writer]], chiefly known for her work on the [[Analytical Engine]] "
        "<ref>Some citation</ref> of [https://example.org Charles Babbage].\n\n"
        "[[Category:Mathematicians]]\n\n== Early life ==\n\n{| class=wikitable\n| a || b\n|}\n"
    )
    text = clean_wiki_markup(markup)
    assert text.startswith("Ada Lovelace was an English mathematician and writer, chiefly known")
    assert "Charles Babbage" in text
    for residue in ("{{", "[[", "<ref", "'''", "Category", "wikitable", "https"):
        assert residue not in text


def test_gutenberg_header_and_licence_are_removed():
    raw = (
        b"The Project Gutenberg EBook of X\nlicence text\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
        b"Chapter 1\nIt begins.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n"
    )
    assert _clean_gutenberg(raw) == "Chapter 1\nIt begins.\n"


class _BosTokenizer:
    """The tiny tokenizer as a Gemma-style one: every text starts with BOS unless special tokens are off."""

    def __init__(self, inner):
        self.inner, self.bos_token_id, self.eos_token_id = inner, 1, inner.eos_token_id

    def __call__(self, text, add_special_tokens=True):
        ids = self.inner(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}


def test_windows_start_with_bos_for_tokenizers_that_always_add_it(tokenizer, text_file):
    plain = token_windows(tokenizer, str(text_file), window=16)
    assert (plain[:, 0] != 1).any()  # the tiny tokenizer adds no BOS: windows are plain text
    bos = token_windows(_BosTokenizer(tokenizer), str(text_file), window=16)
    assert bos.shape[1] == 16 and (bos[:, 0] == 1).all()
    # the text after each BOS is the same stream, 15 tokens a window, in order
    assert torch.equal(bos[:, 1:].flatten()[:60], plain.flatten()[:60])
