"""Tokenizers: raw UTF-8 bytes (plus one end-of-text id) or a byte-level BPE trained locally with
HF ``tokenizers``. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import DataError

EOT = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes 0..255 and end-of-text id 256 (vocabulary 257)."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_docs(self, docs: Iterable[str]) -> list[np.ndarray]:
        return [self.encode(d) for d in docs]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": self.kind, "eot_id": self.eot_id}


class BPETokenizer:
    """Byte-level BPE (HF ``tokenizers``) with ``<|endoftext|>`` as a special token."""

    kind = "bpe"

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)

    @classmethod
    def train(cls, docs: list[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(docs, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        self._tok.save(str(path))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)

    def encode_docs(self, docs: Iterable[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(list(docs))]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {"kind": self.kind, "eot_id": self.eot_id, "file": "tokenizer.json"}


def load_tokenizer(data_dir: str | Path):
    """The tokenizer a prepared data directory was made with (``None`` for imported token files)."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    kind = meta["tokenizer"]["kind"]
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.load(data_dir / meta["tokenizer"]["file"])
    if kind == "external":
        return None
    raise DataError(f"unknown tokenizer kind {kind!r} in {data_dir / 'meta.json'}")
