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

from ..config import check_choices, option
from ..errors import ConfigError, DataError
from ..io import check_output, public_mode, sha256_file
from .sources import TOKEN_DTYPES, chunks, columnar_documents, expand, is_hf_dataset_dir, scan, token_file
from .tokenizer import BPETokenizer, ByteTokenizer, FileTokenizer

FORMAT = "critbatch-tokens-v1"
EMBEDDED_CORPORA = ("sotu", "shakespeare")
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz", ".ndjson")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")
TOKEN_SUFFIXES = (".bin", ".npy")
DEFAULT_SHARD_TOKENS = 1 << 28  # 268M tokens per shard


def _suffix(p: Path) -> str:
    name = p.name.lower()
    for s in JSONL_SUFFIXES + TEXT_SUFFIXES + TOKEN_SUFFIXES + COLUMNAR_SUFFIXES:
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
        if is_hf_dataset_dir(p):
            docs.extend(columnar_documents(p, text_field))
            continue
        if not p.is_file():
            raise DataError(f"input file {str(p)!r} does not exist")
        suf = _suffix(p)
        try:
            if suf in JSONL_SUFFIXES:
                docs.extend(_read_jsonl(p, text_field))
            elif suf in TEXT_SUFFIXES:
                with _open_text(p) as f:
                    docs.append(f.read())
            elif suf in COLUMNAR_SUFFIXES:
                docs.extend(columnar_documents(p, text_field))
            else:
                raise DataError(f"input {str(p)!r} has an unknown type; accepted: text ({', '.join(TEXT_SUFFIXES)}), "
                                f"JSON lines ({', '.join(JSONL_SUFFIXES)}), parquet/arrow, a datasets directory or "
                                f"token files ({', '.join(TOKEN_SUFFIXES)})")
        except (UnicodeDecodeError, EOFError, lzma.LZMAError, gzip.BadGzipFile) as e:
            raise DataError(f"{p} cannot be read as {suf} text: {type(e).__name__}") from None
    docs = [d for d in docs if d]
    if not docs:
        raise DataError("the inputs hold no text")
    return docs


def _write_split(out: Path, split: str, arrays: Iterable[np.ndarray], dtype, shard_tokens: int) -> dict:
    """Write a split as shards of at most ``shard_tokens`` tokens, appending each array as it comes
    (memory holds one array at a time, whatever the split's size); returns its meta entry."""
    shards, total = [], 0
    f = h = None
    n = 0

    def close():
        nonlocal f, h, n
        if f is not None:
            f.close()
            shards.append({"file": name, "tokens": n, "sha256": h.hexdigest()})
        f = h = None
        n = 0

    for a in arrays:
        a = np.asarray(a)
        while a.size:
            if f is None:
                name = f"{split}_{len(shards):03d}.bin"
                f, h = open(out / name, "wb"), hashlib.sha256()
            take = min(a.size, shard_tokens - n)
            data = np.ascontiguousarray(a[:take], dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
            f.write(data)
            h.update(data)
            n += take
            total += take
            a = a[take:]
            if n == shard_tokens:
                close()
    close()
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
    """Text (.txt/.md), JSON lines (.jsonl[.xz|.gz]), parquet/arrow files or HF datasets
    directories (--text-field), or token files (.bin headerless or llm.c, .npy) or directories of
    them; none: the embedded ``corpus``."""
    corpus: str = "sotu"
    """The embedded corpus when no inputs are given: ``sotu`` or ``shakespeare``."""
    tokenizer: str = "bytes"
    """``bytes`` (UTF-8 bytes + end-of-text), ``bpe`` (a byte-level BPE trained here), or the path of
    a tokenizer you already have: a ``tokenizer.json`` or a local HF tokenizer directory."""
    eos_token: str | None = None
    """The end-of-text token put between documents (default: the tokenizer's own eos token)."""
    dtype: str = option("auto", choices=("auto", "uint16", "uint32"))
    """Token dtype: of headerless ``.bin`` inputs (nanoGPT; default uint16), and of the stored
    shards (default: uint16 when the vocabulary fits, else uint32)."""
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
    check_choices(cfg)
    return prepare(cfg.out, cfg.inputs or None, corpus=cfg.corpus if not cfg.inputs else None,
                   tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, holdout_fraction=cfg.holdout_fraction,
                   seed=cfg.seed, text_field=cfg.text_field, dtype=cfg.dtype, eos_token=cfg.eos_token, quiet=quiet)


def _check_args(corpus, inputs, tokenizer, holdout_fraction, shard_tokens, vocab_size) -> None:
    if (corpus is None) == (not inputs):
        raise ConfigError("give either --corpus NAME or input files, not both and not neither")
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


def _token_arrays(paths: list[Path], vocab_size: int | None, holdout_fraction: float, dtype: str):
    """Imported token files, memory-mapped: (train chunks, val chunks, dtype, vocabulary, tokenizer
    meta, documents). The held-out split is the tail of their concatenation."""
    arrays = [token_file(p, dtype) for p in paths]
    total, lo, hi = scan(arrays)
    if total < 4:
        raise DataError("the token files hold fewer than 4 tokens")
    if lo < 0:
        raise DataError(f"token id {lo} is negative; token files hold ids from 0 to the vocabulary size - 1")
    vs = vocab_size if vocab_size is not None else hi + 1
    if hi >= vs:
        raise DataError(f"token id {hi} is outside the vocabulary size {vs}; pass a larger --vocab-size")
    narrow = [p for p, a in zip(paths, arrays) if a.dtype.itemsize == 2]
    if narrow and vs > 1 << 16:
        raise DataError(f"{narrow[0]} holds uint16 tokens but the vocabulary is {vs:,} > 65,536; if the file is "
                        f"uint32, pass --dtype uint32")
    cut = int(total * (1 - holdout_fraction))
    return (chunks(arrays, 0, cut), chunks(arrays, cut, total), _dtype_for(vs), vs,
            {"kind": "external", "eot_id": None}, {"train": None, "val": None})


def _text_arrays(paths: list[Path], tokenizer: str, vocab_size: int | None, holdout_fraction: float, seed: int,
                 text_field: str, tmp: Path, dtype: str, eos_token: str | None):
    """Text: documents split by whole documents, tokenized, each followed by end-of-text (sequences
    are packed across documents)."""
    if tokenizer == "bytes":
        tok = ByteTokenizer()
    elif tokenizer != "bpe":
        tok = FileTokenizer.open(tokenizer, eos_token)
    docs = read_documents(paths, text_field)
    train_docs, val_docs = _split_docs(docs, holdout_fraction, seed)
    if tokenizer == "bpe":
        tok = BPETokenizer.train(train_docs, vocab_size or 8192)
    if tokenizer != "bytes":
        tok.save(tmp / "tokenizer.json")
    out_dtype = _dtype_for(tok.vocab_size) if dtype == "auto" else TOKEN_DTYPES[dtype]
    if tok.vocab_size > np.iinfo(out_dtype).max + 1:
        raise DataError(f"the tokenizer's vocabulary of {tok.vocab_size:,} does not fit {np.dtype(out_dtype).name} "
                        f"token ids; use --dtype uint32 (or auto)")
    eot = np.array([tok.eot_id], dtype=np.int64)
    train_arrays = (np.concatenate([a, eot]) for a in tok.encode_docs(train_docs))
    val_arrays = (np.concatenate([a, eot]) for a in tok.encode_docs(val_docs))
    return (train_arrays, val_arrays, out_dtype, tok.vocab_size, tok.describe(),
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
    dtype: str = "auto",
    eos_token: str | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    quiet: bool = False,
) -> Path:
    """Prepare a token data directory. Returns its path.

    ``inputs`` are text (files, JSON lines, parquet/arrow files, HF ``datasets`` directories) or
    token files (``.bin`` headerless ``dtype`` or llm.c shards, ``.npy``, directories of them, read as
    memory maps); ``corpus`` names an embedded corpus instead. ``tokenizer`` is ``bytes``, ``bpe``
    (trained here) or the path of an existing ``tokenizer.json`` / tokenizer directory.
    ``vocab_size`` is the BPE size for ``tokenizer='bpe'``, or the vocabulary of imported token files
    (default: largest id + 1). If ``out`` already holds the same preparation it is returned
    unchanged; a different one is an error.
    """
    out = Path(out)
    _check_args(corpus, inputs, tokenizer, holdout_fraction, shard_tokens, vocab_size)
    if dtype not in ("auto", *TOKEN_DTYPES):
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(TOKEN_DTYPES)}")
    paths = expand([Path(p) for p in inputs], TOKEN_SUFFIXES) if inputs else [embedded_corpus_path(corpus)]
    kinds = {"tokens" if _suffix(p) in TOKEN_SUFFIXES else "text" for p in paths}
    if len(kinds) > 1:
        raise ConfigError("inputs mix token files (.bin/.npy) and text; prepare them separately")
    is_tokens = kinds == {"tokens"}
    for p in paths:
        if not (p.is_file() or is_hf_dataset_dir(p)):
            raise DataError(f"input file {str(p)!r} does not exist")
    tok_file = Path(tokenizer) if tokenizer not in ("bytes", "bpe") else None
    if tok_file is not None and not is_tokens and not (tok_file.is_file() or tok_file.is_dir()):
        raise DataError(f"tokenizer {tokenizer!r} is not bytes, bpe, or an existing tokenizer.json / directory")
    recipe = {
        "sources": [{"name": corpus} if corpus else {"file": p.name, "sha256": sha256_file(p)} if p.is_file() else
                    {"dir": p.name, "files": [sha256_file(q) for q in sorted(p.rglob("*.arrow"))]} for p in paths],
        "tokenizer": "external" if is_tokens else tokenizer if tok_file is None else
        {"file": sha256_file(tok_file / "tokenizer.json" if tok_file.is_dir() else tok_file), "eos_token": eos_token},
        "dtype": dtype,
        "vocab_size": vocab_size if (is_tokens or tokenizer == "bpe") else None,
        "holdout_fraction": holdout_fraction, "seed": seed, "text_field": None if is_tokens else text_field,
        "format": FORMAT,
    }
    check_output(out, "--out")
    if _existing(out, recipe):
        return out
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        train_arrays, val_arrays, out_dtype, vs, tok_meta, n_docs = (
            _token_arrays(paths, vocab_size, holdout_fraction, dtype) if is_tokens else
            _text_arrays(paths, tokenizer, vocab_size, holdout_fraction, seed, text_field, tmp, dtype, eos_token))
        splits = {"train": _write_split(tmp, "train", train_arrays, out_dtype, shard_tokens),
                  "val": _write_split(tmp, "val", val_arrays, out_dtype, shard_tokens)}
        for k in splits:
            splits[k]["docs"] = n_docs[k]
        meta = {"format": FORMAT, "dtype": np.dtype(out_dtype).name, "vocab_size": int(vs), "tokenizer": tok_meta,
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
