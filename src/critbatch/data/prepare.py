"""``critbatch prepare``: text (embedded corpus, text files, JSON lines) or existing token files
(nanoGPT headerless uint16 ``.bin``, ``.npy``) -> token shards + ``meta.json``.

Layout of a data directory::

    meta.json            dtype, vocab size, tokenizer, token counts, the largest id and sha256 of every shard
    tokenizer.json       the BPE (only for --tokenizer bpe)
    train_000.bin ...    headerless little-endian token arrays (training split)
    val_000.bin ...      the held-out split; training never reads it

Text is split into the held-out set by whole documents (a seeded choice); a single document or
imported token files are split by their tail; a held-out file (``--val``, or nanoGPT's ``val.bin``
beside ``train.bin``) is the held-out split whole. Text is streamed (:mod:`critbatch.data.stream`):
memory does not grow with the corpus. The directory is written to a temporary sibling and renamed
into place, so it is either complete or absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..config import check_choices, option
from ..errors import ConfigError, DataError
from ..io import check_output, public_mode, sha256_file
from .meta import FORMAT
from .sources import TOKEN_DTYPES, chunks, expand, is_hf_dataset_dir, scan, token_file
from .stream import ShardWriter, encode_splits, holdout
from .text import COLUMNAR_SUFFIXES, JSONL_SUFFIXES, TEXT_SUFFIXES, TOKEN_SUFFIXES, suffix, text_kind
from .tokenizer import BPETokenizer, ByteTokenizer, FileTokenizer, cut_rule

EMBEDDED_CORPORA = ("sotu", "shakespeare")
__all__ = ["prepare", "prepare_config", "PrepareConfig", "prepare_embedded", "cache_dir", "embedded_corpus_path",
           "FORMAT", "EMBEDDED_CORPORA", "TEXT_SUFFIXES", "JSONL_SUFFIXES", "COLUMNAR_SUFFIXES", "TOKEN_SUFFIXES"]
DEFAULT_SHARD_TOKENS = 1 << 28  # 268M tokens per shard


def embedded_corpus_path(name: str) -> Path:
    if name not in EMBEDDED_CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; accepted: {', '.join(EMBEDDED_CORPORA)}")
    return Path(str(resources.files("critbatch") / "corpora" / f"{name}.jsonl.xz"))


def _dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


@dataclass
class PrepareConfig:
    """Text or token files (or an embedded corpus) to a token data directory."""

    out: str
    """The data directory to create."""
    inputs: list[str] = option(default_factory=list, positional="*")
    """Text (.txt/.md/.rst/...), JSON lines (.jsonl[.xz|.gz]), parquet/arrow files or HF datasets
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
    val: list[str] = option(default_factory=list)
    """Held-out files: the held-out split is exactly their tokens (documents), never trained on;
    ``--holdout-fraction`` is then unused. nanoGPT's ``val.bin`` given beside ``train.bin`` is one
    without this flag."""
    text: bool = False
    """Read every input as plain text, one document per file, whatever its name ends with."""


def prepare_config(cfg: PrepareConfig, quiet: bool = False) -> Path:
    """:func:`prepare` from a :class:`PrepareConfig` (the command line's)."""
    check_choices(cfg)
    return prepare(cfg.out, cfg.inputs or None, corpus=cfg.corpus if not cfg.inputs else None,
                   tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, holdout_fraction=cfg.holdout_fraction,
                   seed=cfg.seed, text_field=cfg.text_field, dtype=cfg.dtype, eos_token=cfg.eos_token, quiet=quiet,
                   val=cfg.val, as_text=cfg.text)


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


HELD_OUT_WORDS = {"val", "valid", "validation"}


def _words(p: Path) -> set[str]:
    return set(re.split(r"[_.\-]+", p.name.lower()))


def heldout_by_name(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): token files named as a held-out split (``val.bin``, llm.c's
    ``fineweb_val_000000.bin``) given together with training files (``train.bin``) are held out."""
    val = [p for p in paths if _words(p) & HELD_OUT_WORDS]
    train = [p for p in paths if p not in val]
    if val and any("train" in _words(p) for p in train):
        return train, val
    return paths, []


def _inputs(inputs, corpus, val, as_text: bool) -> tuple[list[Path], list[Path], bool]:
    """(input paths, held-out paths, whether they are token files), checked."""
    paths = expand([Path(p) for p in inputs], TOKEN_SUFFIXES) if inputs else [embedded_corpus_path(corpus)]
    val_paths = expand([Path(p) for p in val or []], TOKEN_SUFFIXES)
    for p in paths + val_paths:
        if not (p.is_file() or is_hf_dataset_dir(p)):
            raise DataError(f"input file {str(p)!r} does not exist")

    def kind(p: Path) -> str:
        return "token files" if not as_text and suffix(p) in TOKEN_SUFFIXES else "text"

    kinds = {kind(p) for p in paths}
    if len(kinds) > 1:
        raise ConfigError("inputs mix token files (.bin/.npy) and text; prepare them separately")
    for v in val_paths:
        if kind(v) not in kinds:
            raise ConfigError(f"--val {v} is {kind(v)} but the inputs are {kinds.pop()}; give a held-out file of "
                              f"the same kind")
        if any(v.resolve() == p.resolve() for p in paths):
            raise ConfigError(f"--val {v} is also an input; a held-out file is never trained on")
    is_tokens = kinds == {"token files"}
    if not is_tokens:
        for p in paths + val_paths:
            text_kind(p, as_text)  # an unknown type is refused before anything is read
    if is_tokens and not val_paths:
        paths, val_paths = heldout_by_name(paths)
    return paths, val_paths, is_tokens


def _token_splits(tmp: Path, paths: list[Path], val_paths: list[Path], vocab_size: int | None,
                  holdout_fraction: float, dtype: str, shard_tokens: int) -> dict:
    """Imported token files, read in chunks, into shards: meta's dtype, vocabulary, tokenizer and
    splits. The held-out split is the held-out files, else the tail of the inputs' concatenation."""
    arrays = [token_file(p, dtype) for p in paths]
    held = [token_file(p, dtype) for p in val_paths]
    total, lo, hi = scan(arrays + held)
    if total < 4:
        raise DataError("the token files hold fewer than 4 tokens")
    if lo < 0:
        raise DataError(f"token id {lo} is negative; token files hold ids from 0 to the vocabulary size - 1")
    vs = vocab_size if vocab_size is not None else hi + 1
    if hi >= vs:
        raise DataError(f"token id {hi} is outside the vocabulary size {vs}; pass a larger --vocab-size")
    narrow = [tf.path for tf in arrays + held if tf.dtype.itemsize == 2]
    if narrow and vs > 1 << 16:
        raise DataError(f"{narrow[0]} holds uint16 tokens but the vocabulary is {vs:,} > 65,536; if the file is "
                        f"uint32, pass --dtype uint32")
    n = sum(tf.size for tf in arrays)
    if held:
        parts = {"train": chunks(arrays, 0, n), "val": chunks(held, 0, total - n)}
    else:
        cut = int(total * (1 - holdout_fraction))
        parts = {"train": chunks(arrays, 0, cut), "val": chunks(arrays, cut, total)}
    splits = {}
    for split, pieces in parts.items():
        w = ShardWriter(tmp, split, _dtype_for(vs), shard_tokens)
        for a in pieces:
            w.append(a)
        splits[split] = {**w.close(), "docs": None}
    return {"dtype": np.dtype(_dtype_for(vs)).name, "vocab_size": int(vs), "tokenizer": {"kind": "external",
            "eot_id": None}, "splits": splits}


def _text_splits(tmp: Path, paths: list[Path], val_paths: list[Path], *, tokenizer: str, vocab_size: int | None,
                 holdout_fraction: float, seed: int, text_field: str, dtype: str, eos_token: str | None,
                 as_text: bool, shard_tokens: int) -> dict:
    """Text, streamed: the held-out choice, the BPE (trained on the training documents only), then
    every document tokenized and followed by end-of-text (sequences are packed across documents)."""
    if tokenizer == "bytes":
        tok = ByteTokenizer()
    elif tokenizer != "bpe":
        tok = FileTokenizer.open(tokenizer, eos_token)
    plan = holdout(paths, val_paths, text_field, as_text, holdout_fraction, seed)
    if tokenizer == "bpe":
        tok = BPETokenizer.train(plan.train_texts(cut_rule(BPETokenizer.untrained())), vocab_size or 8192)
    if tokenizer != "bytes":
        tok.save(tmp / "tokenizer.json")
    out_dtype = _dtype_for(tok.vocab_size) if dtype == "auto" else TOKEN_DTYPES[dtype]
    if tok.vocab_size > np.iinfo(out_dtype).max + 1:
        raise DataError(f"the tokenizer's vocabulary of {tok.vocab_size:,} does not fit {np.dtype(out_dtype).name} "
                        f"token ids; use --dtype uint32 (or auto)")
    writers = {s: ShardWriter(tmp, s, out_dtype, shard_tokens) for s in ("train", "val")}
    docs = encode_splits(tok, plan, writers)
    return {"dtype": np.dtype(out_dtype).name, "vocab_size": int(tok.vocab_size), "tokenizer": tok.describe(),
            "splits": {s: {**w.close(), "docs": docs[s]} for s, w in writers.items()}}


def _source(p: Path, corpus: str | None) -> dict:
    if corpus:
        return {"name": corpus}
    if p.is_file():
        return {"file": p.name, "sha256": sha256_file(p)}
    return {"dir": p.name, "files": [sha256_file(q) for q in sorted(p.rglob("*.arrow"))]}


def _recipe(paths, val_paths, corpus, is_tokens, tokenizer, eos_token, dtype, vocab_size, holdout_fraction, seed,
            text_field, as_text) -> dict:
    """What defines the preparation (the same recipe into the same directory is a no-op)."""
    tok_file = Path(tokenizer) if tokenizer not in ("bytes", "bpe") else None
    recipe = {
        "sources": [_source(p, corpus) for p in paths],
        "tokenizer": "external" if is_tokens else tokenizer if tok_file is None else
        {"file": sha256_file(tok_file / "tokenizer.json" if tok_file.is_dir() else tok_file), "eos_token": eos_token},
        "dtype": dtype,
        "vocab_size": vocab_size if (is_tokens or tokenizer == "bpe") else None,
        "holdout_fraction": holdout_fraction, "seed": seed, "text_field": None if is_tokens else text_field,
        "format": FORMAT,
    }
    if val_paths:  # only when given: recipes of directories prepared before these options stay equal
        recipe["val"] = [_source(p, None) for p in val_paths]
    if as_text:
        recipe["text"] = True
    return recipe


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
    val: list[str | Path] | None = None,
    as_text: bool = False,
) -> Path:
    """Prepare a token data directory. Returns its path.

    ``inputs`` are text (files, JSON lines, parquet/arrow files, HF ``datasets`` directories) or
    token files (``.bin`` headerless ``dtype`` or llm.c shards, ``.npy``, directories of them, read in
    chunks); ``corpus`` names an embedded corpus instead. ``tokenizer`` is ``bytes``, ``bpe``
    (trained here) or the path of an existing ``tokenizer.json`` / tokenizer directory.
    ``vocab_size`` is the BPE size for ``tokenizer='bpe'``, or the vocabulary of imported token files
    (default: largest id + 1). ``val`` are held-out files of the same kind (the held-out split is
    exactly theirs); ``as_text`` reads every input as plain text. If ``out`` already holds the same
    preparation it is returned unchanged; a different one is an error.
    """
    out = Path(out)
    _check_args(corpus, inputs, tokenizer, holdout_fraction, shard_tokens, vocab_size)
    if dtype not in ("auto", *TOKEN_DTYPES):
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(TOKEN_DTYPES)}")
    paths, val_paths, is_tokens = _inputs(inputs, corpus, val, as_text)
    tok_file = Path(tokenizer) if tokenizer not in ("bytes", "bpe") else None
    if tok_file is not None and not is_tokens and not (tok_file.is_file() or tok_file.is_dir()):
        raise DataError(f"tokenizer {tokenizer!r} is not bytes, bpe, or an existing tokenizer.json / directory")
    recipe = _recipe(paths, val_paths, corpus, is_tokens, tokenizer, eos_token, dtype, vocab_size, holdout_fraction,
                     seed, text_field, as_text)
    check_output(out, "--out")
    if _existing(out, recipe):
        return out
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        made = (_token_splits(tmp, paths, val_paths, vocab_size, holdout_fraction, dtype, shard_tokens) if is_tokens
                else _text_splits(tmp, paths, val_paths, tokenizer=tokenizer, vocab_size=vocab_size,
                                  holdout_fraction=holdout_fraction, seed=seed, text_field=text_field, dtype=dtype,
                                  eos_token=eos_token, as_text=as_text, shard_tokens=shard_tokens))
        meta = {"format": FORMAT, **made, "recipe": recipe,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "prepare_seconds": round(time.time() - t0, 3)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _publish(tmp, out, recipe)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        t, v = meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]
        held = f" (held out: {', '.join(p.name for p in val_paths)})" if val_paths else ""
        print(f"prepared {out}: {t:,} train + {v:,} held-out tokens{held}, vocab {meta['vocab_size']}, "
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
