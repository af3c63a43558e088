"""Plain text from documentation sources, cleaned lightly: markup goes, prose and code stay.

- reStructuredText (Python's documentation): index entries, labels, comments and module metadata are dropped;
  roles and links keep their text (``:func:`~json.dumps``` gives ``json.dumps``), inline literals keep one
  backtick, object descriptions keep their signature, admonitions and version notes become a line of text, and
  literal blocks (the code) are kept with their indentation.
- Books rendered as plain text (Debian Reference, from DocBook): tables of contents, table borders and layout
  indentation are removed.
"""

from __future__ import annotations

import re
import textwrap

# Directives whose line and indented body carry no text: index entries, module metadata, tables of contents.
# fmt: off
_DROPPED_DIRECTIVES = {
    "index", "module", "moduleauthor", "sectionauthor", "toctree", "highlight", "currentmodule", "testsetup",
    "testcleanup", "raw", "include", "literalinclude", "image", "figure", "audit-event", "only", "tabularcolumns",
    "c:namespace", "c:namespace-push", "c:namespace-pop", "program", "role", "default-role", "cssclass",
    "rst-class", "contents", "sectnum", "meta",
}
# fmt: on
_ADMONITIONS = {
    "note": "Note:",
    "warning": "Warning:",
    "seealso": "See also:",
    "tip": "Tip:",
    "important": "Important:",
    "caution": "Caution:",
    "attention": "Attention:",
    "hint": "Hint:",
    "danger": "Danger:",
    "impl-detail": "CPython implementation detail:",
}
_VERSIONS = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}.",
    "deprecated": "Deprecated since version {}.",
    "deprecated-removed": "Deprecated since version {}.",
}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")  # comments, targets, footnotes, substitutions
_FOOTNOTE = re.compile(r"^(\s*)\.\.\s+\[[^\]]+\]\s*(.*)$")
_OPTION = re.compile(r"^\s+:[\w-]+:")
_ADORNMENT = re.compile(r"^([=\-*~^\"#+`'.:_])\1{2,}\s*$")
_INLINE = [
    (re.compile(r":rfc:`[^`<]*?<?(\d+)[^`]*`"), r"RFC \1"),
    (re.compile(r":pep:`[^`<]*?<?(\d+)[^`]*`"), r"PEP \1"),
    (re.compile(r":(?:[\w-]+:)*[\w-]+:`([^`<]*?)\s*<[^`>]*>`"), r"\1"),  # :ref:`text <target>` -> text
    (re.compile(r":(?:[\w-]+:)*[\w-]+:`[!~]?([^`]*)`"), r"\1"),  # :func:`~json.dumps` -> json.dumps
    (re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?"), r"\1"),  # `text <https://...>`_ -> text
    (re.compile(r"\s?\[(#[\w-]*|\d+)\]_"), ""),  # footnote references
    (re.compile(r"(?<![`\w])`([^`]+)`_{0,2}(?![`\w])"), r"\1"),  # default role and named references
    (re.compile(r"``([^`]+?)``"), r"`\1`"),  # inline literals keep one backtick, the common convention
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"\|(\w[\w -]*)\|_?"), r"\1"),  # substitution references
]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def clean_rst(text: str) -> str:
    """Prose and code of a reStructuredText source, markup removed lightly."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        directive = _DIRECTIVE.match(line)
        if directive or _EXPLICIT.match(line):
            indent = _indent(line)
            name, args = (directive.group(2), directive.group(3).strip()) if directive else ("", "")
            footnote = _FOOTNOTE.match(line)
            i += 1
            keep_body = bool(directive) and name not in _DROPPED_DIRECTIVES or bool(footnote)
            if not keep_body:  # skip the body too: everything blank or indented deeper
                while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
                    i += 1
                continue
            while args.endswith("\\") and i < len(lines):  # a signature continued on the next line
                args = args[:-1].rstrip() + " " + lines[i].strip()
                i += 1
            while i < len(lines) and _OPTION.match(lines[i]) and _indent(lines[i]) > indent:
                i += 1
            if footnote:
                out.append(footnote.group(1) + footnote.group(2))
            elif name in _ADMONITIONS:
                out.append(" " * indent + _ADMONITIONS[name] + (f" {args}" if args else ""))
            elif name in _VERSIONS:
                version, _, rest = args.partition(" ")
                out.append(" " * indent + _VERSIONS[name].format(version) + (f" {rest}" if rest else ""))
            elif args and name not in (
                "code-block",
                "sourcecode",
                "code",
                "doctest",
                "testcode",
                "testoutput",
            ):
                out.append(" " * indent + args)  # object descriptions: the signature
            continue
        i += 1
        if _ADORNMENT.match(line):
            continue
        if line.strip() == "::":
            continue
        if line.endswith("::"):
            line = line[:-3] + ":" if line.endswith(" ::") else line[:-1]
        out.append(line)
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", "\n".join(out)):
        for pattern, replacement in _INLINE:  # per paragraph: a role may span lines, never paragraphs
            paragraph = pattern.sub(replacement, paragraph)
        if paragraph.strip():
            paragraphs.append(paragraph.strip("\n"))
    return "\n\n".join(paragraphs)


_CONTENTS = {"Table of Contents", "List of Tables", "List of Figures", "List of Examples"}
_RULE = re.compile(r"^\s*(?:[+|][-=+|]*[-=][-=+|]*|-{3,})\s*$")  # table borders and horizontal rules


def clean_plain_book(text: str) -> str:
    """The text of a book rendered as plain text (DocBook's text output): tables of contents, table borders and
    layout indentation removed, paragraphs kept."""
    lines = text.replace("\u00a0", " ").splitlines()
    out = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        if line in _CONTENTS:
            while i < len(lines) and not lines[i].strip():
                i += 1
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        if not _RULE.match(line):
            out.append(line)
    paragraphs = re.split(r"\n\s*\n", "\n".join(out))
    return "\n\n".join(textwrap.dedent(p).strip("\n") for p in paragraphs if p.strip())
