"""The schema of a data directory's ``meta.json``, checked whole when the directory is opened: every
value a reader relies on has its type, the counts agree with each other, and the recorded ids fit the
vocabulary. A directory that fails is refused with one line naming the value, before a run writes
anything.

Required (other keys are kept and ignored)::

    format        "critbatch-tokens-v1"
    dtype         "uint16" | "uint32"
    vocab_size    integer >= 1
    tokenizer     {"kind": "bytes" | "bpe" | "file" | "external", "eot_id": integer < vocab_size
                   (null for external), "file": name of its tokenizer.json (bpe, file)}
    splits        {"train": SPLIT, "val": SPLIT}
    SPLIT         {"tokens": integer >= 0, the sum of its shards' tokens,
                   "shards": [{"file": a plain file name, "tokens": integer >= 0, "sha256": 64 hex digits}],
                   "max_id": integer < vocab_size or null (optional: written since issue 24),
                   "docs": integer or null (optional)}
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DataError

FORMAT = "critbatch-tokens-v1"

DTYPES = ("uint16", "uint32")
TOKENIZER_KINDS = ("bytes", "bpe", "file", "external")
SPLITS = ("train", "val")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_SHA = re.compile(r"[0-9a-f]{64}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_meta(meta, path: Path) -> None:
    """Raise :class:`DataError` naming the first value of ``meta`` (a data directory's meta.json)
    that breaks the schema above."""
    def bad(what: str) -> DataError:
        return DataError(f"data directory {path} has a bad meta.json: {what}; prepare it again")

    if not isinstance(meta, dict):
        raise bad(f"it holds a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise DataError(f"{path / 'meta.json'} has format {meta.get('format')!r}; expected {FORMAT!r}")
    for key in ("dtype", "vocab_size", "tokenizer", "splits"):
        if key not in meta:
            raise bad(f"it has no {key!r}")
    if meta["dtype"] not in DTYPES:
        raise bad(f"dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}")
    vs = meta["vocab_size"]
    if not _is_int(vs) or vs < 1:
        raise bad(f"vocab_size {vs!r} is not a positive integer")
    splits = meta["splits"]
    if not isinstance(splits, dict) or any(s not in splits for s in SPLITS):
        raise bad(f"splits must hold {' and '.join(map(repr, SPLITS))} (it holds "
                  f"{', '.join(map(repr, splits)) or 'none' if isinstance(splits, dict) else repr(splits)})")
    seen: set[str] = set()
    for name in SPLITS:
        _check_split(name, splits[name], vs, seen, bad)
    _check_tokenizer(meta["tokenizer"], vs, bad)


def _check_tokenizer(tok, vs: int, bad) -> None:
    if not isinstance(tok, dict) or tok.get("kind") not in TOKENIZER_KINDS:
        kind = tok.get("kind") if isinstance(tok, dict) else tok
        raise bad(f"tokenizer kind {kind!r} is not one of {', '.join(TOKENIZER_KINDS)}")
    eot = tok.get("eot_id")
    if tok["kind"] == "external" and eot is None:
        return
    if not _is_int(eot) or not 0 <= eot < vs:
        raise bad(f"tokenizer eot_id {eot!r} is not a token id below the vocab_size {vs}")
    if tok["kind"] in ("bpe", "file") and not (isinstance(tok.get("file"), str) and _FILE.fullmatch(tok["file"])):
        raise bad(f"tokenizer file {tok.get('file')!r} is not a file name in the directory")


def _check_split(name: str, split, vs: int, seen: set[str], bad) -> None:
    if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
        raise bad(f"split {name!r} has no list of shards")
    total = 0
    for sh in split["shards"]:
        if not isinstance(sh, dict):
            raise bad(f"a shard of split {name!r} is {sh!r}, not an object")
        f = sh.get("file")
        if not isinstance(f, str) or not _FILE.fullmatch(f):
            raise bad(f"shard file {f!r} of split {name!r} is not a file name in the directory")
        if f in seen:
            raise bad(f"shard {f} is listed twice")
        seen.add(f)
        if not _is_int(sh.get("tokens")) or sh["tokens"] < 0:
            raise bad(f"shard {f} tokens {sh.get('tokens')!r} is not a count")
        if not isinstance(sh.get("sha256"), str) or not _SHA.fullmatch(sh["sha256"]):
            raise bad(f"shard {f} sha256 {sh.get('sha256')!r} is not 64 hex digits")
        total += sh["tokens"]
    if not _is_int(split.get("tokens")) or split["tokens"] != total:
        raise bad(f"split {name!r} says {split.get('tokens')!r} tokens but its shards hold {total}")
    hi = split.get("max_id")
    if hi is not None and (not _is_int(hi) or hi < 0):
        raise bad(f"split {name!r} max_id {hi!r} is not a token id")
    if hi is not None and hi >= vs:
        raise bad(f"split {name!r} holds token id {hi} but vocab_size is {vs}")
    if split.get("docs") is not None and not _is_int(split["docs"]):
        raise bad(f"split {name!r} docs {split['docs']!r} is not a count")
