"""Text to token shards, streamed (``prepare``'s text path): which documents are held out, the
segments a BPE trains on, and the tokenization of every document into the two splits' shards, a
batch of segments at a time (encoded in parallel while the next batch is read).

Memory holds about two batches of :data:`BATCH_CHARS` characters, whatever the corpus size (and a
document whole where its tokenizer cannot cut it, :mod:`critbatch.data.text`). The tokens are those
of encoding every document whole: the held-out choice is the same seeded choice of whole documents
(a first pass counts them), and segments are cut only where the tokenizer's result does not change.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError
from .text import CutAt, count_documents, documents, segments, tail_cuts

SEGMENT_CHARS = 1 << 16
"""Characters of a segment (cut where the tokenizer allows, so about this many)."""
BATCH_CHARS = 1 << 20
"""Characters encoded at once (the segments of a batch are encoded in parallel)."""


class ShardWriter:
    """A split written as shards of at most ``shard_tokens`` tokens, appended as they come; its
    meta entry (tokens, shards with their sha256, the largest id) from :meth:`close`."""

    def __init__(self, out: Path, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shards: list[dict] = []
        self.total, self.max_id = 0, None
        self.f = self.h = None
        self.n = 0

    def _close_shard(self) -> None:
        if self.f is not None:
            self.f.close()
            self.shards[-1].update(tokens=self.n, sha256=self.h.hexdigest())
        self.f = self.h = None
        self.n = 0

    def append(self, a: np.ndarray) -> None:
        a = np.asarray(a)
        if a.size:
            hi = int(a.max())
            self.max_id = hi if self.max_id is None else max(self.max_id, hi)
        while a.size:
            if self.f is None:
                name = f"{self.split}_{len(self.shards):03d}.bin"
                self.shards.append({"file": name})
                self.f, self.h = open(self.out / name, "wb"), hashlib.sha256()
            take = min(a.size, self.shard_tokens - self.n)
            data = np.ascontiguousarray(a[:take], dtype=self.dtype).tobytes()
            self.f.write(data)
            self.h.update(data)
            self.n += take
            self.total += take
            a = a[take:]
            if self.n == self.shard_tokens:
                self._close_shard()

    def close(self) -> dict:
        self._close_shard()
        return {"tokens": int(self.total), "shards": self.shards, "max_id": self.max_id}


@dataclass
class Holdout:
    """Which text is held out: the documents of ``val_paths``; else a seeded choice of whole
    documents (``val_docs``, a mask); else, with too few documents, the tail of each from ``cuts``."""

    paths: list[Path]
    text_field: str
    as_text: bool
    val_paths: list[Path]
    val_docs: np.ndarray | None = None
    cuts: list[int] | None = None

    def routed(self) -> Iterator[tuple[str, Iterator[str]]]:
        """(split, the document's pieces) for every document (or part of one), in order."""
        docs = documents(self.paths, self.text_field, self.as_text)
        if self.val_paths:
            yield from (("train", d) for d in docs)
            yield from (("val", d) for d in documents(self.val_paths, self.text_field, self.as_text))
        elif self.cuts is not None:
            for d, cut in zip(docs, self.cuts):
                part = CutAt(d, cut)
                yield "train", part.head()
                yield "val", part.tail()
        else:
            for i, d in enumerate(docs):
                if i >= len(self.val_docs):
                    raise DataError("the inputs changed while they were read; prepare again")
                yield ("val" if self.val_docs[i] else "train"), d

    def train_texts(self, rule: str | None) -> Iterator[str]:
        """The training documents as segments (what a BPE trains on)."""
        for split, pieces in self.routed():
            if split == "train":
                yield from segments(pieces, SEGMENT_CHARS, rule)


def holdout(paths: list[Path], val_paths: list[Path], text_field: str, as_text: bool, fraction: float,
            seed: int) -> Holdout:
    """The held-out choice: ``fraction`` of the documents (at least one), a seeded choice of whole
    ones; the tail of every document when there is one document or fewer than ``1 / fraction``."""
    plan = Holdout(paths, text_field, as_text, val_paths)
    if val_paths:
        for what, ps in (("inputs", paths), ("held-out files", val_paths)):
            if next(documents(ps, text_field, as_text), None) is None:
                raise DataError(f"the {what} hold no text")
        return plan
    n = count_documents(paths, text_field, as_text)
    if n == 0:
        raise DataError("the inputs hold no text")
    if n == 1 or n * fraction < 1:
        plan.cuts = tail_cuts(paths, text_field, as_text, fraction)
        return plan
    n_val = max(1, round(n * fraction))
    plan.val_docs = np.zeros(n, dtype=bool)
    plan.val_docs[np.random.default_rng(seed).choice(n, size=n_val, replace=False)] = True
    return plan


def encode_splits(tok, plan: Holdout, writers: dict[str, ShardWriter]) -> dict[str, int]:
    """Tokenize every document into its split's writer, each followed by the end-of-text id (a
    batch encodes in a second thread while the next is read); returns the documents per split."""
    docs = {"train": 0, "val": 0}
    batch: list[tuple[str, str, bool]] = []  # (split, segment, ends its document)
    chars = 0
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for split, pieces in plan.routed():
            segs = segments(pieces, SEGMENT_CHARS, tok.cut_rule)
            prev = next(segs, None)
            if prev is None:
                continue
            docs[split] += 1
            for s in chain(segs, [None]):  # each segment, knowing whether it is the last
                batch.append((split, prev, s is None))
                chars += len(prev)
                prev = s
                if chars >= BATCH_CHARS:
                    pending = _flush(pool, pending, tok, batch, writers)
                    batch, chars = [], 0
        pending = _flush(pool, pending, tok, batch, writers)
        _write(pending, writers)
    return docs


def _flush(pool, pending, tok, batch, writers):
    """Start encoding ``batch``; write the one before it (already encoded) meanwhile."""
    fut = pool.submit(_encode, tok, batch) if batch else None
    _write(pending, writers)
    return fut


def _encode(tok, batch: list[tuple[str, str, bool]]) -> dict[str, np.ndarray]:
    ids = tok.encode_batch([s for _, s, _ in batch])
    eot = np.array([tok.eot_id], dtype=ids[0].dtype)  # one dtype: concatenating does not widen
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for (split, _, ends), a in zip(batch, ids):
        parts[split].append(a)
        if ends:
            parts[split].append(eot)
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def _write(pending, writers) -> None:
    if pending is not None:
        for split, a in pending.result().items():
            writers[split].append(a)
