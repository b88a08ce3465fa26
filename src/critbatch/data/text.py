"""Text for ``prepare``, streamed: documents are read a piece at a time and cut into segments that
the tokenizer encodes exactly as it would the whole document, so memory holds a few segments, not
the corpus.

* A text file is one document (read :data:`READ_CHARS` characters at a time); a JSON line is one
  document; so is a row of a parquet/arrow file. Empty documents are dropped.
* Where a document may be cut depends on the tokenizer (its ``cut_rule``): ``"any"`` (UTF-8 bytes:
  anywhere), ``"space"`` (byte-level BPE: just before a space or newline that follows a
  non-whitespace character, where its pre-tokenizer always starts a new word, so the segments'
  tokens are the document's tokens), ``None`` (other tokenizers: never; a document is encoded whole).
"""

from __future__ import annotations

import gzip
import json
import lzma
import re
import zlib
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DataError
from .sources import columnar_documents, is_hf_dataset_dir

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc")
JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz", ".ndjson")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")
TOKEN_SUFFIXES = (".bin", ".npy")
READ_CHARS = 1 << 20
"""Characters read from a text file at a time."""

# the last / first place where a byte-level BPE may cut: a non-whitespace character followed by a
# space or newline (U+180E counted as whitespace: older Unicode tables call it one)
_LAST_CUT = re.compile(r"(?s:.*)[^\s\u180e](?=[ \n])")
_FIRST_CUT = re.compile(r"[^\s\u180e](?=[ \n])")
_READ_ERRORS = (UnicodeDecodeError, EOFError, lzma.LZMAError, gzip.BadGzipFile, zlib.error)


def suffix(p: Path) -> str:
    name = p.name.lower()
    for s in JSONL_SUFFIXES + TEXT_SUFFIXES + TOKEN_SUFFIXES + COLUMNAR_SUFFIXES:
        if name.endswith(s):
            return s
    return p.suffix.lower()


def open_text(p: Path):
    name = p.name.lower()
    if name.endswith(".xz"):
        return lzma.open(p, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(p, "rt", encoding="utf-8")
    return open(p, encoding="utf-8")


def text_kind(p: Path, as_text: bool = False) -> str:
    """``text``, ``jsonl`` or ``columnar`` (also a datasets directory); ``as_text``: every file is text."""
    if is_hf_dataset_dir(p):
        return "columnar"
    if as_text:
        return "text"
    suf = suffix(p)
    for kind, sufs in (("jsonl", JSONL_SUFFIXES), ("text", TEXT_SUFFIXES), ("columnar", COLUMNAR_SUFFIXES)):
        if suf in sufs:
            return kind
    raise DataError(f"input {str(p)!r} has an unknown type; accepted: text ({', '.join(TEXT_SUFFIXES)}), JSON lines "
                    f"({', '.join(JSONL_SUFFIXES)}), parquet/arrow, a datasets directory or token files "
                    f"({', '.join(TOKEN_SUFFIXES)}); pass --text to read every input as plain text")


def _unreadable(p: Path, as_what: str, e: Exception) -> DataError:
    return DataError(f"{p} cannot be read as {as_what} text: {type(e).__name__}")


def _text_pieces(p: Path) -> Iterator[str]:
    try:
        with open_text(p) as f:
            while piece := f.read(READ_CHARS):
                yield piece
    except _READ_ERRORS as e:
        raise _unreadable(p, suffix(p), e) from None


def _jsonl_docs(p: Path, text_field: str) -> Iterator[str]:
    try:
        with open_text(p) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{p}:{i} is not valid JSON") from None
                if not isinstance(rec, dict) or text_field not in rec:
                    raise DataError(f"{p}:{i} has no {text_field!r} field; pass --text-field NAME")
                if not isinstance(rec[text_field], str):
                    raise DataError(f"{p}:{i} field {text_field!r} is not a string")
                if rec[text_field]:
                    yield rec[text_field]
    except _READ_ERRORS as e:
        raise _unreadable(p, suffix(p), e) from None


def documents(paths: Iterable[Path], text_field: str = "text", as_text: bool = False) -> Iterator[Iterator[str]]:
    """Every non-empty document of the inputs, in order, each as an iterator of text pieces (read it
    before asking for the next document)."""
    for p in paths:
        if not (p.is_file() or is_hf_dataset_dir(p)):
            raise DataError(f"input file {str(p)!r} does not exist")
        kind = text_kind(p, as_text)
        if kind == "text":
            pieces = _text_pieces(p)
            first = next(pieces, "")
            if first:
                yield _chain(first, pieces)
            continue
        docs = _jsonl_docs(p, text_field) if kind == "jsonl" else columnar_documents(p, text_field)
        for d in docs:
            yield iter((d,))


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def count_documents(paths: list[Path], text_field: str = "text", as_text: bool = False) -> int:
    """How many documents :func:`documents` gives (reading JSON lines and columnar files; an
    uncompressed text file counts without being read)."""
    n = 0
    for p in paths:
        if p.is_file() and text_kind(p, as_text) == "text" and not p.name.lower().endswith((".gz", ".xz")):
            n += p.stat().st_size > 0
        else:
            n += sum(1 for doc in documents([p], text_field, as_text) for _ in [_drain(doc)])
    return n


def _drain(pieces: Iterator[str]) -> int:
    return sum(len(x) for x in pieces)


def tail_cuts(paths: list[Path], text_field: str, as_text: bool, holdout_fraction: float) -> list[int]:
    """Where each document's held-out tail starts when whole documents cannot be held out: at
    ``1 - holdout_fraction`` of its characters, moved back to just after a newline if one lies within
    the last tenth before that point. Two reads of every document (its length, then the newline)."""
    lengths = [_drain(doc) for doc in documents(paths, text_field, as_text)]
    cuts = []
    for n, doc in zip(lengths, documents(paths, text_field, as_text)):
        cut, nl, pos = int(n * (1 - holdout_fraction)), -1, 0
        for piece in doc:
            if pos >= cut:
                break
            j = piece.rfind("\n", 0, cut - pos)
            nl = pos + j if j >= 0 else nl
            pos += len(piece)
        cuts.append(nl + 1 if nl > cut * 0.9 else cut)
    return cuts


class CutAt:
    """A document's pieces split at character ``at``: :meth:`head` then :meth:`tail`, read in that order."""

    def __init__(self, pieces: Iterator[str], at: int):
        self.pieces, self.at, self.rest = pieces, at, ""

    def head(self) -> Iterator[str]:
        pos = 0
        for piece in self.pieces:
            if pos + len(piece) >= self.at:
                if self.at > pos:
                    yield piece[: self.at - pos]
                self.rest = piece[self.at - pos:]
                return
            pos += len(piece)
            yield piece

    def tail(self) -> Iterator[str]:
        if self.rest:
            yield self.rest
        yield from self.pieces


def _cut(buf: str, size: int, rule: str, scanned: int) -> int | None:
    """Where to cut a segment of at most ``size`` characters off ``buf`` (longer than ``size``); the
    first cut after ``size`` if there is none before; ``None`` if ``buf`` has no cut after ``scanned``."""
    if rule == "any":
        return size
    if not scanned:
        m = _LAST_CUT.match(buf, 0, size + 1)
        if m:
            return m.end()
    m = _FIRST_CUT.search(buf, max(size, scanned))
    return m.end() if m else None


def segments(pieces: Iterable[str], size: int, rule: str | None) -> Iterator[str]:
    """A document's text as segments of about ``size`` characters, cut only where ``rule`` allows
    (see the module's docstring); a document with no such place is one segment."""
    if rule is None:
        whole = "".join(pieces)
        if whole:
            yield whole
        return
    buf, scanned = "", 0
    for piece in pieces:
        buf += piece
        while len(buf) > size:
            cut = _cut(buf, size, rule, scanned)
            if cut is None:
                scanned = max(len(buf) - 1, 1)
                break
            yield buf[:cut]
            buf, scanned = buf[cut:], 0
    if buf:
        yield buf
