"""Text sources and token windows.

A *source* is one of:

- the name of a built-in corpus (``wiki``, ``botchan``, ``lee-news``; see :mod:`brickwork.data.corpora`);
- a local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file (one JSON object per line
  with a ``text`` field);
- ``hf:<dataset>[:<config>][:<split>]``, a Hugging Face ``datasets`` name (needs network access and the
  ``datasets`` package; the ``text`` column is read, streaming).

Token windows protocol: documents are tokenised without special tokens, joined by the tokenizer's EOS
token when it has one (else by a blank line's tokens), and the resulting stream is cut into consecutive,
non-overlapping windows of exactly ``window`` tokens; a final partial window is dropped. Tokenizers that start
every text with BOS (:func:`window_prefix`) get it as each window's first token, then ``window - 1`` text
tokens. Reading stops once ``max_tokens`` tokens have been produced, so only as much text is tokenised as is
needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from brickwork.errors import BrickworkError

_CHUNK_CHARS = 1 << 16  # group paragraphs into ~64 KB documents so tokenisation is batched


# Text in which more than this share of characters are U+FFFD (what a lossy decode leaves) is not text.
_MAX_REPLACEMENT_SHARE = 0.01


def _bad_text(path: Path, problem: str) -> BrickworkError:
    return BrickworkError(f"{path} is not UTF-8 text ({problem}); pass a UTF-8 .txt or .jsonl file")


def check_text_file(path: Path) -> None:
    """Refuse a file that is not valid UTF-8, holds NUL bytes or is mostly replacement characters."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, replaced, characters = 0, 0, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise _bad_text(path, f"invalid byte at offset {offset + exc.start}") from exc
            if "\x00" in text:
                raise _bad_text(path, "it holds NUL bytes: a binary file")
            replaced += text.count("\ufffd")
            characters += len(text)
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise _bad_text(path, "it ends inside a character") from exc
    if characters and replaced / characters > _MAX_REPLACEMENT_SHARE:
        raise _bad_text(path, f"{replaced / characters:.0%} of it is replacement characters")


def iter_text_file(path: Path) -> Iterator[str]:
    """Paragraph groups of a plain-text file, about 64 KB each."""
    check_text_file(path)
    buffer: list[str] = []
    size = 0
    with open(path, encoding="utf-8") as handle:
        paragraph: list[str] = []
        for line in handle:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
                continue
            if paragraph:
                text = "\n".join(paragraph)
                buffer.append(text)
                size += len(text)
                paragraph = []
            if size >= _CHUNK_CHARS:
                yield "\n\n".join(buffer)
                buffer, size = [], 0
        if paragraph:
            buffer.append("\n".join(paragraph))
    if buffer:
        yield "\n\n".join(buffer)


def _iter_jsonl(path: Path) -> Iterator[str]:
    check_text_file(path)
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BrickworkError(f"{path}:{number} is not valid JSON ({exc.msg}).") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise BrickworkError(
                    f"{path}:{number}: each line must be a JSON object with a string 'text' field."
                )
            yield record["text"]


def _iter_hf(spec: str) -> Iterator[str]:
    parts = spec[3:].split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError as exc:
        raise BrickworkError(
            "Reading 'hf:' sources needs the `datasets` package: pip install datasets"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types; the user needs the message, not the class
        raise BrickworkError(
            f"Could not open dataset '{name}' (config {config}, split {split}): {exc}"
        ) from exc
    for row in dataset:
        text = row.get("text")
        if text is None:
            raise BrickworkError(f"Dataset '{name}' has no 'text' column (columns: {sorted(row)}).")
        if text.strip():
            yield text


def check_source(source: str | Path) -> None:
    """Everything about ``source`` that can be checked before a model is loaded: that it names a built-in corpus,
    an ``hf:`` dataset, or an existing UTF-8 text file (a BrickworkError naming the problem otherwise)."""
    from brickwork.data.corpora import CORPORA

    text = str(source)
    if text.startswith("hf:"):
        if not text[3:].split(":")[0]:
            raise BrickworkError(f"'{text}' names no dataset; use hf:<dataset>[:<config>][:<split>]")
        return
    if text in CORPORA:
        return
    check_text_file(_existing_file(text))


def _existing_file(text: str) -> Path:
    """``text`` as the path of an existing file (a BrickworkError saying what to pass otherwise)."""
    from brickwork.data.corpora import CORPORA

    path = Path(text).expanduser()
    if not path.exists():
        raise BrickworkError(
            f"'{text}' is neither a built-in corpus ({', '.join(CORPORA)}) nor an existing file. "
            "Pass a built-in name, a .txt/.jsonl file, or 'hf:<dataset>[:<config>][:<split>]'."
        )
    if path.is_dir():
        raise BrickworkError(f"{path} is a directory; pass a .txt or .jsonl file.")
    return path


def iter_documents(source: str | Path) -> Iterator[str]:
    """The documents of ``source`` (see the module docstring for what a source can be)."""
    from brickwork.data.corpora import CORPORA, iter_corpus_documents

    text = str(source)
    if text.startswith("hf:"):
        return _iter_hf(text)
    if text in CORPORA:
        return iter_corpus_documents(text)
    path = _existing_file(text)  # the readers check the text itself
    return _iter_jsonl(path) if path.suffix == ".jsonl" else iter_text_file(path)


def describe_source(source: str | Path) -> str:
    """A stable, human-readable name of a source, for provenance records."""
    from brickwork.data.corpora import CORPORA

    text = str(source)
    return text if text in CORPORA or text.startswith("hf:") else str(Path(text).expanduser().resolve())


def window_prefix(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer itself starts every text with its BOS token (Gemma, Llama 2/3), else ``[]``.

    Models trained that way score text without it far worse (Gemma 3 270M: perplexity 113 against 32 on the
    first botchan window), so each window then starts with BOS; tokenizers that add nothing (SmolLM2, Qwen2.5,
    GPT-2) keep windows of plain text.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


def _separator_ids(tokenizer) -> list[int]:
    if tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return tokenizer("\n\n", add_special_tokens=False)["input_ids"]


def iter_token_windows(
    tokenizer, source: str | Path, window: int, max_tokens: int | None = None
) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping windows of ``window`` token ids (1-D int64 tensors) from ``source``."""
    if window < 2:
        raise BrickworkError(f"window must be at least 2 tokens, got {window}")
    separator = _separator_ids(tokenizer)
    prefix = window_prefix(tokenizer)
    take = window - len(prefix)  # text tokens per window
    buffer: list[int] = []
    produced = 0
    for document in iter_documents(source):
        buffer.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        buffer.extend(separator)
        while len(buffer) >= take:
            if max_tokens is not None and produced + window > max_tokens:
                return
            yield torch.tensor(prefix + buffer[:take], dtype=torch.long)
            del buffer[:take]
            produced += window


def token_windows(
    tokenizer, source: str | Path, window: int = 512, max_tokens: int | None = None, min_windows: int = 1
) -> torch.Tensor:
    """All windows of ``source`` as one ``[N, window]`` tensor; a clear error when there are too few."""
    if max_tokens is not None and max_tokens < window:
        raise BrickworkError(
            f"max_tokens={max_tokens} is smaller than one window of {window} tokens; "
            "raise it or use a smaller window."
        )
    windows = list(iter_token_windows(tokenizer, source, window, max_tokens))
    if len(windows) < min_windows:
        raise BrickworkError(
            f"Source '{source}' yields {len(windows)} window(s) of {window} tokens, fewer than the {min_windows} "
            "needed: give more text or a smaller window."
        )
    return torch.stack(windows)
