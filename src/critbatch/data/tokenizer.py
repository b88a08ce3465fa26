"""Tokenizers: raw UTF-8 bytes (plus one end-of-text id), a byte-level BPE trained locally with HF
``tokenizers``, or a tokenizer people already have (a ``tokenizer.json``, or a local HF tokenizer
directory holding one). Nothing is downloaded."""

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
    cut_rule = "any"
    """Where a document may be cut into separately encoded segments (:mod:`critbatch.data.text`)."""

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

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
        self.cut_rule = cut_rule(tok)

    @staticmethod
    def untrained():
        """The byte-level BPE pipeline before training (the documents it trains on are cut by its rule)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Train on ``texts`` (documents, or segments of them cut by the untrained pipeline's rule:
        the same words, so the same merges), streamed."""
        from tokenizers import pre_tokenizers, trainers

        tok = cls.untrained()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        self._tok.save(str(path))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (encoded in parallel; without offsets where ``tokenizers`` can)."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encode(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {"kind": self.kind, "eot_id": self.eot_id, "file": "tokenizer.json"}


EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")


class FileTokenizer(BPETokenizer):
    """An existing ``tokenizer.json`` (HF ``tokenizers`` format), or a local tokenizer directory
    holding one. The end-of-text id between documents is ``eos_token`` if given, else the one
    ``tokenizer_config.json`` names, else the first of :data:`EOS_CANDIDATES` in the vocabulary."""

    kind = "file"

    def __init__(self, tok, eot_id: int, source: str):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = eot_id
        self.source = source
        self.cut_rule = cut_rule(tok)

    @classmethod
    def open(cls, path: str | Path, eos_token: str | None = None) -> "FileTokenizer":
        from tokenizers import Tokenizer

        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise DataError(f"tokenizer {str(path)!r} is neither a tokenizer.json nor a directory holding one "
                            f"(accepted: bytes, bpe, or such a local file; nothing is downloaded)")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise DataError(f"tokenizer {str(file)!r} cannot be read: {str(e).splitlines()[0] if str(e) else e}") from None
        name = eos_token or _configured_eos(file.parent)
        names = [name] if name else list(EOS_CANDIDATES)
        ids = [tok.token_to_id(n) for n in names]
        found = [(n, i) for n, i in zip(names, ids) if i is not None]
        if not found:
            raise DataError(f"tokenizer {str(file)!r} has no end-of-text token "
                            f"({', '.join(names)}): name one with --eos-token")
        return cls(tok, found[0][1], str(file))

    def save(self, path: Path) -> None:
        self._tok.save(str(path))

    def describe(self) -> dict:
        return {"kind": self.kind, "eot_id": self.eot_id, "file": "tokenizer.json", "source": self.source,
                "eot_token": self._tok.id_to_token(self.eot_id)}


def cut_rule(tok) -> str | None:
    """``"space"`` for a byte-level BPE whose tokens of a text are those of its pieces cut before a
    space or newline that follows a non-whitespace character: no normalizer, the GPT-2 byte-level
    pre-tokenizer (its regex starts a new word there), nothing added around a sequence, no added token
    that holds whitespace or strips it. Else ``None``: documents are encoded whole."""
    spec = json.loads(tok.to_str())
    pre, post = spec.get("pre_tokenizer") or {}, spec.get("post_processor")
    added_ok = all(not (a.get("lstrip") or a.get("rstrip") or a.get("single_word"))
                   and not any(c.isspace() for c in a.get("content", " ")) for a in spec.get("added_tokens") or [])
    ok = (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
          and pre.get("use_regex", True) and (post is None or post.get("type") == "ByteLevel") and added_ok)
    return "space" if ok else None


def _configured_eos(directory: Path) -> str | None:
    cfg = directory / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        eos = json.loads(cfg.read_text()).get("eos_token")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos


def load_tokenizer(data_dir: str | Path):
    """The tokenizer a prepared data directory was made with (``None`` for imported token files)."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    kind = meta["tokenizer"]["kind"]
    if kind == "bytes":
        return ByteTokenizer()
    if kind in ("bpe", "file"):
        return BPETokenizer.load(data_dir / meta["tokenizer"]["file"])
    if kind == "external":
        return None
    raise DataError(f"unknown tokenizer kind {kind!r} in {data_dir / 'meta.json'}")
