"""``critbatch prepare``: text (embedded corpus, text files, JSON lines) or existing token files
(nanoGPT headerless uint16 ``.bin``, ``.npy``) -> token shards + ``meta.json``.

Layout of a data directory::

    meta.json            dtype, vocab size, tokenizer, token counts, sha256 of every shard
    tokenizer.json       the BPE (only for --tokenizer bpe)
    train_000.bin ...    headerless little-endian token arrays (training split)
    val_000.bin ...      the held-out split; training never reads it

Text is split into the held-out set by whole documents (a seeded choice); a single document or
imported token files are split by their tail. The directory is written to a temporary sibling and
renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np

from ..config import option
from ..errors import ConfigError, DataError
from ..io import public_mode
from .tokenizer import BPETokenizer, ByteTokenizer

FORMAT = "critbatch-tokens-v1"
EMBEDDED_CORPORA = ("sotu", "shakespeare")
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz", ".ndjson")
TOKEN_SUFFIXES = (".bin", ".npy")
DEFAULT_SHARD_TOKENS = 1 << 28  # 268M tokens per shard


def _suffix(p: Path) -> str:
    name = p.name.lower()
    for s in JSONL_SUFFIXES + TEXT_SUFFIXES + TOKEN_SUFFIXES:
        if name.endswith(s):
            return s
    return p.suffix.lower()


def _open_text(p: Path):
    name = p.name.lower()
    if name.endswith(".xz"):
        return lzma.open(p, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(p, "rt", encoding="utf-8")
    return open(p, encoding="utf-8")


def _read_jsonl(p: Path, text_field: str) -> list[str]:
    docs = []
    with _open_text(p) as f:
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
            docs.append(rec[text_field])
    return docs


def embedded_corpus_path(name: str) -> Path:
    if name not in EMBEDDED_CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; accepted: {', '.join(EMBEDDED_CORPORA)}")
    return Path(str(resources.files("critbatch") / "corpora" / f"{name}.jsonl.xz"))


def read_documents(paths: Iterable[str | Path], text_field: str = "text") -> list[str]:
    docs: list[str] = []
    for raw in paths:
        p = Path(raw)
        if not p.is_file():
            raise DataError(f"input file {str(p)!r} does not exist")
        suf = _suffix(p)
        if suf in JSONL_SUFFIXES:
            docs.extend(_read_jsonl(p, text_field))
        elif suf in TEXT_SUFFIXES:
            with _open_text(p) as f:
                docs.append(f.read())
        else:
            raise DataError(f"input {str(p)!r} has an unknown type; accepted: text ({', '.join(TEXT_SUFFIXES)}), "
                            f"JSON lines ({', '.join(JSONL_SUFFIXES)}) or token files ({', '.join(TOKEN_SUFFIXES)})")
    docs = [d for d in docs if d]
    if not docs:
        raise DataError("the inputs hold no text")
    return docs


def _read_token_file(p: Path) -> np.ndarray:
    if not p.is_file():
        raise DataError(f"input file {str(p)!r} does not exist")
    if _suffix(p) == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{p} is not a readable .npy array: {e}") from None
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"{p} must hold a 1-D integer array of token ids (got {arr.dtype} with shape {arr.shape})")
        return np.asarray(arr)
    size = p.stat().st_size
    if size % 2:
        raise DataError(f"{p} has an odd number of bytes ({size}); a nanoGPT .bin holds headerless uint16 tokens")
    return np.memmap(p, dtype=np.uint16, mode="r")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_split(out: Path, split: str, arrays: Iterable[np.ndarray], dtype, shard_tokens: int) -> dict:
    """Write a split as shards of at most ``shard_tokens`` tokens; returns its meta entry."""
    shards, buf, buf_n, total = [], [], 0, 0

    def flush():
        nonlocal buf, buf_n
        if not buf_n:
            return
        name = f"{split}_{len(shards):03d}.bin"
        arr = np.concatenate(buf).astype(dtype, copy=False)
        arr.tofile(out / name)
        shards.append({"file": name, "tokens": int(arr.size), "sha256": _sha256(out / name)})
        buf, buf_n = [], 0

    for a in arrays:
        a = np.asarray(a)
        while a.size:
            take = min(a.size, shard_tokens - buf_n)
            buf.append(a[:take])
            buf_n += take
            total += take
            a = a[take:]
            if buf_n == shard_tokens:
                flush()
    flush()
    return {"tokens": int(total), "shards": shards}


def _split_docs(docs: list[str], holdout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if len(docs) == 1 or len(docs) * holdout_fraction < 1:
        # Too few documents to hold out whole ones: hold out the tail of every document's text.
        train, val = [], []
        for d in docs:
            cut = int(len(d) * (1 - holdout_fraction))
            nl = d.rfind("\n", 0, cut)
            cut = nl + 1 if nl > cut * 0.9 else cut
            train.append(d[:cut])
            val.append(d[cut:])
        return [t for t in train if t], [v for v in val if v]
    n_val = max(1, round(len(docs) * holdout_fraction))
    rng = np.random.default_rng(seed)
    val_idx = set(rng.choice(len(docs), size=n_val, replace=False).tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


@dataclass
class PrepareConfig:
    """Text or token files (or an embedded corpus) to a token data directory."""

    out: str
    """The data directory to create."""
    inputs: list[str] = option(default_factory=list, positional="*")
    """Text (.txt/.md), JSON lines (.jsonl[.xz|.gz]) or token files (.bin uint16, .npy); none: the
    embedded ``corpus``."""
    corpus: str = "sotu"
    """The embedded corpus when no inputs are given: ``sotu`` or ``shakespeare``."""
    tokenizer: str = option("bytes", choices=("bytes", "bpe"))
    """``bytes`` (UTF-8 bytes + end-of-text) or ``bpe`` (a byte-level BPE trained here)."""
    vocab_size: int | None = None
    """The BPE's vocabulary (default 8192), or the vocabulary of token files (default: largest id + 1)."""
    holdout_fraction: float = 0.05
    """Share of the documents held out for evaluation."""
    seed: int = 0
    """Seed of the held-out document choice."""
    text_field: str = "text"
    """The field holding the text in JSON lines."""


def prepare_config(cfg: PrepareConfig, quiet: bool = False) -> Path:
    """:func:`prepare` from a :class:`PrepareConfig` (the command line's)."""
    return prepare(cfg.out, cfg.inputs or None, corpus=cfg.corpus if not cfg.inputs else None,
                   tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, holdout_fraction=cfg.holdout_fraction,
                   seed=cfg.seed, text_field=cfg.text_field, quiet=quiet)


def _check_args(corpus, inputs, tokenizer, holdout_fraction, shard_tokens, vocab_size) -> None:
    if (corpus is None) == (not inputs):
        raise ConfigError("give either --corpus NAME or input files, not both and not neither")
    if tokenizer not in ("bytes", "bpe"):
        raise ConfigError(f"tokenizer {tokenizer!r} is not one of bytes, bpe")
    if not 0 < holdout_fraction < 0.5:
        raise ConfigError(f"holdout fraction {holdout_fraction} must be in (0, 0.5)")
    if shard_tokens <= 0:
        raise ConfigError(f"shard_tokens={shard_tokens} must be positive")
    if vocab_size is not None and vocab_size <= 0:
        raise ConfigError(f"vocab size {vocab_size} must be positive")
    if tokenizer == "bpe" and vocab_size is not None and vocab_size < 257:
        raise ConfigError(f"BPE vocab size {vocab_size} must be at least 257 (256 bytes + end-of-text)")


def _existing(out: Path, recipe: dict) -> bool:
    """True if ``out`` already holds this preparation; an error if it holds something else."""
    if not out.exists():
        return False
    meta_p = out / "meta.json"
    if meta_p.is_file():
        try:
            existing = json.loads(meta_p.read_text())
        except json.JSONDecodeError:
            existing = {}
        if existing.get("recipe") == recipe:
            return True
        raise DataError(f"{out} already holds different data; choose another --out or remove it")
    if any(out.iterdir()):
        raise DataError(f"{out} exists and is not an empty data directory; choose another --out")
    return False


def _token_arrays(paths: list[Path], vocab_size: int | None, holdout_fraction: float):
    """Imported token files: (train arrays, val arrays, dtype, vocabulary, tokenizer meta, documents)."""
    arr = np.concatenate([np.asarray(_read_token_file(p)) for p in paths])
    if arr.size < 4:
        raise DataError("the token files hold fewer than 4 tokens")
    top = int(arr.max())
    vs = vocab_size if vocab_size is not None else top + 1
    if top >= vs:
        raise DataError(f"token id {top} is outside the vocabulary size {vs}; pass a larger --vocab-size")
    cut = int(arr.size * (1 - holdout_fraction))
    return [arr[:cut]], [arr[cut:]], _dtype_for(vs), vs, {"kind": "external", "eot_id": None}, {"train": None, "val": None}


def _text_arrays(paths: list[Path], tokenizer: str, vocab_size: int | None, holdout_fraction: float, seed: int,
                 text_field: str, tmp: Path):
    """Text: documents split by whole documents, tokenized, each followed by end-of-text (sequences
    are packed across documents)."""
    docs = read_documents(paths, text_field)
    train_docs, val_docs = _split_docs(docs, holdout_fraction, seed)
    if tokenizer == "bytes":
        tok = ByteTokenizer()
    else:
        tok = BPETokenizer.train(train_docs, vocab_size or 8192)
        tok.save(tmp / "tokenizer.json")
    eot = np.array([tok.eot_id], dtype=np.int64)
    train_arrays = (np.concatenate([a, eot]) for a in tok.encode_docs(train_docs))
    val_arrays = (np.concatenate([a, eot]) for a in tok.encode_docs(val_docs))
    return (train_arrays, val_arrays, _dtype_for(tok.vocab_size), tok.vocab_size, tok.describe(),
            {"train": len(train_docs), "val": len(val_docs)})


def _publish(tmp: Path, out: Path, recipe: dict) -> None:
    """Rename the finished temporary directory into place (it is complete or absent)."""
    public_mode(tmp, directory=True)
    try:
        os.rename(tmp, out)
    except OSError:
        # Someone else finished the same preparation first (parallel workers): keep theirs.
        if (out / "meta.json").is_file() and json.loads((out / "meta.json").read_text()).get("recipe") == recipe:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
            os.rename(tmp, out)
        else:
            raise


def prepare(
    out: str | Path,
    inputs: list[str | Path] | None = None,
    *,
    corpus: str | None = None,
    tokenizer: str = "bytes",
    vocab_size: int | None = None,
    holdout_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    quiet: bool = False,
) -> Path:
    """Prepare a token data directory. Returns its path.

    ``inputs`` are text / JSON-lines files, or token files (``.bin`` uint16, ``.npy``); ``corpus``
    names an embedded corpus instead. ``vocab_size`` is the BPE size for ``tokenizer='bpe'``, or the
    vocabulary of imported token files (default: largest id + 1). If ``out`` already holds the same
    preparation it is returned unchanged; a different one is an error.
    """
    out = Path(out)
    _check_args(corpus, inputs, tokenizer, holdout_fraction, shard_tokens, vocab_size)
    paths = [Path(p) for p in inputs] if inputs else [embedded_corpus_path(corpus)]
    kinds = {"tokens" if _suffix(p) in TOKEN_SUFFIXES else "text" for p in paths}
    if len(kinds) > 1:
        raise ConfigError("inputs mix token files (.bin/.npy) and text; prepare them separately")
    is_tokens = kinds == {"tokens"}
    for p in paths:
        if not p.is_file():
            raise DataError(f"input file {str(p)!r} does not exist")
    recipe = {
        "sources": [{"name": corpus} if corpus else {"file": p.name, "sha256": _sha256(p)} for p in paths],
        "tokenizer": "external" if is_tokens else tokenizer,
        "vocab_size": vocab_size if (is_tokens or tokenizer == "bpe") else None,
        "holdout_fraction": holdout_fraction, "seed": seed, "text_field": None if is_tokens else text_field,
        "format": FORMAT,
    }
    if _existing(out, recipe):
        return out
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        train_arrays, val_arrays, dtype, vs, tok_meta, n_docs = (
            _token_arrays(paths, vocab_size, holdout_fraction) if is_tokens else
            _text_arrays(paths, tokenizer, vocab_size, holdout_fraction, seed, text_field, tmp))
        splits = {"train": _write_split(tmp, "train", train_arrays, dtype, shard_tokens),
                  "val": _write_split(tmp, "val", val_arrays, dtype, shard_tokens)}
        for k in splits:
            splits[k]["docs"] = n_docs[k]
        meta = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": int(vs), "tokenizer": tok_meta,
                "splits": splits, "recipe": recipe, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "prepare_seconds": round(time.time() - t0, 3)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _publish(tmp, out, recipe)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        t, v = splits["train"]["tokens"], splits["val"]["tokens"]
        print(f"prepared {out}: {t:,} train + {v:,} held-out tokens, vocab {vs}, "
              f"{meta['tokenizer']['kind']} tokenizer, {meta['prepare_seconds']:.1f}s", file=sys.stderr)
    return out


def cache_dir() -> Path:
    """Where auto-prepared corpora live: ``$CRITBATCH_CACHE`` or ``~/.cache/critbatch``."""
    root = os.environ.get("CRITBATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "critbatch")
    return Path(root)


def prepare_embedded(corpus: str = "sotu", tokenizer: str = "bytes", vocab_size: int = 8192,
                     quiet: bool = True) -> Path:
    """Prepare (once) and return the cached data directory of an embedded corpus."""
    embedded_corpus_path(corpus)  # validates the name
    name = f"{corpus}-{tokenizer}" + (f"{vocab_size}" if tokenizer == "bpe" else "")
    return prepare(cache_dir() / "data" / name, corpus=corpus, tokenizer=tokenizer,
                   vocab_size=vocab_size if tokenizer == "bpe" else None, quiet=quiet)
